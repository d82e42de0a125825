"""Work-arounds for TorchTitan 0.2.2's torchft integration (`[fault_tolerance]`, experimental).

Each replica group is its own torchrun job with a torchft Manager; the groups alive at a step are
that step's quorum. What TorchTitan 0.2.2 does not do for Trinity, and how it is closed here:

- `OptimizerStepPhases`: `FTOptimizersContainer.step` calls torchft's `OptimizerWrapper.step`,
  which asks the manager `should_commit()` and then calls the container's `step` again. Every
  step pre-hook therefore runs at least twice per committed step (before the vote, and before
  the update; a third time from `OptimizersContainer.step` once torch has wrapped that class's
  `step` with its hooks, which it does when any plain container is built in the process), and
  once for a step that is not committed. The phases object runs a step's gathering (all
  communication, whose failure must veto the commit) in the outermost call, its state change
  (expert bias, loss statistics, NaN decision) in the first nested one, after a healing group
  has loaded its peer's state, and drops the step when no nested call came.
- `ReplicaGroups`: sums and maxima across the live groups through the manager (a group that is
  healing, or not in the quorum, contributes zeros). Trinity's expert-bias counts, NaN-guard
  flags and metrics were reduced over the "loss" mesh only, which under torchft spans one group.
- `ReplicaGroups.average_gradients`: TorchTitan averages gradients across groups only in FSDP's
  all-reduce hook (`FTManager.maybe_set_all_reduce_hook`); a group without FSDP (one rank, or TP
  only) would train on its own. Such groups average every gradient after the step's last
  backward, before clipping, as the hook does.
- `restore_scheduled_lrs`: `FTOptimizersContainer.state_dict()`, which torchft sends to a healing
  group, is a cache made when the checkpointer was built: its tensors are the live optimizer
  state, but its param-group values are copies from then. A healed group thus loads the LR of
  the run's start into its optimizers (its LR schedulers' state is current), and its first
  update after the heal would differ from the live groups'. The LRs are set from the schedulers
  after every commit vote (where a heal loads the state; without one it changes nothing).
- Logged loss: `FTTrainer.train_step` sums the groups' mean losses over torchft's process group
  (the logged loss is the number of groups times the mean), and with one rank per group logs that
  group's own loss. Trinity's metrics processor logs the mean over the live groups' tokens,
  from its loss statistics (training/metrics.py, `TrinityMetricsProcessor.live_group_losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch.distributed import ReduceOp
from torch.distributed.tensor import DTensor
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import FTOptimizersContainer, OptimizersContainer

if TYPE_CHECKING:
    from torchft import Manager

T = TypeVar("T")


class ReplicaGroups:
    """The torchft replica groups of the current step, seen from one rank of one group.

    Collectives go to the same rank of every other live group (torchft's process group). A
    group that is healing or not in the quorum contributes zeros; a failed collective is
    reported to the manager, which then does not commit the step.
    """

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def participants(self) -> int:
        """Groups the step's gradients are averaged over (torchft's participants)."""
        return self.manager.num_participants()

    def healing(self) -> bool:
        """This group is healing in this step: it loads a live group's state at the commit vote
        and contributes zeros to the step's collectives."""
        return not self.manager.is_participating()

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> bool:
        """Reduce `tensor` in place across the live groups; False if this or an earlier
        collective of the step failed (its values are then not to be used, and the step does
        not commit: after a failure the manager skips collectives and leaves tensors as they
        are)."""
        done = self.manager.allreduce(tensor, reduce_op=op).wait()
        return bool(done) and self.manager.errored() is None

    @torch.no_grad()
    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` across the live groups, one collective per dtype."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            self.all_reduce(flat, ReduceOp.AVG)
            for g, piece in zip(same, flat.split([g.numel() for g in same]), strict=True):
                g.copy_(piece.view_as(g))


class OptimizerStepPhases(Generic[T]):
    """Per-step work split around torchft's commit vote, each part run once per step.

    `gather()` runs before the vote (the outermost pre-hook call): every collective of the
    step's closing, so that a failure vetoes the commit. `apply(gathered)` runs right before the
    parameters are updated (the first nested call, after `should_commit()`, which is where a
    healing group loads its peer's state). `drop(gathered)` runs when the step was not
    committed (no nested call came). For a plain container (one call per step) `gather` and `apply` run
    together and `drop` never does.
    """

    def __init__(
        self,
        optimizers: OptimizersContainer,
        gather: Callable[[], T],
        apply: Callable[[T], None],
        drop: Callable[[T], None],
    ) -> None:
        self.reentrant = isinstance(optimizers, FTOptimizersContainer)
        self.gather, self.apply, self.drop = gather, apply, drop
        self._depth = 0
        self._pending: list[T] = []
        """The gathered value of the running step, until it is applied or dropped."""
        optimizers.register_step_pre_hook(self._before)
        optimizers.register_step_post_hook(self._after)

    def _before(self, *_args: Any, **_kwargs: Any) -> None:
        self._depth += 1
        try:
            if self._depth == 1:
                gathered = self.gather()
                if self.reentrant:
                    self._pending = [gathered]
                else:
                    self.apply(gathered)
            elif self._pending:  # the first call after torchft's vote
                self.apply(self._pending.pop())
            # deeper calls of the same step (see the module docstring) have nothing left to do
        except BaseException:
            # post-hooks do not run after an error: start the next step afresh
            self._depth, self._pending = 0, []
            raise

    def _after(self, *_args: Any, **_kwargs: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pending:
            self.drop(self._pending.pop())


def restore_scheduled_lrs(
    optimizers: OptimizersContainer, lr_schedulers: LRSchedulersContainer
) -> None:
    """Set every param group's LR to its scheduler's current one (see the module docstring)."""
    for optimizer, scheduler in zip(optimizers.optimizers, lr_schedulers.schedulers, strict=True):
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
