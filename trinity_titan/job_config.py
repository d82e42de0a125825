"""Trinity's additions to TorchTitan's JobConfig, merged in with `[job] custom_config_module`.

TorchTitan merges these dataclasses into its own, so every field below is settable from TOML and
from the command line (`--moe.balance_method smebu`). A field left at None keeps the flavor's
default from `trinity_titan.model.flavors`.

Every Trinity default lives here, in its field; the code reads it from the job config. Trinity's
runs need these sections: `python -m trinity_titan.train` merges this module by itself, and the
config check refuses a `-m torchtitan.train` job without `[job] custom_config_module`.

No `from __future__ import annotations` here: TorchTitan merges these classes by inspecting real
(not string) field types.
"""

from dataclasses import dataclass, field
from typing import Literal

CONFIG_MODULE = "trinity_titan.job_config"
"""The value of `[job] custom_config_module` that adds these sections to TorchTitan's JobConfig."""


class ConfigError(ValueError):
    """A job config that cannot run. The message names the option (or file) and the fix."""


@dataclass
class Model:
    attn_type: Literal["sdpa", "flex"] | None = None
    """Attention kernel: 'sdpa' (CPU and GPU, explicit sliding-window mask) or 'flex' (block-sparse, GPU)."""

    attn_mask_type: Literal["causal", "block_causal"] | None = None
    """'block_causal' adds document masking at EOS tokens: block-sparse with 'flex'; with 'sdpa'
    (and under context parallelism) an explicit [batch, 1, seq, seq] mask."""

    hf_config: str | None = None
    """An HF AFMoE config.json whose model shape (vocab, widths, layers, heads, experts, window,
    context) replaces the flavor's, so a checkpoint of a shape no flavor has trains without a
    flavor of its own; the flavor still gives the rest (balancing defaults). Settings the model
    cannot honour are refused, naming the key. None: the flavor's shape."""


@dataclass
class MoE:
    """Expert-bias balancing and the sequence-wise balance loss (names match TrinityModelArgs)."""

    balance_method: Literal["none", "aux_free", "smebu"] | None = None
    """'aux_free': b += gamma * sign(mean(n) - n); 'smebu': momentum-smoothed, tanh-bounded update."""

    balance_gamma: float | None = None
    """Step size of the aux-loss-free sign update (report: 1e-3)."""

    smebu_lambda: float | None = None
    """SMEBU step size lambda (report: 5e-4)."""

    smebu_beta: float | None = None
    """SMEBU momentum beta (report: 0.5)."""

    smebu_kappa: float | None = None
    """SMEBU tanh sharpness kappa (report: 2)."""

    balance_loss_coeff: float | None = None
    """alpha of the sequence-wise balance loss (report: 1e-4 for large, 0 elsewhere)."""

    use_grouped_mm: bool | None = None
    """Routed experts through torch._grouped_mm (true) or an exact loop of per-expert matmuls
    (false). None keeps the model's default, chosen per device (TrinityModelArgs.use_grouped_mm)."""


@dataclass
class NanGuard:
    """What `python -m trinity_titan.train` does when a loss or the gradient is NaN or inf."""

    action: Literal["checkpoint_and_stop", "skip", "off"] = "checkpoint_and_stop"
    """'checkpoint_and_stop': skip the update, save a checkpoint, exit with an error.
    'skip': skip the update and go on (stop after `max_consecutive_skips` bad steps in a row)."""

    max_consecutive_skips: int = 10
    """With action = 'skip': this many bad steps in a row means the run is broken; stop."""

    inject_nan_at_step: int = 0
    """Testing aid: make rank 0's loss NaN at this step (0 = never)."""

    inject_nan_steps: int = 1
    """Testing aid: with `inject_nan_at_step`, this many consecutive steps get a NaN loss."""


@dataclass
class Loss:
    """Terms added to the cross-entropy."""

    z_loss_coeff: float = 1e-6
    """coef of the z-loss coef * mean_t logsumexp(logits_t)^2 (report: 1e-6; larger destabilised)."""


@dataclass
class Health:
    """Early-warning thresholds: crossing one logs a WARNING with the step, the layer and the value."""

    max_logit_warn: float | None = None
    """Warn when the LM head's max logit exceeds this (None: off)."""

    maxvio_warn: float | None = None
    """Warn when an MoE layer's MaxVio = max_i (n_i - nbar) / nbar exceeds this (None: off)."""


@dataclass
class Wandb:
    """The wandb run of `[metrics] enable_wandb`. An environment variable set for a field wins
    over the TOML (the variables TorchTitan's logger and wandb read, named per field)."""

    project: str = "trinity"
    """Project (WANDB_PROJECT)."""

    entity: str | None = None
    """Team or user (WANDB_TEAM or WANDB_ENTITY); None: the API key's default entity."""

    run_name: str | None = None
    """Run name (WANDB_RUN_NAME or WANDB_NAME); None: the last folder of [job] dump_folder."""

    group: str | None = None
    """Run group (WANDB_RUN_GROUP), e.g. to gather the runs of one sweep."""

    tags: list[str] = field(default_factory=list)
    """Run tags (WANDB_TAGS or WANDB_RUN_TAGS, comma-separated)."""

    notes: str | None = None
    """Run notes (WANDB_RUN_NOTES or WANDB_NOTES); None: [job] description."""

    alerts: bool = False
    """Send each log step's [health] summary as a wandb alert (wandb.alert), at most one per
    `alert_min_interval_s`."""

    alert_min_interval_s: float = 3600.0
    """Seconds between two alerts; the health lines in the log are not limited."""

    layer_chart_every: int = 10
    """Log the per-layer MoE charts (MaxVio and dead experts of every layer in one panel each)
    on every N-th log step; each one replaces the last and holds the whole history (0: never)."""

    layer_chart_points: int = 200
    """Log steps kept per layer in those charts: past this, every other point is dropped."""


