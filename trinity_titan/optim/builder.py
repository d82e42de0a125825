"""Optimizer builder of the Trinity TrainSpec: Muon + AdamW (`name = "Muon"`) or TorchTitan's AdamW."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import (
    FTOptimizersContainer,
    OptimizersContainer,
    build_optimizers,
)
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from trinity_titan.optim.muon import HybridMuon

EMBEDDING_AND_HEAD = ("tok_embeddings", "output")


def embedding_and_head_parameters(model: nn.Module) -> set[int]:
    """ids of the embedding's and LM head's parameters (AdamW with weight decay under Muon)."""
    return {
        id(p)
        for name, child in model.named_children()
        if name in EMBEDDING_AND_HEAD
        for p in child.parameters()
    }


def split_parameters(
    params: list[nn.Parameter], embedding_and_head: set[int]
) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by optimizer group, in model order.

    'muon': every matrix but the embedding and LM head (attention, dense and shared SwiGLU,
    routed experts [E, out, in], router); 'adamw': embedding and LM head; 'adamw_no_decay': 1-D
    parameters (the norms), which never get weight decay.
    """
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    for p in params:
        if not p.requires_grad:
            continue
        if id(p) in embedding_and_head:
            groups["adamw"].append(p)
        elif p.ndim >= 2:
            groups["muon"].append(p)
        else:
            groups["adamw_no_decay"].append(p)
    return groups


def muon_param_groups(
    params: list[nn.Parameter], embedding_and_head: set[int], config: OptimizerConfig
) -> list[dict[str, Any]]:
    """HybridMuon's parameter groups for one model part; empty groups are left out."""
    split = split_parameters(params, embedding_and_head)
    muon_wd = config.muon_weight_decay
    groups = [
        {
            "params": split["muon"],
            "use_muon": True,
            "lr": config.muon_lr,
            "weight_decay": config.weight_decay if muon_wd is None else muon_wd,
        },
        {"params": split["adamw"], "use_muon": False, "weight_decay": config.weight_decay},
        {"params": split["adamw_no_decay"], "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def muon_defaults(config: OptimizerConfig) -> dict[str, Any]:
    """HybridMuon's keyword defaults from `[optimizer]` (AdamW's lr, betas, eps; Muon's options)."""
    return {
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "betas": (config.beta1, config.beta2),
        "eps": config.eps,
        "momentum": config.muon_momentum,
        "nesterov": config.muon_nesterov,
        "ns_steps": config.ns_steps,
        "ns_coefficients": tuple(config.ns_coefficients),
        "ns_eps": config.ns_eps,
        "ns_dtype": config.ns_dtype,
        "adjust_lr": config.muon_adjust_lr,
    }


def _hybrid_muon(
    params: list[nn.Parameter],
    *,
    embedding_and_head: set[int],
    config: OptimizerConfig,
    **defaults: Any,
) -> HybridMuon:
    """One model part's HybridMuon (TorchTitan's container hands it the part's parameters)."""
    return HybridMuon(muon_param_groups(params, embedding_and_head, config), **defaults)


class MuonOptimizersContainer(OptimizersContainer):
    """One HybridMuon per model part, built by TorchTitan's container, so its checkpointing and LR
    schedulers see all groups."""

    def __init__(self, model_parts: list[nn.Module], config: OptimizerConfig) -> None:
        embedding_and_head = set().union(*map(embedding_and_head_parameters, model_parts))
        make = functools.partial(_hybrid_muon, embedding_and_head=embedding_and_head, config=config)
        super().__init__(model_parts, make, muon_defaults(config))


class MuonFTOptimizersContainer(FTOptimizersContainer):
    """One HybridMuon per model part in TorchTitan's torchft container: the Muon and AdamW groups
    take the path TorchTitan's optimizers take under `[fault_tolerance]` (the step waits for
    torchft's commit vote; the state, cached for healing, is what a restarted group receives)."""

    def __init__(
        self, model_parts: list[nn.Module], config: OptimizerConfig, ft_manager: FTManager
    ) -> None:
        embedding_and_head = set().union(*map(embedding_and_head_parameters, model_parts))
        make = functools.partial(_hybrid_muon, embedding_and_head=embedding_and_head, config=config)
        super().__init__(
            model_parts,
            make,
            muon_defaults(config),
            ft_manager.manager,
            use_ft_optimizer=ft_manager.use_async_quorum,
        )


def build_trinity_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    """Muon + AdamW for `name = "Muon"`, TorchTitan's own optimizers otherwise; under torchft,
    in TorchTitan's torchft container either way."""
    if optimizer_config.name == "Muon":
        if optimizer_config.early_step_in_backward:
            raise NotImplementedError("Muon needs whole gradients: no early_step_in_backward")
        if ft_manager is not None and ft_manager.enabled:
            return MuonFTOptimizersContainer(model_parts, optimizer_config, ft_manager)
        return MuonOptimizersContainer(model_parts, optimizer_config)
    return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
