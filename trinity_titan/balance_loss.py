"""Sequence-wise balance loss (Trinity Large): alpha * sum_i f_i P_i per sequence, mean over sequences.

f_i counts how often expert i is in a token's top-k (a constant: no gradient); P_i is the mean over
the sequence of the normalised sigmoid scores s_i / sum_j s_j, so the gradient reaches the router only.

The loss enters training through `add_aux_loss`: an identity on the MoE output whose backward also
sends a gradient of 1 into the loss, i.e. the loss is added to the training objective without a
change to the model's forward signature or to TorchTitan's loss function.
"""

from __future__ import annotations

import torch


def sequence_balance_loss(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum_i f_i P_i (alpha not applied).

    scores: [B, T, E] sigmoid router scores (unbiased); selected: [B, T, K] top-k expert indices
    (chosen on scores + bias). Returns [B] (fp32).
    """
    batch, seq_len, num_experts = scores.shape
    top_k = selected.shape[-1]
    with torch.no_grad():
        hits = torch.zeros(batch, num_experts, dtype=torch.float32, device=scores.device)
        hits.scatter_add_(
            1,
            selected.reshape(batch, -1),
            torch.ones_like(selected.reshape(batch, -1), dtype=hits.dtype),
        )
        f = hits * (num_experts / (top_k * seq_len))
    scores = scores.float()
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1)


class _AddAuxLoss(torch.autograd.Function):
    """Returns `x`; in backward, `aux` gets gradient 1 (as if `aux` had been added to the loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_aux = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, grad_aux


def add_aux_loss(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Identity on `x` that adds the scalar `aux` to whatever loss `x` flows into."""
    return _AddAuxLoss.apply(x, aux)


def global_batch_sequences(job_config, parallel_dims) -> int:
    """Sequences per optimizer step over all data-parallel ranks (TorchTitan's global batch)."""
    global_batch = job_config.training.global_batch_size
    if global_batch < 0:
        batch_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
        global_batch = job_config.training.local_batch_size * batch_degree
    return global_batch


def set_balance_loss_weight(model: torch.nn.Module, job_config, parallel_dims) -> None:
    """Weight each sequence by 1 / (sequences in the global batch).

    Every micro-batch on every rank adds alpha * weight * sum of its sequences' losses; gradients
    are summed over micro-batches and ranks, so the objective gets alpha * (mean over the global
    batch), consistent with TorchTitan's cross-entropy (summed, divided by the global token count).
    """
    weight = 1.0 / global_batch_sequences(job_config, parallel_dims)
    for module in model.modules():
        if hasattr(module, "balance_loss_seq_weight"):
            module.balance_loss_seq_weight = weight
