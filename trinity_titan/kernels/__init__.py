"""Fused kernels used by the Trinity model and loss, each with a PyTorch path of the same numerics."""

from .rms_norm import RMSNorm
from .swiglu import silu_mul

__all__ = ["RMSNorm", "silu_mul"]
