"""Trinity's untied LM head: logits, or (given labels) the fused linear cross-entropy terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchtitan.components.loss import IGNORE_INDEX

from trinity_titan.kernels import LossTerms, fused_linear_cross_entropy


@dataclass(frozen=True)
class FusedLoss:
    """How the head computes the fused loss: the job's `[loss]` and `[kernels]` settings, handed
    to the model with the labels by Trinity's trainer (the model's args hold no loss settings)."""

    z_loss_coeff: float
    chunk_size: int
    logit_stats: bool


class TrinityLMHead(nn.Linear):
    """nn.Linear(dim, vocab, bias=False) whose forward also takes labels.

    The loss is computed inside this module's forward so that data parallel wrappers (FSDP2
    all-gathers parameters in the module's pre-forward hook) hand it the full weight.
    """

    def __init__(self, dim: int, vocab_size: int, backend: str) -> None:
        super().__init__(dim, vocab_size, bias=False)
        self.backend = backend

    def forward(
        self, h: torch.Tensor, labels: torch.Tensor | None = None, loss: FusedLoss | None = None
    ) -> torch.Tensor | LossTerms:
        """h [..., dim] -> logits [..., vocab]; with labels [...] and `loss` -> summed `LossTerms`."""
        if labels is None:
            return super().forward(h)
        if loss is None:
            raise ValueError("the fused loss needs its settings (FusedLoss) with the labels")
        return fused_linear_cross_entropy(
            h,
            self.weight,
            labels,
            z_loss_coeff=loss.z_loss_coeff,
            ignore_index=IGNORE_INDEX,
            chunk_size=loss.chunk_size,
            backend=self.backend,
            logit_stats=loss.logit_stats,
        )
