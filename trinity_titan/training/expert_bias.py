"""Expert-bias balancing, applied once per optimizer step from the step's global token counts.

`none`, the aux-loss-free sign update (nano, mini) and SMEBU (large) are the pure functions below.
`ExpertBiasBalancer` owns the rest: the optimizer pre-step hook that sums every MoE layer's counts
(and balance-loss values) over the ranks, applies the update, and keeps the step's results for the
metrics (`metrics()`), and `discard_step()` for a step whose update was skipped (NaN guard).
Under torchft the sum also spans the live replica groups, so that every group applies the same
update; the sum (`gather`) and the update (`apply`) are then run on either side of torchft's
commit vote (see compat/torchft.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.distributed import ParallelDims

from trinity_titan.compat.torchft import ReplicaGroups
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.moe import TrinityMoE


def moe_layers(model_parts: list[nn.Module]) -> list[tuple[str, TrinityMoE]]:
    """(layer id, moe) pairs in layer order across all model parts."""
    pairs = []
    for part in model_parts:
        for layer_id, block in part.get_submodule("layers").items():
            if block.moe_enabled:
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


@dataclass(frozen=True)
class BalanceSettings:
    """The flavor's balancing method and constants (after the `[moe]` overrides)."""

    method: str
    gamma: float
    smebu_lambda: float
    smebu_beta: float
    smebu_kappa: float

    @classmethod
    def from_model_args(cls, args: TrinityModelArgs) -> BalanceSettings:
        return cls(
            args.balance_method,
            args.balance_gamma,
            args.smebu_lambda,
            args.smebu_beta,
            args.smebu_kappa,
        )


def apply_bias_update(moe: TrinityMoE, counts: torch.Tensor, settings: BalanceSettings) -> None:
    """Update `moe.expert_bias` (and SMEBU's momentum) in place from the step's global counts."""
    bias = moe.expert_bias
    if settings.method == "none":
        return
    if settings.method == "aux_free":
        bias.add_(aux_free_update(counts, settings.gamma).to(bias.dtype))
        bias.sub_(bias.mean())
    elif settings.method == "smebu":
        m = smebu_update(
            counts,
            moe.expert_bias_momentum.to(counts.dtype),
            settings.smebu_lambda,
            settings.smebu_beta,
            settings.smebu_kappa,
        )
        moe.expert_bias_momentum.copy_(m)
        bias.add_(m.to(bias.dtype))
    else:
        raise ValueError(f"unknown balance_method {settings.method!r} (none, aux_free, smebu)")


