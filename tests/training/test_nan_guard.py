"""The NaN guard's verdicts and messages on one process (the training runs are in distributed/)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trinity_titan.job_config import NanGuard as NanGuardConfig
from trinity_titan.kernels import LossTerms
from trinity_titan.training.loss import LossStats
from trinity_titan.training.nan_guard import NanGuard, drop_gradients


def _guard(action: str, **config) -> tuple[NanGuard, nn.Linear, LossStats]:
    model, stats = nn.Linear(3, 2), LossStats(vocab_size=2)
    guard = NanGuard(NanGuardConfig(action=action, **config), [model], stats, lambda: 7)
    return guard, model, stats


def _terms(ce: float, z: float) -> LossTerms:
    t = torch.tensor
    return LossTerms(t(ce), t(ce), t(z), t(0.0), t(0.0), t(3))


def test_a_finite_step_passes_and_a_nan_gradient_is_caught():
    guard, model, _ = _guard("skip")
    loss_fn = guard.watch_loss(lambda pred, labels: (pred - labels).pow(2).sum())
    loss_fn(model(torch.ones(1, 3)), torch.zeros(1, 2)).backward()
    assert guard.check_step() is None
    model.weight.grad[0, 0] = math.inf
    bad = guard.check_step()
    assert bad is not None and bad.grad and not bad.loss and bad.describe() == "grad norm"
    assert guard.skip(bad) is False  # skip mode, 1 of 10
    assert guard.skipped_steps == [7]
    drop_gradients([model])
    assert all(p.grad is None for p in model.parameters())


def test_stop_mode_names_the_terms_and_what_was_saved():
    guard, model, stats = _guard("checkpoint_and_stop")
    stats.record(_terms(ce=1.0, z=math.inf))
    guard.watch_loss(lambda pred, labels: pred.sum() * math.nan)(model(torch.ones(1, 3)), None)
    bad = guard.check_step()
    assert bad.describe() == "loss (loss, z_loss)"
    assert guard.skip(bad) is True
    saved = str(guard.stop_error(bad, saved=True))
    assert "non-finite loss (loss, z_loss) at step 7" in saved
    assert "checkpoint of step 7" in saved and "--nan_guard.action skip" in saved
    unsaved = str(guard.stop_error(bad, saved=False))
    assert "No checkpoint was saved" in unsaved and "checkpoint of step" not in unsaved


def test_skip_mode_stops_at_exactly_max_consecutive_skips():
    guard, model, _ = _guard("skip", max_consecutive_skips=3)
    verdicts = []
    for _ in range(3):
        model.weight.grad = torch.full_like(model.weight, math.nan)
        bad = guard.check_step()
        verdicts.append(guard.skip(bad))
    assert verdicts == [False, False, True]
    message = str(guard.stop_error(bad, saved=False))
    assert "3 consecutive steps" in message and "--nan_guard.action skip" not in message
    model.weight.grad = torch.zeros_like(model.weight)
    assert guard.check_step() is None and guard.consecutive_skips == 0  # a good step resets


class _OtherGroups:
    """The other live replica groups' [bad loss, bad grad] flags, MAX-reduced into ours."""

    def __init__(self, flags: list[float]) -> None:
        self.flags = torch.tensor(flags)
        self.ops = []

    def all_reduce(self, tensor, op) -> bool:
        self.ops.append(op)
        torch.maximum(tensor, self.flags, out=tensor)
        return True


def test_a_bad_loss_in_another_replica_group_skips_the_step_here_too():
    model, stats = nn.Linear(3, 2), LossStats(vocab_size=2)
    others = _OtherGroups([1.0, 0.0])  # another group saw a NaN loss term
    guard = NanGuard(NanGuardConfig(action="skip"), [model], stats, lambda: 7, others)
    model(torch.ones(1, 3)).sum().backward()
    bad = guard.check_step()
    assert bad is not None and bad.loss and not bad.grad
    assert bad.describe() == "loss (on another rank)"
    assert others.ops == [torch.distributed.ReduceOp.MAX]
    others.flags.zero_()
    assert guard.check_step() is None
