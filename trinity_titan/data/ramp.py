"""Batch-size ramp: the global batch (in sequences) changes at training-token thresholds.

The report raised Large's batch from 12288 to 16384 sequences after 4.9T tokens. The change is made
by gradient accumulation (micro-batch shape and per-rank rows stay the same), so the LR schedule,
which counts optimizer steps, is untouched, and the trainer's per-step normalisation by the global
count of valid tokens keeps the loss scale right. The position is a function of the tokens seen,
which the trainer checkpoints, so a resumed run is at the same point of the ramp.
"""

from __future__ import annotations

from typing import Any

from trinity_titan.job_config import ConfigError


class BatchRamp:
    """Global batch in sequences as a function of training tokens seen before the step."""

    def __init__(self, initial_global_batch: int, entries: list[dict[str, Any]]):
        entries = sorted(entries, key=lambda e: int(e["tokens"]))
        for e in entries:
            if set(e) != {"tokens", "global_batch_size"}:
                raise ConfigError(
                    f"[[data.batch_ramp]] entry {e}: needs exactly tokens and global_batch_size"
                )
        self.initial = initial_global_batch
        self.thresholds = [int(e["tokens"]) for e in entries]
        self.sizes = [int(e["global_batch_size"]) for e in entries]

    @classmethod
    def from_job_config(cls, job_config, dp_degree: int) -> BatchRamp:
        training = job_config.training
        initial = training.global_batch_size
        if initial < 0:
            initial = training.local_batch_size * dp_degree
        return cls(initial, list(job_config.data.batch_ramp))

    def global_batch_at(self, tokens: int) -> int:
        size = self.initial
        for threshold, s in zip(self.thresholds, self.sizes, strict=True):
            if tokens >= threshold:
                size = s
        return size

    def grad_accum_at(self, tokens: int, local_batch_size: int, dp_degree: int) -> int:
        size = self.global_batch_at(tokens)
        return self.grad_accum_for(size, local_batch_size, dp_degree)

    @staticmethod
    def grad_accum_for(size: int, local_batch_size: int, dp_degree: int) -> int:
        per_micro = local_batch_size * dp_degree
        if size <= 0 or size % per_micro:
            raise ConfigError(
                f"global batch {size} is not a positive multiple of training.local_batch_size x "
                f"the data-parallel degree ({local_batch_size} x {dp_degree}); change "
                "--training.global_batch_size, the [[data.batch_ramp]] sizes or the local batch"
            )
        return size // per_micro

    def validate(self, local_batch_size: int, dp_degree: int) -> None:
        for size in [self.initial, *self.sizes]:
            self.grad_accum_for(size, local_batch_size, dp_degree)
