"""A bad layout fails under torchrun before the model (and, with Trinity's trainer, the mesh)."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_train


@pytest.mark.slow
def test_torchtitan_train_fails_before_building_the_model(tmp_path):
    _, log = run_train(
        tmp_path,
        2,
        "--parallelism.context_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        "--training.seq_len",
        "102",
        check=False,
    )
    assert "training.seq_len (102) must be divisible by 2 x context_parallel_degree (2)" in log
    assert "Building trinity" not in log and "step:" not in log


@pytest.mark.slow
def test_trinity_train_checks_before_the_mesh(tmp_path):
    _, log = run_train(
        tmp_path,
        2,
        "--parallelism.data_parallel_shard_degree",
        "4",
        check=False,
        module="trinity_titan.train",
    )
    assert "the parallel degrees multiply to 4, not the world size 2" in log
    assert "Building device mesh" not in log
