"""RMSNorm with AFMoE numerics: normalise and scale in fp32, then cast back.

(w * (x.float() * rsqrt(mean(x^2) + eps))).to(x.dtype). Liger's "gemma" casting mode computes
exactly this (x and w upcast to fp32, the product cast back); its "llama" mode casts the normalised
x back before multiplying by w, which is HF Llama's order, not AFMoE's.
"""

from __future__ import annotations

import torch
from torch import nn

from trinity_titan.kernels.backend import use_liger


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed).to(x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch"
) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape, e.g. [b, s, heads, head_dim])."""
    if use_liger(backend, x, weight):
        from liger_kernel.ops import LigerRMSNormFunction

        # offset 0 (plain w, not 1 + w); in_place=False because the sandwich norms' output
        # gradient is also the residual stream's gradient, which Liger would overwrite.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "gemma", False)
    return rms_norm_torch(x, weight, eps)


class RMSNorm(nn.Module):
    """AFMoE RMSNorm with a plain gain w (init 1); `backend` is "torch" or "liger"."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)

    def reset_parameters(self, value: float = 1.0) -> None:
        nn.init.constant_(self.weight, value)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, backend={self.backend}"
