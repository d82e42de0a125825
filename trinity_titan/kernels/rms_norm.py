"""RMSNorm with AFMoE numerics: normalise and scale in fp32, then cast back."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """(w * (x.float() * rsqrt(mean(x^2) + eps))).to(x.dtype), with a plain gain w (init 1).

    The weight multiplies the fp32 normalised activations before the cast, as in HF AFMoE
    (Llama casts first, then multiplies).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)

    def reset_parameters(self, value: float = 1.0) -> None:
        nn.init.constant_(self.weight, value)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
