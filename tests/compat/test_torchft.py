"""The torchft work-arounds on one process, with TorchTitan's real torchft optimizer container and a
stand-in for torchft's Manager (the multi-group runs are in tests/distributed/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed import ReduceOp
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import FTOptimizersContainer, OptimizersContainer
from torchtitan.config import LRScheduler as LRSchedulerConfig

from trinity_titan.compat.torchft import OptimizerStepPhases, ReplicaGroups, restore_scheduled_lrs


class FakeWork:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def wait(self) -> bool:
        return self.ok


class FakeManager:
    """torchft's Manager as the code under test sees it: a vote, and all-reduces with another
    group's `other` tensors (SUM, MAX, AVG over `participants`)."""

    def __init__(self, commit: bool = True, participants: int = 2) -> None:
        self.commit = commit
        self.participants = participants
        self.others: list[torch.Tensor] = []
        self.events: list[str] = []
        self.error: Exception | None = None

    def start_quorum(self) -> None:
        self.events.append("quorum")

    def should_commit(self) -> bool:
        self.events.append("vote")
        return self.commit

    def num_participants(self) -> int:
        return self.participants

    def errored(self) -> Exception | None:
        return self.error

    def allreduce(self, tensor: torch.Tensor, reduce_op: ReduceOp) -> FakeWork:
        self.events.append(f"allreduce {reduce_op}")
        other = self.others.pop(0)
        if reduce_op == ReduceOp.MAX:
            torch.maximum(tensor, other, out=tensor)
        else:
            tensor.add_(other)
            if reduce_op == ReduceOp.AVG:
                tensor.div_(self.participants)
        return FakeWork(True)


def _container(manager: FakeManager | None) -> tuple[nn.Module, OptimizersContainer]:
    model = nn.Linear(3, 2)
    kwargs = {"lr": 0.1}
    if manager is None:
        return model, OptimizersContainer([model], torch.optim.SGD, kwargs)
    return model, FTOptimizersContainer([model], torch.optim.SGD, kwargs, manager)


def _phases(optimizers, manager: FakeManager | None, log: list[str]) -> OptimizerStepPhases:
    def gather() -> int:
        log.append("gather")
        return len(log)

    def apply(token: int) -> None:
        log.append(f"apply {token}")
        if manager is not None:
            assert manager.events[-1] == "vote"  # after torchft's commit vote

    return OptimizerStepPhases(optimizers, gather, apply, lambda token: log.append(f"drop {token}"))


def _step(model: nn.Module, optimizers: OptimizersContainer) -> None:
    optimizers.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    optimizers.step()


def test_torchtitans_ft_container_runs_the_step_hooks_more_than_once():
    """The repeated invocation the phases guard against: a committed step calls every step
    pre-hook before the vote and again after it, and a third time once torch has wrapped the
    plain container's step with its hooks (building any plain container does that)."""
    manager = FakeManager()
    model, optimizers = _container(manager)
    votes_seen: list[int] = []
    optimizers.register_step_pre_hook(
        lambda *a, **k: votes_seen.append(manager.events.count("vote"))
    )
    _step(model, optimizers)
    assert votes_seen[0] == 0 and len(votes_seen) in (2, 3) and set(votes_seen[1:]) == {1}
    _container(None)
    votes_seen.clear()
    _step(model, optimizers)
    assert votes_seen == [1, 2, 2]


def test_phases_gather_before_the_vote_and_apply_once_after_it():
    manager = FakeManager()
    model, optimizers = _container(manager)
    log: list[str] = []
    _phases(optimizers, manager, log)
    before = model.weight.detach().clone()
    for _ in range(3):
        _step(model, optimizers)
    assert log == ["gather", "apply 1", "gather", "apply 3", "gather", "apply 5"]
    assert not torch.equal(model.weight, before)


def test_an_uncommitted_step_is_dropped_and_nothing_is_updated():
    manager = FakeManager(commit=False)
    model, optimizers = _container(manager)
    log: list[str] = []
    _phases(optimizers, manager, log)
    before = model.weight.detach().clone()
    _step(model, optimizers)
    manager.commit = True
    _step(model, optimizers)
    assert log == ["gather", "drop 1", "gather", "apply 3"]
    assert not torch.equal(model.weight, before)  # the committed step updated


def test_a_plain_container_gathers_and_applies_in_its_one_call():
    model, optimizers = _container(None)
    log: list[str] = []
    _phases(optimizers, None, log)
    _step(model, optimizers)
    _step(model, optimizers)
    assert log == ["gather", "apply 1", "gather", "apply 3"]


def test_an_error_in_a_phase_leaves_the_next_step_intact():
    manager = FakeManager()
    model, optimizers = _container(manager)
    log: list[str] = []

    def gather() -> None:
        log.append("gather")
        if len(log) == 1:
            raise RuntimeError("collective failed")

    OptimizerStepPhases(optimizers, gather, lambda _: log.append("apply"), lambda _: None)
    with pytest.raises(RuntimeError, match="collective failed"):
        _step(model, optimizers)
    _step(model, optimizers)
    assert log == ["gather", "gather", "apply"]


def test_replica_groups_reduce_and_report_failures():
    manager = FakeManager(participants=2)
    groups = ReplicaGroups(manager)
    manager.others = [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0])]
    t = torch.tensor([2.0, 2.0])
    assert groups.all_reduce(t) and torch.equal(t, torch.tensor([3.0, 7.0]))
    assert groups.all_reduce(t, ReduceOp.MAX) and torch.equal(t, torch.tensor([3.0, 7.0]))
    manager.error = RuntimeError("peer died")
    manager.others = [torch.zeros(2)]
    assert not groups.all_reduce(t)  # values left as they are are not the groups' sum


def test_average_gradients_averages_every_gradient_across_groups():
    manager = FakeManager(participants=2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))
    model(torch.ones(4, 3)).sum().backward()
    mine = [p.grad.clone() for p in model.parameters()]
    theirs = [torch.randn_like(g) for g in mine]
    manager.others = [torch.cat([g.flatten() for g in theirs])]
    ReplicaGroups(manager).average_gradients(list(model.parameters()))
    for p, a, b in zip(model.parameters(), mine, theirs, strict=True):
        torch.testing.assert_close(p.grad, (a + b) / 2)
    assert manager.events == [f"allreduce {ReduceOp.AVG}"]  # one collective for all


def test_a_healed_group_gets_the_scheduled_lr_back():
    """TorchTitan's torchft container serves a state dict cached at start: a group healed from
    it would step with the start's LR. restore_scheduled_lrs puts the scheduled one back."""
    config = LRSchedulerConfig(warmup_steps=4, decay_type="linear")
    live_model, live = _container(FakeManager())
    live_schedulers = build_lr_schedulers(live, config, 10)
    live.init_cache_state_dict()  # what TorchTitan's checkpointer does at start under torchft
    for _ in range(3):
        _step(live_model, live)
        live_schedulers.step()

    healed_model, healed = _container(FakeManager())
    healed_schedulers = build_lr_schedulers(healed, config, 10)
    healed_model.load_state_dict(live_model.state_dict())
    healed.load_state_dict(live.state_dict())
    healed_schedulers.load_state_dict(live_schedulers.state_dict())
    live_lr = live.optimizers[0].param_groups[0]["lr"]
    assert healed.optimizers[0].param_groups[0]["lr"] != live_lr  # the cached start LR
    restore_scheduled_lrs(healed, healed_schedulers)
    assert healed.optimizers[0].param_groups[0]["lr"] == live_lr
    _step(live_model, live)
    _step(healed_model, healed)
    assert torch.equal(live_model.weight, healed_model.weight)
