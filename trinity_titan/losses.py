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
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from trinity_titan.kernels import LossTerms
from trinity_titan.model.flavors import trinity_flavors


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
    """Detached statistics of the micro-batches of the last finished training step on this rank.

    A step ends at the optimizer step (`close_step`, an optimizer pre-step hook), so the number of
    micro-batches may change from step to step (the batch-size ramp changes it).
    """

    def __init__(self) -> None:
        self.vocab_size = 0
        self._current: list[LossTerms] = []
        self.microbatches: list[LossTerms] = []
        """The finished step's micro-batches (what the metrics report)."""

    def record(self, terms: LossTerms, vocab_size: int) -> None:
        """Keep a detached copy of one micro-batch's terms; vocab_size 0 means unknown."""
        self.vocab_size = vocab_size
        self._current.append(
            LossTerms(*(getattr(terms, name).detach() for name in LossTerms._fields))
        )

    def close_step(self) -> None:
        self.microbatches, self._current = self._current, []

    def discard_step(self) -> None:
        """Drop the running step's micro-batches (a step whose update was skipped)."""
        self._current = []


def register_loss_stats_step(optimizers: Any) -> None:
    """Close the loss statistics of a step when its optimizer step runs."""

    def close(*_args: Any, **_kwargs: Any) -> None:
        if active_loss_stats is not None:
            active_loss_stats.close_step()

    optimizers.register_step_pre_hook(close)


class TrinityLoss:
    """loss_fn(pred, labels) -> summed CE + z-loss; records the step's statistics in `stats`."""

    def __init__(
        self,
        z_loss_coeff: float,
        stats: LossStats,
        compile_backend: str | None = None,
        vocab_size: int = 0,
    ):
        self.z_loss_coeff = z_loss_coeff
        self.vocab_size = vocab_size
        """The model's vocabulary (a fused loss hands over terms, not logits); 0: unknown."""
        self.stats = stats
        self.last_terms: dict[str, torch.Tensor] = {}
        """The last micro-batch's detached terms, by name (the NaN guard reports which went bad)."""
        self._terms = loss_terms_from_logits
        if compile_backend is not None:
            logger.info("Compiling the loss function with torch.compile")
            self._terms = torch.compile(loss_terms_from_logits, backend=compile_backend)

    def __call__(self, pred: Any, labels: torch.Tensor) -> torch.Tensor:
        if hasattr(pred, "loss_sum"):
            terms, vocab = pred, self.vocab_size
        else:
            terms, vocab = self._terms(pred, labels, self.z_loss_coeff), pred.shape[-1]
        if torch.is_grad_enabled():  # training, not validation
            self.stats.record(terms, vocab)
        self.last_terms = {"ce": terms.ce_sum, "z_loss": terms.z_sum}
        return terms.loss_sum


active_loss_stats: LossStats | None = None
"""Statistics of the loss built last in this process (read by trinity_titan.metrics)."""


def build_trinity_loss(
    job_config: JobConfig, parallel_dims: ParallelDims | None = None, **kwargs
) -> TrinityLoss:
    global active_loss_stats
    loss_cfg = getattr(job_config, "loss", None)
    z_coeff = 1e-6 if loss_cfg is None else loss_cfg.z_loss_coeff
    active_loss_stats = LossStats()
    compile_loss = job_config.compile.enable and "loss" in job_config.compile.components
    flavor = trinity_flavors.get(job_config.model.flavor)
    return TrinityLoss(
        z_coeff,
        active_loss_stats,
        job_config.compile.backend if compile_loss else None,
        vocab_size=flavor.vocab_size if flavor is not None else 0,
    )
