"""Trinity's additions to TorchTitan's JobConfig, merged in with `[job] custom_config_module`.

TorchTitan merges these dataclasses into its own, so every field below is settable from TOML and
from the command line (`--moe.balance_method smebu`). A field left at None keeps the flavor's
default from `trinity_titan.model.flavors`.

No `from __future__ import annotations` here: TorchTitan merges these classes by inspecting real
(not string) field types.
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Model:
    attn_type: Literal["sdpa", "flex"] | None = None
    """Attention kernel: 'sdpa' (CPU and GPU, explicit sliding-window mask) or 'flex' (block-sparse, GPU)."""

    attn_mask_type: Literal["causal", "block_causal"] | None = None
    """'block_causal' adds document masking at EOS tokens (needs attn_type = 'flex')."""


@dataclass
class MoE:
    """Expert-bias balancing and the sequence-wise balance loss (names match TrinityModelArgs)."""

    balance_method: Literal["none", "aux_free", "smebu"] | None = None
    """'aux_free': b += gamma * sign(mean(n) - n); 'smebu': momentum-smoothed, tanh-bounded update."""

    balance_gamma: float | None = None
    """Step size of the aux-loss-free sign update (report: 1e-3)."""

    smebu_lambda: float | None = None
    smebu_beta: float | None = None
    smebu_kappa: float | None = None

    balance_loss_coeff: float | None = None
    """alpha of the sequence-wise balance loss (report: 1e-4 for large, 0 elsewhere)."""


@dataclass
class Kernels:
    """Fused kernels: Liger's Triton kernels on CUDA, a PyTorch path with the same numerics elsewhere."""

    backend: Literal["auto", "liger", "torch"] = "auto"
    """'auto': Liger if CUDA is available and liger-kernel imports, else PyTorch. 'liger' without
    CUDA is an error at configuration time."""

    fused_loss: bool = False
    """LM head + cross-entropy + z-loss in one chunked pass that never materialises the
    [tokens, vocab] logits. Takes effect under `-m trinity_titan.train` (its trainer hands the
    labels to the model); the stock `-m torchtitan.train` keeps the logits path."""

    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused loss's PyTorch path and of the Liger path's statistics pass
    (memory: chunk x vocab fp32 logits)."""

    fused_logit_stats: bool = True
    """Exact max logit (and lse^2 for z=0) in the Liger fused loss via one more no-grad chunked
    head matmul (+1/3 of the head's training FLOPs). False: max logit is NaN."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    kernels: Kernels = field(default_factory=Kernels)
