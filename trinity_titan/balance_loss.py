"""Sequence-wise balance loss (Trinity Large): alpha * sum_i f_i P_i per sequence, mean over sequences.

f_i counts how often expert i is in a token's top-k (a constant: no gradient); P_i is the mean over
the sequence of the normalised sigmoid scores s_i / sum_j s_j, so the gradient reaches the router only.

The loss enters training through `add_aux_loss`: an identity on the MoE output whose backward also
sends a gradient of 1 into the loss, i.e. the loss is added to the training objective without a
change to the model's forward signature or to TorchTitan's loss function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed._functional_collectives as funcol


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


def global_batch_sequences(job_config, parallel_dims) -> int:
    """Sequences per optimizer step over all data-parallel ranks (TorchTitan's global batch)."""
    global_batch = job_config.training.global_batch_size
    if global_batch < 0:
        batch_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
        global_batch = job_config.training.local_batch_size * batch_degree
    return global_batch


def configure_balance_loss(model: torch.nn.Module, job_config, parallel_dims) -> None:
    """Fit every MoE layer's balance loss to the parallel layout (the model knows none).

    - Sequence weight 1 / (sequences in the global batch). Every micro-batch on every rank adds
      alpha * weight * sum of its sequences' losses; gradients are summed over micro-batches and
      ranks, so the objective gets alpha * (mean over the global batch), consistent with
      TorchTitan's cross-entropy (summed, divided by the global token count).
    - Context parallelism: each CP rank holds a part of every sequence. Its top-k hit counts are
      summed over the CP group (a [batch, experts] all-reduce per MoE layer, forward only), and
      each rank adds its share of the loss (see `sequence_balance_loss`).
    - Tensor parallelism: every TP rank computes the whole loss on the same tokens, and the
      router's output gradient is summed over TP (trinity_titan.moe_tensor_parallel), so each
      rank back-propagates 1 / tp of it.
    """
    weight = 1.0 / global_batch_sequences(job_config, parallel_dims)
    cp_mesh = parallel_dims.get_optional_mesh("cp")
    reduce_hits = None
    if cp_mesh is not None:

        def reduce_hits(hits: torch.Tensor) -> torch.Tensor:
            return funcol.all_reduce(hits, "sum", cp_mesh)

    for module in model.modules():
        if hasattr(module, "balance_loss_seq_weight"):
            module.balance_loss_seq_weight = weight
            module.balance_hits_reducer = reduce_hits
            module.balance_loss_grad_scale = 1.0 / parallel_dims.tp
