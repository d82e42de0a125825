"""Trinity's untied LM head: logits, or (given labels) the fused linear cross-entropy terms."""

from __future__ import annotations

import torch
from torch import nn
from torchtitan.components.loss import IGNORE_INDEX

from trinity_titan.kernels import LossTerms, fused_linear_cross_entropy
from trinity_titan.model.args import TrinityModelArgs


class TrinityLMHead(nn.Linear):
    """nn.Linear(dim, vocab, bias=False) whose forward also takes labels.

    The loss is computed inside this module's forward so that data parallel wrappers (FSDP2
    all-gathers parameters in the module's pre-forward hook) hand it the full weight.
    """

    def __init__(self, args: TrinityModelArgs) -> None:
        super().__init__(args.dim, args.vocab_size, bias=False)
        self.backend = args.kernel_backend
        self.z_loss_coeff = args.z_loss_coeff
        self.chunk_size = args.loss_chunk_size
        self.logit_stats = args.fused_logit_stats

    def forward(
        self, h: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | LossTerms:
        """h [..., dim] -> logits [..., vocab]; with labels [...] -> summed `LossTerms`."""
        if labels is None:
            return super().forward(h)
        return fused_linear_cross_entropy(
            h,
            self.weight,
            labels,
            z_loss_coeff=self.z_loss_coeff,
            ignore_index=IGNORE_INDEX,
            chunk_size=self.chunk_size,
            backend=self.backend,
            logit_stats=self.logit_stats,
        )
