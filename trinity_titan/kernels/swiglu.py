"""SwiGLU activation: silu(gate) * up, shared by the dense FFN, the shared and the routed experts."""

import torch
import torch.nn.functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
