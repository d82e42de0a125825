"""Every numeric option, range-checked before compute (part of the one job check).

Out of range, some options crash deep inside the model (a huge `seq_len` tries to allocate tens
of GB) and others train silently with nonsense (a negative learning rate or warmup). `RANGES` is
one table: each entry names the option, its allowed range and the values with a special meaning;
`check_option_ranges` turns the first violation into a ConfigError that names the option, its
value, the range and the flag to set. Limits that depend on the model (the flavor's longest
sequence) are checked by `check_model_limits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torchtitan.config import JobConfig

from trinity_titan.job_config import ConfigError
from trinity_titan.model.args import TrinityModelArgs


@dataclass(frozen=True)
class Range:
    """`option` (section.field, as on the command line) must lie in [low, high] (or the open
    interval at a bound marked open), or be one of `special`; None means unbounded."""

    option: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[Any, ...] = ()
    """Values outside the range with their own meaning (e.g. -1 = all, None = off)."""

    def allowed(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = " and ".join(parts)
        shown = [repr(v) for v in self.special if v is not None]  # None: unset, not typed
        if shown:
            text += " (or " + " or ".join(shown) + ")"
        return text

    def contains(self, value: Any) -> bool:
        if any(type(value) is type(s) and value == s for s in self.special):
            return True
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _positive(option: str, *special: Any) -> Range:
    return Range(option, low=0, low_open=True, special=special)


def _at_least(option: str, low: float, *special: Any) -> Range:
    return Range(option, low=low, special=special)


def _fraction(option: str, *, high_open: bool = False, special: tuple[Any, ...] = ()) -> Range:
    return Range(option, low=0, high=1, high_open=high_open, special=special)


RANGES: tuple[Range, ...] = (
    # [training]
    _at_least("training.seq_len", 1),
    _at_least("training.local_batch_size", 1),
    _at_least("training.global_batch_size", 1, -1),
    _at_least("training.steps", 1),
    _positive("training.max_norm"),
    _at_least("training.gc_freq", 1),
    _at_least("training.dataloader.num_workers", 0),
    _at_least("training.dataloader.prefetch_factor", 1, None),
    # [optimizer] (AdamW, and Muon's group)
    _at_least("optimizer.lr", 0),
    _fraction("optimizer.beta1", high_open=True),
    _fraction("optimizer.beta2", high_open=True),
    _positive("optimizer.eps"),
    _at_least("optimizer.weight_decay", 0),
    _at_least("optimizer.muon_lr", 0),
    _at_least("optimizer.muon_weight_decay", 0, None),
    _fraction("optimizer.muon_momentum", high_open=True),
    _at_least("optimizer.ns_steps", 1),
    _positive("optimizer.ns_eps"),
    # [lr_scheduler]
    _at_least("lr_scheduler.warmup_steps", 0),
    _at_least("lr_scheduler.total_steps", 1, None),
    _fraction("lr_scheduler.decay_ratio", special=(None,)),
    _fraction("lr_scheduler.min_lr_factor"),
    # [moe] (None keeps the flavor's value)
    _at_least("moe.balance_gamma", 0, None),
    _at_least("moe.smebu_lambda", 0, None),
    _fraction("moe.smebu_beta", high_open=True, special=(None,)),
    _positive("moe.smebu_kappa", None),
    _at_least("moe.balance_loss_coeff", 0, None),
    # [loss], [health], [kernels]
    _at_least("loss.z_loss_coeff", 0),
    _positive("health.max_logit_warn", None),
    _at_least("health.maxvio_warn", 0, None),
    _at_least("kernels.loss_chunk_size", 1),
    # [nan_guard]
    _at_least("nan_guard.max_consecutive_skips", 1),
    _at_least("nan_guard.inject_nan_at_step", 0),
    _at_least("nan_guard.inject_nan_steps", 1),
    # [data]
    _at_least("data.rsdb_buffer_docs", 1),
    _at_least("data.seed", 0),
    _at_least("data.snapshot_every_n_batches", 1),
    _at_least("data.validate_head_docs", 1),
    _at_least("data.jsonl_block_bytes", 1),
    _at_least("data.table_block_rows", 1),
    # [checkpoint], [metrics], [comm], [run_lock], [validation]
    _at_least("checkpoint.interval", 1),
    _at_least("checkpoint.keep_latest_k", 2, 0),
    _at_least("checkpoint.load_step", 0, -1),
    _at_least("metrics.log_freq", 1),
    _positive("comm.init_timeout_seconds"),
    _positive("comm.train_timeout_seconds"),
    _positive("run_lock.heartbeat_s"),
    _positive("run_lock.stale_after_s"),
    _at_least("validation.freq", 1),
    _at_least("validation.steps", 1, -1),
    _at_least("validation.local_batch_size", 1),
    _at_least("validation.seq_len", 1),
)
"""The numeric options and their ranges; degrees are checked with the layout (parallel/degrees.py)."""


def _value(job_config: JobConfig, option: str) -> Any:
    value: Any = job_config
    for name in option.split("."):
        value = getattr(value, name)
    return value


def _flag(option: str) -> str:
    return f"--{option}"


def check_option_ranges(job_config: JobConfig) -> None:
    """The first option of `RANGES` out of its range is a ConfigError."""
    for r in RANGES:
        value = _value(job_config, r.option)
        if not r.contains(value):
            section, _, name = r.option.rpartition(".")
            raise ConfigError(
                f"[{section}] {name} = {value!r} is out of range: it must be {r.allowed()}. "
                f"Fix: set {_flag(r.option)} to a value in that range."
            )
    coefficients = job_config.optimizer.ns_coefficients
    if len(coefficients) != 3 or not all(math.isfinite(c) for c in coefficients):
        raise ConfigError(
            f"[optimizer] ns_coefficients = {coefficients!r} must be three finite numbers "
            "(a, b, c) of the quintic Newton-Schulz step. Fix: set them in the TOML, e.g. "
            "ns_coefficients = [3.4445, -4.7750, 2.0315]."
        )


def check_model_limits(job_config: JobConfig, args: TrinityModelArgs) -> None:
    """Options bounded by the flavor: the sequence length."""
    limit = args.context_len
    for option in ("training.seq_len", "validation.seq_len"):
        value = _value(job_config, option)
        if option.startswith("validation") and not job_config.validation.enable:
            continue
        if value > limit:
            section, _, name = option.rpartition(".")
            raise ConfigError(
                f"[{section}] {name} = {value} is longer than flavor "
                f"{job_config.model.flavor!r} supports: it must be <= {limit} (its context "
                f"length). Fix: set {_flag(option)} to at most {limit}."
            )
