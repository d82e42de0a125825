"""Muon for the hidden matrices and AdamW for everything else, in one optimizer, on sharded weights.

One `HybridMuon` holds both kinds of parameter group (`use_muon` True/False), so TorchTitan's
`OptimizersContainer` (one optimizer per model part) checkpoints all of its state and
`LRSchedulersContainer` scales every group's learning rate by the same schedule.

Muon update of a matrix W with gradient G (torch.optim.Muon's conventions):
    B <- mu B + (1 - mu) G;   U = (1 - mu) G + mu B if nesterov else B
    O = NewtonSchulz(U)  (quintic, orthogonalises U;  experts [E, out, in] are a batch of E matrices)
    W <- W (1 - lr wd) - lr_adj O,  lr_adj = lr sqrt(max(1, out/in))  ("original")
                                    or lr 0.2 sqrt(max(out, in))      ("match_rms_adamw")

The sharded orthogonalisation (each update equal to Newton-Schulz of the full matrix, whatever
the layout) is in trinity_titan/optim/orthogonalise.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from trinity_titan.optim.orthogonalise import MuonUpdate, orthogonalise_all


def adjusted_lr(lr: float, mode: str, fan_out: int, fan_in: int) -> float:
    """Muon's per-matrix learning rate: shape-scaled ('original') or RMS-matched to AdamW."""
    if mode == "original":
        return lr * math.sqrt(max(1.0, fan_out / fan_in))
    if mode == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(fan_out, fan_in))
    raise ValueError(f"unknown muon adjust_lr mode {mode!r}")


class HybridMuon(torch.optim.Optimizer):
    """Muon on groups with `use_muon=True` (2-D or [E, out, in] tensors), AdamW on the others.

    Every setting is a keyword without a default: its default lives in `[optimizer]`
    (trinity_titan.job_config.Optimizer and TorchTitan's), and `optim.builder` passes it on.
    """

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
        ns_steps: int,
        ns_coefficients: Sequence[float],
        ns_eps: float,
        ns_dtype: str,
        adjust_lr: str,
        betas: tuple[float, float],
        eps: float,
        use_muon: bool = False,
    ) -> None:
        if len(ns_coefficients) != 3:
            raise ValueError("ns_coefficients must be three numbers (a, b, c)")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            use_muon=use_muon,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            ns_eps=ns_eps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            betas=tuple(betas),
            eps=eps,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim not in (2, 3):
                        raise ValueError(f"Muon needs 2-D or 3-D parameters, got {p.shape}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending: list[MuonUpdate] = []
        for group in self.param_groups:
            if group["use_muon"]:
                pending.extend(self._momentum(group))
            else:
                self._adamw(group)
        for work, orthogonalised in zip(pending, orthogonalise_all(pending), strict=True):
            group = work.group
            fan_out, fan_in = work.param.shape[-2:]
            lr_adj = adjusted_lr(group["lr"], group["adjust_lr"], fan_out, fan_in)
            local = _local(work.param)
            local.mul_(1 - group["lr"] * group["weight_decay"])
            local.add_(orthogonalised, alpha=-lr_adj)
        return loss

    def _momentum(self, group: dict) -> list[MuonUpdate]:
        mu = group["momentum"]
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad = _local_grad(p)
            buf = _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - mu)
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            out.append(MuonUpdate(p, group, update))
        return out

    def _adamw(self, group: dict) -> None:
        """torch.optim.AdamW's single-tensor math (decoupled weight decay) on local shards."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            grad, param = _local_grad(p), _local(p)
            exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            param.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: Tensor) -> Tensor:
    """The gradient's local shard, laid out like the parameter's.

    Under TP a gradient can come back in another layout than its parameter: sequence-parallel
    norm weights get Partial (unsummed) gradients, the row-parallel embedding a Replicate one.
    torch's optimizers redistribute implicitly through DTensor ops; the local-shard math here
    must do it explicitly, or each TP rank would step with its own partial sum.
    """
    grad = p.grad
    if isinstance(grad, DTensor) and grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    return _local(grad)
