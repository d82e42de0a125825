"""SwiGLU activation: silu(gate) * up, shared by the dense FFN, the shared and the routed experts.

Liger's kernel computes silu in fp32, casts it to the input dtype and multiplies by `up`, the same
roundings as `F.silu(gate) * up`. Its backward writes the gradients into the saved gate and up
buffers, which are the fresh outputs of the projections and are not saved by anything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trinity_titan.kernels.backend import use_liger


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if use_liger(backend, gate, up):
        from liger_kernel.ops import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return F.silu(gate) * up
