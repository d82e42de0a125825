"""Guard against a non-finite loss or gradient: skip the update, or save a checkpoint and stop.

A single NaN step would otherwise write NaN into every weight and every optimizer moment, and the
run would carry on burning GPU hours. The guard sees every micro-batch loss (it wraps the loss
function) and the clipped gradients just before the optimizer step (it wraps the step), agrees with
all ranks in one tiny all-reduce, and then either steps as usual or, on a bad step, logs which
term went bad on which step and skips the update or checkpoints and stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from trinity_titan import losses
from trinity_titan.job_config import NanGuard as NanGuardConfig


class NonFiniteTrainingError(RuntimeError):
    """Raised to stop a run after a non-finite step (action = "checkpoint_and_stop")."""


class NanGuard:
    def __init__(
        self,
        config: NanGuardConfig,
        model_parts: list[nn.Module],
        current_step: Callable[[], int],
        save_checkpoint: Callable[[int], None],
    ):
        self.config = config
        self.model_parts = model_parts
        self.current_step = current_step
        self.save_checkpoint = save_checkpoint
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []
        # term name -> "all finite so far this step", kept on the device: no host sync per micro-batch
        self._finite: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.config.action != "off"

    def watch_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap loss_fn(pred, labels): note which loss terms of a micro-batch are not finite."""

        def guarded(pred: Any, labels: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(pred, labels)
            if self.config.inject_nan_at_step == self.current_step() and _rank() == 0:
                loss = loss * float("nan")  # testing aid: a NaN on one rank only
            terms = dict(getattr(loss_fn, "last_terms", None) or {})
            terms.setdefault("loss", loss.detach())
            for name, value in terms.items():
                ok = torch.isfinite(torch.as_tensor(value)).all()
                self._finite[name] = ok & self._finite[name] if name in self._finite else ok
            return loss

        return guarded

    def guard_step(self, step_fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap the optimizer step: it runs only when every rank's losses and gradients are finite."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            bad_loss, bad_grad, bad_terms = self._check_all_ranks()
            self._finite = {}
            if not (bad_loss or bad_grad):
                self.consecutive_skips = 0
                return step_fn(*args, **kwargs)
            self._handle_bad_step(bad_loss, bad_grad, bad_terms)
            return None

        return guarded

    def _check_all_ranks(self) -> tuple[bool, bool, list[str]]:
        """One all-reduce (MAX) of [any local loss term bad, any local gradient bad]."""
        grads = [
            _local(p.grad) for m in self.model_parts for p in m.parameters() if p.grad is not None
        ]
        device = grads[0].device if grads else torch.device("cpu")
        names = sorted(self._finite)
        term_ok = [self._finite[n].to(device) for n in names]
        loss_ok = torch.stack(term_ok).all() if term_ok else torch.ones((), dtype=torch.bool)
        grad_ok = (
            torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            if grads
            else torch.ones((), dtype=torch.bool)
        )
        flags = torch.stack([~loss_ok.to(device), ~grad_ok.to(device)]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad = (bool(f) for f in flags.tolist())
        bad_terms = (
            [n for n, ok in zip(names, term_ok, strict=True) if not bool(ok)] if bad_loss else []
        )
        return bad_loss, bad_grad, bad_terms

    def _handle_bad_step(self, bad_loss: bool, bad_grad: bool, bad_terms: list[str]) -> None:
        step = self.current_step()
        what = []
        if bad_loss:
            local = ", ".join(bad_terms) or "on another rank"
            what.append(f"loss ({local})")
        if bad_grad:
            what.append("grad norm")
        self.skipped_steps.append(step)
        self.consecutive_skips += 1
        # The expert-bias and loss-stats hooks run inside the optimizer step: drop this step's data.
        for m in self.model_parts:
            for module in m.modules():
                counts = getattr(module, "tokens_per_expert", None)
                if isinstance(counts, torch.Tensor):
                    counts.zero_()
        if losses.active_loss_stats is not None:
            losses.active_loss_stats.discard_step()
        stop = self.config.action == "checkpoint_and_stop" or (
            self.consecutive_skips > self.config.max_consecutive_skips
        )
        logger.warning(
            f"Non-finite {' and '.join(what)} at step {step}: the update was skipped"
            + (
                "; saving a checkpoint and stopping."
                if stop
                else f" ({self.consecutive_skips} in a row)."
            )
        )
        if stop:
            self.save_checkpoint(step)
            raise NonFiniteTrainingError(
                f"non-finite {' and '.join(what)} at step {step}. The checkpoint of step "
                f"{step} holds the weights before this step and the data position after it; "
                "resume from it (lower the LR or inspect the batch), or set "
                "--nan_guard.action skip to skip such steps."
            )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