class ExpertBiasBalancer:
    """Updates every MoE layer's expert bias before each optimizer step, identically on all ranks.

    The counts of all micro-batches of the step (and the balance-loss values) are summed in one
    all-reduce over the ranks that see different tokens: dp_replicate x dp_shard x cp, TorchTitan's
    "loss" mesh. Expert-parallel ranks are carved out of dp_shard x cp and count their own tokens
    before dispatch, so they are covered too; tensor-parallel ranks see the same tokens. Under
    torchft, the "loss" mesh spans one replica group: the sum then also runs across the live
    groups (`replica_groups`), or the groups' biases would drift apart.
    """

    def __init__(
        self,
        model_parts: list[nn.Module],
        parallel_dims: ParallelDims,
        replica_groups: ReplicaGroups | None = None,
    ) -> None:
        self.layers = moe_layers(model_parts)
        self.parallel_dims = parallel_dims
        self.replica_groups = replica_groups
        self.settings = (
            BalanceSettings.from_model_args(model_parts[0].model_args) if self.layers else None
        )
        self.last_counts: torch.Tensor | None = None
        """[layers, experts] global token counts of the last finished step (fp64)."""
        self.last_balance_loss: torch.Tensor | None = None
        """[layers] balance-loss values (alpha applied) of the last finished step (fp64)."""

    def attach(self, optimizers: Any) -> ExpertBiasBalancer:
        """Run the update before every step of `optimizers` (a torch Optimizer or container)."""
        if self.layers:
            optimizers.register_step_pre_hook(lambda *_args, **_kwargs: self.update())
        return self

    @torch.no_grad()
    def update(self) -> None:
        """Sum the step's counts over the ranks, update every bias, start the next step."""
        self.apply(self.gather())

    @torch.no_grad()
    def gather(self) -> torch.Tensor | None:
        """The step's [layers, experts + 1] counts and balance-loss sums (last column), summed
        over the ranks that see different tokens and the live replica groups; the balance-loss
        column is then divided by the live groups (each group's is its own batch's mean). None
        without MoE layers."""
        if not self.layers:
            return None
        stacked = torch.stack(
            [
                torch.cat([moe.tokens_per_expert.double(), moe.balance_loss_sum.double()[None]])
                for _, moe in self.layers
            ]
        )
        loss_mesh = self.parallel_dims.get_optional_mesh("loss")
        if loss_mesh is not None:
            dist.all_reduce(stacked, group=loss_mesh.get_group())
        if self.replica_groups is not None:
            self.replica_groups.all_reduce(stacked)
            stacked[:, -1] /= max(1, self.replica_groups.participants())
        return stacked

    @torch.no_grad()
    def apply(self, stacked: torch.Tensor | None) -> None:
        """Update every bias from gathered counts (`gather`), keep them for the metrics, and
        start the next step."""
        if stacked is None:
            return
        self.last_counts, self.last_balance_loss = stacked[:, :-1], stacked[:, -1]
        for (_, moe), counts in zip(self.layers, self.last_counts, strict=True):
            apply_bias_update(moe, counts, self.settings)
        self.discard_step()

    @torch.no_grad()
    def discard_step(self) -> None:
        """Forget the running step's counts and balance-loss values (also after a skipped step)."""
        for _, moe in self.layers:
            moe.tokens_per_expert.zero_()
            moe.balance_loss_sum.zero_()

    def layer_stats(self) -> RouterStats | None:
        """Router statistics of the last finished step, per MoE layer, on the host (None before
        the first step). One device-to-host copy for all layers."""
        if self.last_counts is None:
            return None
        experts = self.last_counts.shape[1]
        bias = torch.stack([moe.expert_bias.double() for _, moe in self.layers])
        host = torch.cat([self.last_counts, bias, self.last_balance_loss[:, None]], dim=1).cpu()
        return RouterStats(
            layer_ids=[int(layer_id) for layer_id, _ in self.layers],
            counts=host[:, :experts],
            bias=host[:, experts:-1],
            balance_loss=host[:, -1],
        )

    def metrics(self) -> dict[str, float]:
        """Router health of the last finished step (empty before the first step)."""
        stats = self.layer_stats()
        if stats is None:
            return {}
        out: dict[str, float] = {
            f"moe/maxvio/layer_{layer_id}": v
            for layer_id, v in zip(stats.layer_ids, stats.maxvio.tolist(), strict=True)
        }
        frac = stats.load / stats.counts.shape[1]
        out["moe/maxvio_worst"] = max(out.values())
        out["moe/load_frac_min"] = frac.min().item()
        out["moe/load_frac_max"] = frac.max().item()
        out["moe/dead_experts"] = int(stats.dead.sum().item())
        out["moe/bias_min"] = stats.bias.min().item()
        out["moe/bias_max"] = stats.bias.max().item()
        out["loss/balance"] = stats.balance_loss.sum().item()
        return out


@dataclass(frozen=True)
class RouterStats:
    """One step's global token counts and biases of every MoE layer, on the host."""

    layer_ids: list[int]
    counts: torch.Tensor
    """[layers, experts] tokens routed to each expert (fp64)."""
    bias: torch.Tensor
    """[layers, experts] expert biases after the step's update."""
    balance_loss: torch.Tensor
    """[layers] balance-loss values (alpha applied)."""

    @property
    def load(self) -> torch.Tensor:
        """[layers, experts] n_i / mean(n): 1 is a balanced expert, 0 a dead one."""
        return self.counts / self.counts.mean(dim=1, keepdim=True).clamp_min(1e-30)

    @property
    def maxvio(self) -> torch.Tensor:
        """[layers] MaxVio = max_i (n_i - nbar) / nbar."""
        return torch.stack([max_violation(c) for c in self.counts])

    @property
    def dead(self) -> torch.Tensor:
        """[layers] experts that got no token."""
        return (self.counts == 0).sum(dim=1)
