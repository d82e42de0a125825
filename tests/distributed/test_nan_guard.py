"""The NaN guard in training: a NaN on one rank skips the update on every rank, or stops the run."""

from __future__ import annotations

import math
import re

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
def test_two_ranks_skip_then_stop_and_resume_like_skip(tmp_path):
    # A NaN on rank 0 only at step 3: both ranks skip it, weights of step 3 are those of step 2.
    skipping, log = run_train(
        tmp_path / "skip", 2, *TRAIN, "--nan_guard.action", "skip",
        "--nan_guard.inject_nan_at_step", "3", "--checkpoint.enable", "--checkpoint.interval", "1",
        "--checkpoint.no_last_save_model_only", module="trinity_titan.train",
    )  # fmt: skip
    assert "Non-finite loss (loss) and grad norm at step 3: the update was skipped" in log
    assert "Non-finite loss (on another rank) and grad norm at step 3" in log
    assert all(math.isfinite(skipping[s]) for s in (1, 2, 4, 5)), skipping
    ckpt = tmp_path / "skip" / "checkpoint"
    w2, w3, w4 = (_weights(ckpt / f"step-{s}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)

    # checkpoint_and_stop: the run exits non-zero after saving a resumable checkpoint of step 3,
    # and says so; it does not advise the action it was not using.
    stop = (*TRAIN, "--nan_guard.inject_nan_at_step", "3", "--checkpoint.enable",
            "--checkpoint.interval", "100")  # fmt: skip
    _, log = run_train(tmp_path / "stop", 2, *stop, module="trinity_titan.train", check=False)
    assert "NonFiniteTrainingError: non-finite loss" in log and "at step 3" in log
    assert "The checkpoint of step 3 holds the weights from before this step" in log
    assert "set --nan_guard.action skip" in log
    ckpt = tmp_path / "stop" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-3"]
    meta = dcp.FileSystemReader(str(ckpt / "step-3")).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer") for k in meta) and "dataloader" in "".join(meta)
    assert not re.search(r"step:\s*4\s", log)

    # Resumed, it continues exactly like the skip run: same weights, data and LR schedule.
    resumed, log = run_train(tmp_path / "stop", 2, *stop, module="trinity_titan.train")
    assert "Training starts at step 4" in log
    assert sorted(resumed) == [4, 5]
    assert all(resumed[s] == skipping[s] for s in resumed), (skipping, resumed)


@pytest.mark.slow
def test_skip_mode_stops_at_exactly_the_limit_and_says_nothing_was_saved(tmp_path):
    # NaN at steps 2, 3, 4, 5 with a limit of 2 in a row: the run stops after step 3.
    _, log = run_train(
        tmp_path, 1, *TRAIN, "--parallelism.data_parallel_shard_degree", "1",
        "--nan_guard.action", "skip", "--nan_guard.max_consecutive_skips", "2",
        "--nan_guard.inject_nan_at_step", "2", "--nan_guard.inject_nan_steps", "4",
        module="trinity_titan.train", check=False,
    )  # fmt: skip
    assert "at step 2: the update was skipped (1 in a row)." in log
    assert "at step 3: the update was skipped; stopping." in log
    assert (
        "2 consecutive steps were not finite (limit nan_guard.max_consecutive_skips = 2), the "
        "last at step 3"
    ) in log
    assert "No checkpoint was saved (checkpointing is off)" in log
    assert "--nan_guard.action skip" not in log.split("NonFiniteTrainingError")[-1]
    assert not re.search(r"step:\s*4\s", log)
