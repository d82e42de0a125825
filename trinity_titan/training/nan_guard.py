"""Guard against a non-finite loss or gradient: skip the update, or skip it, save and stop.

A single NaN step would otherwise write NaN into every weight and every optimizer moment, and the
run would carry on burning GPU hours. The guard sees every micro-batch loss (it wraps the loss
function) and, just before the optimizer step, the loss terms of the step (from the loss
statistics) and the clipped gradients; all ranks agree in one tiny all-reduce (under torchft,
one more across the live replica groups, so that every group skips the same steps). Trinity's
trainer owns the guard and acts on its verdict (trinity_titan/train.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from trinity_titan.compat.torchft import ReplicaGroups
from trinity_titan.job_config import NanGuard as NanGuardConfig
from trinity_titan.training.loss import LossStats


class NonFiniteTrainingError(RuntimeError):
    """Raised to stop a run after a non-finite step."""


@dataclass(frozen=True)
class BadStep:
    """What was not finite in a step, on any rank."""

    step: int
    loss: bool
    grad: bool
    terms: tuple[str, ...]
    """This rank's non-finite loss terms (empty when another rank had them)."""

    def describe(self) -> str:
        what = []
        if self.loss:
            what.append(f"loss ({', '.join(self.terms) or 'on another rank'})")
        if self.grad:
            what.append("grad norm")
        return " and ".join(what)


class NanGuard:
    """Finds non-finite steps and counts the skipped ones; `config` is `[nan_guard]`."""

    def __init__(
        self,
        config: NanGuardConfig,
        model_parts: list[nn.Module],
        loss_stats: LossStats,
        current_step: Callable[[], int],
        replica_groups: ReplicaGroups | None = None,
    ) -> None:
        self.config = config
        self.replica_groups = replica_groups
        self.model_parts = model_parts
        self.loss_stats = loss_stats
        self.current_step = current_step
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []
        # "every loss returned this step was finite", kept on the device: no host sync per
        # micro-batch; the loss terms' own finiteness is read from `loss_stats` at the step
        self._loss_finite: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.config.action != "off"

    def watch_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap loss_fn(pred, labels): note whether the loss of a micro-batch is finite."""

        def guarded(pred: Any, labels: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(pred, labels)
            if self._inject_now() and _rank() == 0:
                loss = loss * float("nan")  # testing aid: a NaN on one rank only
            ok = torch.isfinite(loss.detach()).all()
            self._loss_finite = ok if self._loss_finite is None else ok & self._loss_finite
            return loss

        return guarded

    def _inject_now(self) -> bool:
        first = self.config.inject_nan_at_step
        return 0 < first <= self.current_step() < first + self.config.inject_nan_steps

    def check_step(self) -> BadStep | None:
        """One all-reduce (MAX) of [any local loss term bad, any local gradient bad], then one
        across the live replica groups under torchft."""
        grads = [
            _local(p.grad) for m in self.model_parts for p in m.parameters() if p.grad is not None
        ]
        device = grads[0].device if grads else torch.device("cpu")
        terms = self._terms_finite()
        self._loss_finite = None
        names = sorted(terms)
        term_ok = [terms[n].to(device) for n in names]
        loss_ok = torch.stack(term_ok).all() if term_ok else torch.ones((), dtype=torch.bool)
        grad_ok = (
            torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            if grads
            else torch.ones((), dtype=torch.bool)
        )
        flags = torch.stack([~loss_ok.to(device), ~grad_ok.to(device)]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if self.replica_groups is not None:
            self.replica_groups.all_reduce(flags, dist.ReduceOp.MAX)
        bad_loss, bad_grad = (bool(f) for f in flags.tolist())
        if not (bad_loss or bad_grad):
            self.consecutive_skips = 0
            return None
        bad_terms = tuple(n for n, ok in zip(names, term_ok, strict=True) if not bool(ok))
        return BadStep(self.current_step(), bad_loss, bad_grad, bad_terms if bad_loss else ())

    def _terms_finite(self) -> dict[str, torch.Tensor]:
        """Term name -> "finite in every micro-batch of the running step" (device booleans)."""
        out = {}
        if self._loss_finite is not None:
            out["loss"] = self._loss_finite
        running = self.loss_stats.running
        if running:
            out["ce"] = torch.stack([torch.isfinite(t.ce_sum) for t in running]).all()
            out["z_loss"] = torch.stack([torch.isfinite(t.z_sum) for t in running]).all()
        return out

    def skip(self, bad: BadStep) -> bool:
        """Count and log a skipped update; True when the run must stop now."""
        self.skipped_steps.append(bad.step)
        self.consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        stop = self.config.action == "checkpoint_and_stop" or self.consecutive_skips >= limit
        logger.warning(
            f"Non-finite {bad.describe()} at step {bad.step}: the update was skipped"
            + ("; stopping." if stop else f" ({self.consecutive_skips} in a row).")
        )
        return stop

    def stop_error(self, bad: BadStep, saved: bool) -> NonFiniteTrainingError:
        """The error that ends the run, saying what was saved and what to do."""
        if self.config.action == "skip":
            why = (
                f"{self.consecutive_skips} consecutive steps were not finite (limit "
                f"nan_guard.max_consecutive_skips = {self.config.max_consecutive_skips}), the "
                f"last at step {bad.step} ({bad.describe()})"
            )
            advice = "lower the LR or inspect the data"
        else:
            why = f"non-finite {bad.describe()} at step {bad.step}"
            advice = (
                "lower the LR or inspect the batch, or set --nan_guard.action skip to skip "
                "such steps"
            )
        if saved:
            where = (
                f"The checkpoint of step {bad.step} holds the weights from before this step, the "
                "data position and LR schedule after it; resume from it"
            )
        else:
            where = "No checkpoint was saved (checkpointing is off)"
        return NonFiniteTrainingError(f"{why}. {where}: {advice}.")


def drop_gradients(model_parts: list[nn.Module]) -> None:
    """Set every gradient to None: the optimizers then leave each parameter and its state alone."""
    for m in model_parts:
        for p in m.parameters():
            p.grad = None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
