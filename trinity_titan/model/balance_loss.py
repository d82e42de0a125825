"""Sequence-wise balance loss (Trinity Large): alpha * sum_i f_i P_i per sequence, mean over sequences.

f_i counts how often expert i is in a token's top-k (a constant: no gradient); P_i is the mean over
the sequence of the normalised sigmoid scores s_i / sum_j s_j, so the gradient reaches the router only.

The loss enters training through `add_aux_loss`: an identity on the MoE output whose backward also
sends a gradient of 1 into the loss, i.e. the loss is added to the training objective without a
change to the model's forward signature or to TorchTitan's loss function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BalanceLossLayout:
    """How one MoE layer's balance loss fits the parallel layout (set by the parallelizer; the
    model knows no layout). The default is one rank holding whole sequences."""

    seq_weight: float | None = None
    """Weight of one sequence: 1 / sequences in the global batch. None: the mean over this
    forward's sequences."""
    reduce_hits: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Sums the [batch, experts] top-k hits over ranks holding other tokens of the same
    sequences (context parallelism); see `sequence_balance_loss`."""
    grad_scale: float = 1.0
    """Gradient of the loss on this rank: 1 / tp where every TP rank computes the same loss."""


def sequence_balance_loss(
    scores: torch.Tensor,
    selected: torch.Tensor,
    reduce_hits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sequence sum_i f_i P_i (alpha not applied).

    scores: [B, T, E] sigmoid router scores (unbiased); selected: [B, T, K] top-k expert indices
    (chosen on scores + bias). Returns [B] (fp32).

    `reduce_hits` sums the [B, E] top-k hit counts over the ranks that hold the other tokens of
    the same sequences (context parallelism). f_i and the sequence length then come from whole
    sequences and P_i sums this rank's tokens only: the result is this rank's share of each
    sequence's loss, and the shares add up over those ranks to the whole-sequence value.
    """
    num_experts, top_k = scores.shape[-1], selected.shape[-1]
    batch = scores.shape[0]
    with torch.no_grad():
        hits = torch.zeros(batch, num_experts, dtype=torch.float32, device=scores.device)
        hits.scatter_add_(
            1,
            selected.reshape(batch, -1),
            torch.ones_like(selected.reshape(batch, -1), dtype=hits.dtype),
        )
        if reduce_hits is not None:
            hits = reduce_hits(hits)
        seq_len = hits.sum(dim=-1, keepdim=True) / top_k  # tokens of the whole sequence
        f = hits * (num_experts / top_k) / seq_len
    scores = scores.float()
    p = (scores / scores.sum(dim=-1, keepdim=True)).sum(dim=1) / seq_len
    return (f * p).sum(dim=-1)


class _AddAuxLoss(torch.autograd.Function):
    """Returns `x`; in backward, `aux` gets gradient `scale` (as if `scale * aux` had been added
    to the loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_aux = torch.full(
            ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device
        )
        return grad_output, grad_aux, None


def add_aux_loss(x: torch.Tensor, aux: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """Identity on `x` that adds `grad_scale` x the scalar `aux` to whatever loss `x` flows into."""
    return _AddAuxLoss.apply(x, aux, grad_scale)
