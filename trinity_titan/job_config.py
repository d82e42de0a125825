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
class Parallelism:
    """Trinity's addition to TorchTitan's [parallelism] section."""

    context_parallel_impl: Literal["allgather_halo", "allgather"] = "allgather_halo"
    """Trinity's context-parallel attention, built from plain collectives (gloo and NCCL).
    'allgather_halo': global layers all-gather keys/values, local (sliding-window) layers
    receive only the W-1 keys/values before each chunk from their neighbours.
    'allgather': every layer all-gathers keys/values (more memory; a reference)."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    parallelism: Parallelism = field(default_factory=Parallelism)
