"""A run killed mid-way and resumed from its last checkpoint continues exactly as if never stopped.

The run uses everything that carries state across steps: Muon + AdamW, SMEBU (bias and momentum),
the balance loss, the LR schedule, and the data pipeline (RSDB buffer in a worker process, two
mixture phases and a batch-size ramp that fires before the crash).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.distributed.launch import (
    DEBUG_TOML,
    REPO,
    assert_clean_failure,
    descendants,
    from_seed,
    make_seed_checkpoint,
    run_train,
)

pytestmark = pytest.mark.slow

NPROC = 2
STEPS = 6
ARGS = (
    "--training.steps", str(STEPS),
    "--training.local_batch_size", "2",
    "--training.dataloader.num_workers", "1",
    "--parallelism.data_parallel_shard_degree", str(NPROC),
    "--optimizer.name", "Muon",
    "--optimizer.muon_lr", "2e-2",
    "--moe.balance_method", "smebu",
    "--moe.smebu_lambda", "5e-2",
    "--moe.balance_loss_coeff", "1e-2",
    "--checkpoint.interval", "3",
    "--checkpoint.no_last_save_model_only",
)  # fmt: skip
DATA = """
[data]
mixing = "rsdb"
rsdb_buffer_docs = 8
seed = 3
jsonl_block_bytes = 16384  # the validation file: 4 blocks for the 2 readers

[[data.sources]]
path = "{corpus}"

[[data.sources]]
path = "{validation}"

[[data.phases]]
tokens = 1536
weights = [1.0, 0.0]

[[data.phases]]
tokens = 1_000_000
weights = [0.5, 0.5]

[[data.batch_ramp]]
tokens = 1024
global_batch_size = 8
"""


def _config(tmp_path: Path) -> Path:
    assets = REPO / "trinity_titan" / "assets" / "debug"
    config = tmp_path / "resume.toml"
    config.write_text(
        DEBUG_TOML.read_text()
        + DATA.format(corpus=assets / "corpus.jsonl", validation=assets / "validation.jsonl")
    )
    return config


def _kill_after_step(dump, config, overrides, step: int) -> None:
    """Start training and SIGKILL the whole process group once `step` is logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}", "--standalone",
           "-m", "trinity_titan.train", "--job.config_file", str(config), "--job.dump_folder", str(dump),
           "--metrics.disable_color_printing", *overrides]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        for line in proc.stdout:
            if re.search(rf"step:\s*{step}\s+loss", line):
                break
            assert time.monotonic() < deadline, "training did not reach the kill step"
        else:
            raise AssertionError(f"training ended before step {step}")
    finally:
        # torchrun starts its workers in their own sessions: kill the whole tree, workers first.
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _tensors(step_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: model (biases, SMEBU momentum) and optimizer state."""
    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}  # fmt: skip
    dcp.load(state, storage_reader=reader)
    return state


def test_kill_and_resume_is_bitwise(tmp_path):
    config = _config(tmp_path)
    seed = make_seed_checkpoint(tmp_path / "seed")
    overrides = (*ARGS, *from_seed(seed))
    run = dict(config=config, module="trinity_titan.train")
    full, log = run_train(tmp_path / "full", NPROC, *overrides, **run)
    assert "Batch ramp at 1024 tokens (step 3)" in log and "Data phase 2/2" in log

    _kill_after_step(tmp_path / "crash", config, overrides, step=4)
    assert (tmp_path / "crash" / "checkpoint" / "step-3").is_dir()
    assert not (tmp_path / "crash" / "checkpoint" / "step-6").exists()
    resumed, log = run_train(tmp_path / "crash", NPROC, *overrides, **run)
    assert "Training starts at step 4" in log
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == full[step], (step, full, resumed)

    a = _tensors(tmp_path / "full" / "checkpoint" / f"step-{STEPS}")
    b = _tensors(tmp_path / "crash" / "checkpoint" / f"step-{STEPS}")
    assert set(a) == set(b)
    for part in ("expert_bias", "expert_bias_momentum", "momentum_buffer", "exp_avg_sq"):
        assert any(part in k for k in a), part
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _shards(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob("*.distcp"))


def _garble_data_position(step_dir: Path) -> None:
    """Overwrite rank 0's saved dataloader state with zeros of the same length: every file has
    its size, but the state fails to load."""
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata()
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "dataloader.dp_rank_0")
    with open(step_dir / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * info.length)


def test_damaged_checkpoints_are_skipped_and_a_finished_run_extends(tmp_path):
    """A finished run (final save model-only) with its newest full checkpoints damaged in each
    way: the relaunch with more steps names every folder it skips, resumes from the newest
    valid full one, and trains on bitwise like the first run. A changed layout is refused."""
    dump = tmp_path / "run"
    # total_steps: the LR schedule does not depend on --training.steps, so the runs compare
    args = ("--training.steps", "6", "--lr_scheduler.total_steps", "10", "--checkpoint.enable",
            "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0")  # fmt: skip
    first, log = run_train(dump, NPROC, *args, module="trinity_titan.train")
    ckpt = dump / "checkpoint"
    assert "Saving a model only checkpoint" in log  # TorchTitan's default final save
    os.truncate(_shards(ckpt / "step-5")[1], 1000)
    _shards(ckpt / "step-4")[0].unlink()
    os.truncate(ckpt / "step-3" / ".metadata", 50)
    _garble_data_position(ckpt / "step-2")

    more = ("--training.steps", "8", *args[2:])
    resumed, log = run_train(dump, NPROC, *more, module="trinity_titan.train")
    skipped = next(line for line in log.splitlines() if "Checkpoints not used for resume" in line)
    assert "step-6 holds the model only" in skipped
    assert "step-5 is damaged: its shard __1_0.distcp is truncated (1000 of" in skipped
    assert "step-4 is damaged: its shard __0_0.distcp is missing" in skipped
    assert "step-3 is damaged: its .metadata is truncated or unreadable" in skipped
    assert "step-2 is damaged: its data/train state fails to load" in skipped
    assert "Resuming from step-1." in skipped and "checkpoint-damaged" in skipped
    assert "Training starts at step 2" in log
    assert sorted(resumed) == list(range(2, 9))
    assert all(resumed[s] == first[s] for s in range(2, 7)), (first, resumed)
    assert sorted(p.name for p in (dump / "checkpoint-damaged").iterdir()) == [
        "step-2", "step-3", "step-4", "step-5",
    ]  # fmt: skip

    # Another data-parallel degree and worker count: refused before the model is built.
    _, log = run_train(dump, 1, *more, "--training.dataloader.num_workers", "1",
                       module="trinity_titan.train", check=False)  # fmt: skip
    assert_clean_failure(log, f"cannot resume from {ckpt / 'step-7'}: the data-parallel degree")
    assert "was 2, is 1; [training.dataloader] num_workers was 0, is 1" in log
    assert "Building trinity" not in log