@dataclass
class Optimizer:
    """Muon options, added to TorchTitan's `[optimizer]` (`name = "Muon"` selects Muon).

    With Muon, `lr`, `betas`, `eps` and `weight_decay` are the AdamW group's (embedding, LM head,
    and the 1-D parameters, which never get weight decay); the fields below are the Muon group's
    (every other matrix: attention, dense and shared SwiGLU, routed experts, router).
    """

    muon_lr: float = 1e-3
    """Peak learning rate of the Muon group (report: 1e-3 nano/mini, 8e-4 large)."""

    muon_weight_decay: float | None = None
    """Decoupled weight decay of the Muon group; None uses `weight_decay`."""

    muon_momentum: float = 0.95
    """Momentum of Muon's gradient average."""

    muon_nesterov: bool = True
    """Orthogonalise the Nesterov look-ahead (1 - mu) g + mu B instead of B."""

    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """'original': lr * sqrt(max(1, fan_out/fan_in)); 'match_rms_adamw': lr * 0.2 * sqrt(max(m, n))."""

    ns_steps: int = 5
    """Newton-Schulz iterations per step."""

    ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    """(a, b, c) of the quintic Newton-Schulz step X <- a X + (b A + c A^2) X, A = X X^T."""

    ns_eps: float = 1e-7
    """Floor of the Frobenius norm the update is divided by before Newton-Schulz."""

    ns_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the Newton-Schulz iteration ('bfloat16' is faster on GPUs)."""


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

    snapshot_every_n_batches: int = 1
    """With worker processes, each worker's state (a few bytes per buffered document: its
    address and read head) is sent to the main process every N batches. With N > 1 a resume
    regenerates up to N-1 batches from the last snapshot (identical on the saved layout), and the
    position cannot be resharded to another layout."""

    jsonl_block_bytes: int = 4 * 1024 * 1024
    """Local JSON-lines files are read in blocks of about this many bytes: the unit the readers
    share and a reshard redistributes. A source needs at least one block per reader
    (data-parallel ranks x workers). Changing it makes saved data positions unusable."""

    table_block_rows: int = 1024
    """Rows per block of local parquet (within a row group) and arrow files; as above."""

    trace_rows: bool = False
    """Write which tokens of which document every trained row holds to
    `<dump_folder>/row_trace/rank<R>.jsonl` (one line per row: step and pieces). Needs
    `python -m trinity_titan.train`."""

    batch_ramp: list[dict[str, int]] = field(default_factory=list)
    """Global-batch ramp: {tokens = threshold in training tokens, global_batch_size = sequences}.
    From each threshold on the global batch changes by gradient accumulation; the LR schedule
    keeps counting steps. Needs `python -m trinity_titan.train`."""

    validate: Literal["full", "head", "off"] = "full"
    """Scan the local sources before the model is built, split over the ranks: 'full' reads
    every document (each parses, has its text field, is valid UTF-8 and not blank); 'head' only
    the first `validate_head_docs` of each file; 'off' none (bad documents then surface when
    read). Hub sources are never scanned: each document is checked when it is read."""

    validate_head_docs: int = 1000
    """Documents per file that `validate = "head"` checks."""

    on_bad_document: Literal["error", "skip"] = "error"
    """A document without its text field, with a non-string or blank text: 'error' stops (before
    training when the scan finds it, naming the file and line or row); 'skip' skips and counts it
    (`data/skipped_documents`). Lines that are not JSON or not UTF-8 are an error either way."""


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
class Parallelism:
    """Trinity's addition to TorchTitan's [parallelism] section."""

    context_parallel_impl: Literal["allgather_halo", "allgather"] = "allgather_halo"
    """Trinity's context-parallel attention, built from plain collectives (gloo and NCCL).
    'allgather_halo': global layers all-gather keys/values, local (sliding-window) layers
    receive only the W-1 keys/values before each chunk from their neighbours.
    'allgather': every layer all-gathers keys/values (more memory; a reference)."""


@dataclass
class RunLock:
    """One run per output folder: a lock file in the dump folder (and beside a checkpoint folder
    outside it), taken by rank 0 before any compute and released at exit."""

    enable: bool = True
    """Take the lock; a second run on a folder in use stops in seconds, naming the holder."""

    heartbeat_s: float = 30.0
    """How often the holder rewrites its heartbeat into the lock file."""

    stale_after_s: float = 300.0
    """A lock held from another host is stale (its run is gone) when its heartbeat is older than
    this. On the same host the holder's process id decides at once."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    nan_guard: NanGuard = field(default_factory=NanGuard)
    loss: Loss = field(default_factory=Loss)
    health: Health = field(default_factory=Health)
    wandb: Wandb = field(default_factory=Wandb)
    optimizer: Optimizer = field(default_factory=Optimizer)
    data: Data = field(default_factory=Data)
    kernels: Kernels = field(default_factory=Kernels)
    parallelism: Parallelism = field(default_factory=Parallelism)
    run_lock: RunLock = field(default_factory=RunLock)
