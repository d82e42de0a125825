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
class Data:
    """The pretraining data pipeline (trinity_titan/data). Empty `sources` keeps the debug loader.

    Lists of tables are best written in TOML (`[[data.sources]]`, `[[data.phases]]`,
    `[[data.batch_ramp]]`); the command line takes one entry as key-value pairs, e.g.
    `--data.batch_ramp tokens 512 global_batch_size 4`. Worker processes per rank come from TorchTitan's
    `[training.dataloader] num_workers`; each worker reads its own shard with its own buffer.
    """

    sources: list[dict[str, str | float]] = field(default_factory=list)
    """Datasets: {path = local jsonl/parquet/arrow file, dir or glob, or a hub name; name = hub
    config; split = "train"; text_field = "text"; weight = 1.0 (used when there are no phases)}."""

    mixing: Literal["rsdb", "sequential"] = "rsdb"
    """How documents become rows: RSDB (random read heads over a document buffer) or plain packing."""

    rsdb_buffer_docs: int = 8192
    """RSDB's configured size per data-parallel rank, split over the workers; it holds up to 2x."""

    seed: int = 0
    """Seeds the source choice and RSDB picks (combined with the DP rank and worker id)."""

    phases: list[dict[str, int | list[float]]] = field(default_factory=list)
    """Mixture phases in order: {tokens = budget in training tokens, weights = one per source}.
    The loader switches at each cumulative boundary; the last phase runs on past its budget."""

    infinite: bool = True
    """Restart a source at its end (new epoch); false ends training when the data run out."""

    snapshot_every_n_batches: int = 64
    """With worker processes, each worker's state (for RSDB the whole buffer, ~20 MiB at 4096
    documents) is sent to the main process every N batches; a resume regenerates up to N-1
    batches from the last snapshot, with identical results."""

    batch_ramp: list[dict[str, int]] = field(default_factory=list)
    """Global-batch ramp: {tokens = threshold in training tokens, global_batch_size = sequences}.
    From each threshold on the global batch changes by gradient accumulation; the LR schedule
    keeps counting steps. Needs `python -m trinity_titan.train`."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    data: Data = field(default_factory=Data)
