"""End-to-end: `torchrun -m torchtitan.train` with the debug TOML on CPU, 1 and 2 ranks."""

from __future__ import annotations

import pytest

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = ("--training.steps", str(STEPS), "--training.global_batch_size", "16")


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    return make_seed_checkpoint(tmp_path_factory.mktemp("seed"))


def test_fsdp2_matches_one_rank_and_loss_falls(tmp_path, seed):
    one, _ = run_train(
        tmp_path / "one", 1, *COMMON, *from_seed(seed), "--training.local_batch_size", "16"
    )
    two, log = run_train(
        tmp_path / "two",
        2,
        *COMMON,
        *from_seed(seed),
        "--training.local_batch_size",
        "8",
        "--parallelism.data_parallel_shard_degree",
        "2",
    )
    assert "Applied FSDP to the model" in log
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, one, two)
    assert two[STEPS] < two[1] - 0.5, two


def test_gradient_accumulation_matches_large_batch(tmp_path, seed):
    big, _ = run_train(
        tmp_path / "big", 1, *COMMON, *from_seed(seed), "--training.local_batch_size", "16"
    )
    accum, log = run_train(
        tmp_path / "accum", 1, *COMMON, *from_seed(seed), "--training.local_batch_size", "8"
    )
    assert "gradient accumulation steps 2" in log
    for step in big:
        assert accum[step] == pytest.approx(big[step], rel=1e-5), (step, big, accum)
