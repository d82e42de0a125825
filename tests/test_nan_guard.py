"""The NaN guard: a NaN on one rank skips the update on every rank, or checkpoints and stops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrun_utils import run_train

from trinity_titan.job_config import NanGuard as NanGuardConfig
from trinity_titan.nan_guard import NanGuard, NonFiniteTrainingError

TRAIN = ("--training.steps", "5", "--parallelism.data_parallel_shard_degree", "2")


def _weights(step_dir) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith(("tok_embeddings", "layers", "norm", "output"))]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader)
    return state


def _guard(action: str, saved: list[int]) -> tuple[NanGuard, nn.Linear]:
    model = nn.Linear(3, 2)
    guard = NanGuard(NanGuardConfig(action=action), [model], lambda: 7, saved.append)
    return guard, model


def test_a_finite_step_runs_and_a_nan_gradient_is_caught():
    saved: list[int] = []
    guard, model = _guard("skip", saved)
    ran = []
    step = guard.guard_step(lambda: ran.append(True))
    loss_fn = guard.watch_loss(lambda pred, labels: (pred - labels).pow(2).sum())
    loss_fn(model(torch.ones(1, 3)), torch.zeros(1, 2)).backward()
    step()
    assert ran == [True]
    model.weight.grad[0, 0] = math.inf
    step()
    assert ran == [True] and guard.skipped_steps == [7] and saved == []


def test_stop_mode_names_the_term_and_checkpoints():
    saved: list[int] = []
    guard, model = _guard("checkpoint_and_stop", saved)

    def loss_fn(pred, labels):
        return pred.sum() * math.nan

    loss_fn.last_terms = {"z_loss": torch.tensor(math.inf), "ce": torch.tensor(1.0)}
    guard.watch_loss(loss_fn)(model(torch.ones(1, 3)), None).backward()
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite loss \(loss, z_loss\)"):
        guard.guard_step(lambda: None)()
    assert saved == [7]


@pytest.mark.slow
def test_two_ranks_skip_then_stop(tmp_path):
    # A NaN on rank 0 only at step 3: both ranks skip it, weights of step 3 are those of step 2.
    losses, log = run_train(
        tmp_path / "skip", 2, *TRAIN, "--nan_guard.action", "skip",
        "--nan_guard.inject_nan_at_step", "3", "--checkpoint.enable", "--checkpoint.interval", "1",
        "--checkpoint.no_last_save_model_only", module="trinity_titan.train",
    )  # fmt: skip
    assert "Non-finite loss (loss) and grad norm at step 3: the update was skipped" in log
    assert "Non-finite loss (on another rank) and grad norm at step 3" in log
    assert all(math.isfinite(losses[s]) for s in (1, 2, 4, 5)), losses
    ckpt = tmp_path / "skip" / "checkpoint"
    w2, w3, w4 = (_weights(ckpt / f"step-{s}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)

    # checkpoint_and_stop: the run exits non-zero after saving a resumable checkpoint of step 2.
    _, log = run_train(
        tmp_path / "stop", 2, *TRAIN, "--nan_guard.inject_nan_at_step", "2",
        "--checkpoint.enable", "--checkpoint.interval", "100", module="trinity_titan.train",
        check=False,
    )  # fmt: skip
    assert "NonFiniteTrainingError: non-finite loss" in log and "at step 2" in log
    ckpt = tmp_path / "stop" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2"]
    meta = dcp.FileSystemReader(str(ckpt / "step-2")).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer") for k in meta) and "dataloader" in "".join(meta)
    assert "step: 3" not in log
