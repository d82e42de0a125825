"""The report's initialisation: every weight ~ TruncNormal(0, sigma^2) cut at +-3 sigma."""

import torch
from torchtitan.models.utils import trunc_normal_


def trunc_normal_3sigma_(tensor: torch.Tensor, std: float) -> None:
    """In-place truncated normal (sampled in fp32 by TorchTitan's helper, DTensor-safe)."""
    trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)
