"""Expert-bias balancing, applied once per optimizer step from the step's global token counts.

`none`, the aux-loss-free sign update (nano, mini) and SMEBU (large) are the pure functions below;
`register_expert_bias_update` applies the selected one to every MoE layer in an optimizer pre-step
hook. It also keeps the step's global counts and balance-loss values on each MoE module
(`last_step_counts`, `last_balance_loss`) for the metrics (trinity_titan.metrics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import ParallelDims

from trinity_titan.model.moe import TrinityMoE


def moe_layers(model_parts: list[nn.Module]) -> list[tuple[str, TrinityMoE]]:
    """(layer id, moe) pairs in layer order across all model parts."""
    pairs = []
    for part in model_parts:
        for layer_id, block in part.get_submodule("layers").items():
            if getattr(block, "moe_enabled", False):
                pairs.append((layer_id, block.moe))
    return pairs


def aux_free_update(counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free bias step db_i = gamma * sign(nbar - n_i); the caller recentres b after b += db."""
    return gamma * torch.sign(counts.mean() - counts)


def smebu_update(
    counts: torch.Tensor, momentum: torch.Tensor, lam: float, beta: float, kappa: float
) -> torch.Tensor:
    """SMEBU: the new momentum m, which is also the bias step (b += m).

    v_i = (nbar - n_i) / nbar; db_i = lam * tanh(kappa v_i); db -= mean(db);
    m_i = beta m_i + (1 - beta) db_i.
    """
    nbar = counts.mean()
    v = (nbar - counts) / nbar.clamp_min(torch.finfo(counts.dtype).tiny)
    db = lam * torch.tanh(kappa * v)
    db = db - db.mean()
    return beta * momentum + (1 - beta) * db


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i (n_i - nbar) / nbar (0 when no token was routed)."""
    nbar = counts.mean()
    return (counts.max() - nbar) / nbar.clamp_min(torch.finfo(counts.dtype).tiny)


def apply_bias_update(moe: TrinityMoE, counts: torch.Tensor) -> None:
    """Update `moe.expert_bias` (and SMEBU's momentum) in place from the step's global counts."""
    method = moe.balance_method
    bias = moe.expert_bias
    if method == "none":
        return
    if method == "aux_free":
        bias.add_(aux_free_update(counts, moe.balance_gamma).to(bias.dtype))
        bias.sub_(bias.mean())
    elif method == "smebu":
        m = smebu_update(
            counts,
            moe.expert_bias_momentum.to(counts.dtype),
            moe.smebu_lambda,
            moe.smebu_beta,
            moe.smebu_kappa,
        )
        moe.expert_bias_momentum.copy_(m)
        bias.add_(m.to(bias.dtype))
    else:
        raise ValueError(f"unknown balance_method {method!r} (none, aux_free, smebu)")


def register_expert_bias_update(
    optimizers: OptimizersContainer, model_parts: list[nn.Module], parallel_dims: ParallelDims
) -> None:
    """Update every MoE layer's expert bias before each optimizer step, identically on all ranks.

    The counts of all micro-batches of the step (and the balance-loss values) are summed in one
    all-reduce over the ranks that see different tokens: dp_replicate x dp_shard x cp, TorchTitan's
    "loss" mesh. Expert-parallel ranks are carved out of dp_shard x cp and count their own tokens
    before dispatch, so they are covered too; tensor-parallel ranks see the same tokens.
    """
    layers = moe_layers(model_parts)
    if not layers:
        return

    def update(*_args, **_kwargs) -> None:
        with torch.no_grad():
            stacked = torch.stack(
                [
                    torch.cat([moe.tokens_per_expert.double(), moe.balance_loss_sum.double()[None]])
                    for _, moe in layers
                ]
            )
            loss_mesh = parallel_dims.get_optional_mesh("loss")
            if loss_mesh is not None:
                dist.all_reduce(stacked, group=loss_mesh.get_group())
            for (_, moe), row in zip(layers, stacked, strict=True):
                counts = row[:-1]
                moe.last_step_counts = counts.clone()
                moe.last_balance_loss = row[-1].clone()
                apply_bias_update(moe, counts)
                moe.tokens_per_expert.zero_()
                moe.balance_loss_sum.zero_()

    optimizers.register_step_pre_hook(update)
