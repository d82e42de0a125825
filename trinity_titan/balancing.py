"""Expert-bias balancing, applied once per optimizer step from the step's global token counts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import ParallelDims

from trinity_titan.model.moe import TrinityMoE


def moe_layers(model_parts: list[nn.Module]) -> list[tuple[nn.Module, TrinityMoE]]:
    """(block, moe) pairs in layer order across all model parts."""
    pairs = []
    for part in model_parts:
        for block in part.get_submodule("layers").values():
            if getattr(block, "moe_enabled", False):
                pairs.append((block, block.moe))
    return pairs


def aux_free_update(tokens_per_expert: torch.Tensor, gamma: float) -> torch.Tensor:
    """Bias delta of the aux-loss-free update: gamma * sign(nbar - n), recentred to mean zero."""
    delta = gamma * torch.sign(tokens_per_expert.mean() - tokens_per_expert)
    return delta - delta.mean()


def register_expert_bias_update(
    optimizers: OptimizersContainer, model_parts: list[nn.Module], parallel_dims: ParallelDims
) -> None:
    """Update every MoE layer's expert bias before each optimizer step, identically on all ranks.

    Counts of all micro-batches of the step are summed over the data- and context-parallel ranks
    ("loss" mesh) in one all-reduce, so every rank applies the same bias.
    """
    layers = moe_layers(model_parts)
    if not layers:
        return

    def update(*_args, **_kwargs) -> None:
        counts = torch.stack([_step_counts(block, moe) for block, moe in layers])
        loss_mesh = parallel_dims.get_optional_mesh("loss")
        if loss_mesh is not None:
            dist.all_reduce(counts, group=loss_mesh.get_group())
        with torch.no_grad():
            for (_, moe), n in zip(layers, counts, strict=True):
                if moe.balance_method == "aux_free":
                    moe.expert_bias.add_(aux_free_update(n, moe.balance_gamma))
                moe.tokens_per_expert.zero_()

    optimizers.register_step_pre_hook(update)


def _step_counts(block: nn.Module, moe: TrinityMoE) -> torch.Tensor:
    counts = moe.tokens_per_expert
    if getattr(block, "checkpoint_impl", None) is CheckpointImpl.NO_REENTRANT:
        # Full activation checkpointing re-runs the router in backward: every token is counted twice.
        counts = counts / 2
    return counts.float()
