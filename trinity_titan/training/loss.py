"""Training loss: cross-entropy + z-loss, with per-micro-batch statistics for the metrics.

TorchTitan's trainer calls `loss_fn(pred, labels)` once per micro-batch and expects a SUM over valid
tokens (it divides by the global count of valid tokens). `pred` is either the logits or an already
computed `LossTerms` (a fused linear cross-entropy produces one). The z-loss is
coef * mean_t logsumexp(logits_t)^2; with coef = 0 the loss is exactly TorchTitan's cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

from trinity_titan.kernels import LossTerms


def loss_terms_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_coeff: float,
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """Cross-entropy (sum) + z_loss_coeff * sum lse^2 from logits [..., V] and labels [...]."""
    logits = logits.flatten(0, -2).float()
    labels = labels.flatten()
    ce_sum = F.cross_entropy(logits, labels, reduction="sum", ignore_index=ignore_index)
    valid = labels != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    z_sum = torch.where(valid, lse.square(), 0.0).sum()
    loss_sum = ce_sum + z_loss_coeff * z_sum if z_loss_coeff else ce_sum
    with torch.no_grad():
        row_max = logits.amax(dim=-1)
        logit_max = torch.where(valid, row_max, float("-inf")).max()
        logit_sum = torch.where(valid, logits.sum(dim=-1), 0.0).sum()
    return LossTerms(
        loss_sum=loss_sum,
        ce_sum=ce_sum.detach(),
        z_sum=z_sum.detach(),
        logit_max=logit_max,
        logit_sum=logit_sum,
        num_valid=valid.sum(),
    )


class LossStats:
    """Detached loss terms of this rank's micro-batches: the running step's and the last finished
    step's. The owner closes a step at its optimizer step (`close_step`), so the number of
    micro-batches may change from step to step (the batch-size ramp changes it)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        """The model's vocabulary (for the mean logit)."""
        self.running: list[LossTerms] = []
        """The running step's micro-batches (what the NaN guard checks)."""
        self.microbatches: list[LossTerms] = []
        """The finished step's micro-batches (what the metrics report)."""

    def record(self, terms: LossTerms) -> None:
        """Keep a detached copy of one micro-batch's terms."""
        self.running.append(LossTerms(*(t.detach() for t in terms)))

    def close_step(self) -> None:
        self.microbatches, self.running = self.running, []

    def discard_step(self) -> None:
        """Drop the running step's micro-batches (a step whose update was skipped)."""
        self.running = []


class TrinityLoss:
    """loss_fn(pred, labels) -> summed CE + z-loss; records training micro-batches in `stats`."""

    def __init__(
        self,
        z_loss_coeff: float,
        stats: LossStats | None = None,
        compile_backend: str | None = None,
    ) -> None:
        self.z_loss_coeff = z_loss_coeff
        self.stats = stats
        self._terms = loss_terms_from_logits
        if compile_backend is not None:
            logger.info("Compiling the loss function with torch.compile")
            self._terms = torch.compile(loss_terms_from_logits, backend=compile_backend)

    def __call__(self, pred: torch.Tensor | LossTerms, labels: torch.Tensor) -> torch.Tensor:
        terms = (
            pred if isinstance(pred, LossTerms) else self._terms(pred, labels, self.z_loss_coeff)
        )
        if self.stats is not None and torch.is_grad_enabled():  # training, not validation
            self.stats.record(terms)
        return terms.loss_sum


def build_trinity_loss(
    job_config: Any, parallel_dims: Any = None, stats: LossStats | None = None, **kwargs: Any
) -> TrinityLoss:
    """The TrainSpec's loss builder; `stats` is the statistics owner Trinity's trainer hands in."""
    compile_loss = job_config.compile.enable and "loss" in job_config.compile.components
    return TrinityLoss(
        job_config.loss.z_loss_coeff,
        stats,
        job_config.compile.backend if compile_loss else None,
    )
