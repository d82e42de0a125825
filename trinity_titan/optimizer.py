"""Optimizer builder of the Trinity TrainSpec: Muon + AdamW (`name = "Muon"`) or TorchTitan's AdamW."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from trinity_titan.balancing import register_expert_bias_update
from trinity_titan.losses import register_loss_stats_step
from trinity_titan.muon import HybridMuon

EMBEDDING_AND_HEAD = ("tok_embeddings", "output")


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by optimizer group, in model order.

    'muon': every matrix but the embedding and LM head (attention, dense and shared SwiGLU,
    routed experts [E, out, in], router); 'adamw': embedding and LM head; 'adamw_no_decay': 1-D
    parameters (the norms), which never get weight decay.
    """
    embedding_and_head = {
        id(p)
        for name in EMBEDDING_AND_HEAD
        if getattr(model, name, None) is not None
        for p in getattr(model, name).parameters()
    }
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_and_head:
            groups["adamw"].append(p)
        elif p.ndim >= 2:
            groups["muon"].append(p)
        else:
            groups["adamw_no_decay"].append(p)
    return groups


def muon_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict[str, Any]]:
    """HybridMuon's parameter groups for one model part; empty groups are left out."""
    params = split_parameters(model)
    muon_wd = config.muon_weight_decay
    groups = [
        {
            "params": params["muon"],
            "use_muon": True,
            "lr": config.muon_lr,
            "weight_decay": config.weight_decay if muon_wd is None else muon_wd,
        },
        {"params": params["adamw"], "use_muon": False, "weight_decay": config.weight_decay},
        {"params": params["adamw_no_decay"], "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def muon_defaults(config: OptimizerConfig) -> dict[str, Any]:
    """HybridMuon's keyword defaults from `[optimizer]` (AdamW's lr, betas, eps; Muon's options)."""
    return {
        "lr": config.lr,
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


class MuonOptimizersContainer(OptimizersContainer):
    """One HybridMuon per model part, so TorchTitan's checkpointing and LR schedulers see all groups."""

    def __init__(self, model_parts: list[nn.Module], config: OptimizerConfig) -> None:
        defaults = muon_defaults(config)
        self.model_parts = model_parts
        self.optimizers = []
        all_params: list[nn.Parameter] = []
        for model in model_parts:
            groups = muon_param_groups(model, config)
            self.optimizers.append(HybridMuon(groups, **defaults))
            all_params.extend(p for g in groups for p in g["params"])
        self._validate_length(len(model_parts))
        self._post_init(all_params, defaults)


def build_trinity_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    if optimizer_config.name == "Muon":
        if optimizer_config.early_step_in_backward:
            raise NotImplementedError("Muon needs whole gradients: no early_step_in_backward")
        if ft_manager is not None and ft_manager.enabled:
            raise NotImplementedError("Muon does not support TorchFT yet")
        optimizers = MuonOptimizersContainer(model_parts, optimizer_config)
    else:
        optimizers = build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    register_expert_bias_update(optimizers, model_parts, parallel_dims)
    register_loss_stats_step(optimizers)
    return optimizers
