"""Training starts from an HF checkpoint written by the converter, exactly as from the DCP seed."""

from __future__ import annotations

import pytest

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train
from trinity_titan.tools.convert import main


@pytest.mark.slow
def test_training_starts_from_an_hf_checkpoint(tmp_path):
    """TorchTitan's own HF-loading path (initial_load_in_hf) starts exactly where the DCP seed does."""
    seed = make_seed_checkpoint(tmp_path / "seed")
    main(["dcp-to-hf", str(seed), str(tmp_path / "hf"), "--flavor", "debugmodel",
          "--max-shard-size-gb", "0.001"])  # fmt: skip
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    train = ("--training.steps", "3", "--parallelism.data_parallel_shard_degree", "2")
    from_dcp, _ = run_train(tmp_path / "a", 2, *train, *from_seed(seed))
    from_hf, log = run_train(
        tmp_path / "b", 2, *train, "--checkpoint.enable",
        "--checkpoint.initial_load_path", str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf",
    )  # fmt: skip
    assert "loading from HF safetensors" in log
    assert from_hf == pytest.approx(from_dcp, rel=1e-6, abs=1e-6) and len(from_hf) == 3
