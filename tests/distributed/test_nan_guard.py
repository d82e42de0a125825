"""The NaN guard in training: a NaN on one rank skips the update on every rank, or stops the run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.distributed.launch import run_train

TRAIN = ("--training.steps", "5", "--parallelism.data_parallel_shard_degree", "2")


def _weights(step_dir) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith(("tok_embeddings", "layers", "norm", "output"))]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader)
    return state


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
