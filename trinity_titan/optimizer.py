"""Optimizer builder of the Trinity TrainSpec."""

from __future__ import annotations

from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from trinity_titan.balancing import register_expert_bias_update


def build_trinity_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    optimizers = build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    register_expert_bias_update(optimizers, model_parts, parallel_dims)
    return optimizers
