"""Fused kernels used by the Trinity model and loss, each with a PyTorch path of the same numerics.

On CUDA the "liger" backend uses Liger-Kernel's Triton kernels; the "torch" backend runs anywhere.
"""

from .backend import resolve_backend
from .fused_linear_cross_entropy import LossTerms, fused_linear_cross_entropy
from .rms_norm import RMSNorm, rms_norm
from .swiglu import silu_mul

__all__ = [
    "LossTerms",
    "RMSNorm",
    "fused_linear_cross_entropy",
    "resolve_backend",
    "rms_norm",
    "silu_mul",
]
