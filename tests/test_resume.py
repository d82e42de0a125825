"""A run killed mid-way and resumed from its last checkpoint continues exactly as if never stopped."""

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
from torchrun_utils import DEBUG_TOML, REPO, from_seed, make_seed_checkpoint, run_train

pytestmark = pytest.mark.slow

NPROC = 2
STEPS = 6
ARGS = (
    "--training.steps", str(STEPS),
    "--training.local_batch_size", "4",
    "--training.global_batch_size", "16",  # 2 micro-batches per rank
    "--parallelism.data_parallel_shard_degree", str(NPROC),
    "--checkpoint.interval", "3",
    "--checkpoint.no_last_save_model_only",
)  # fmt: skip


def _kill_after_step(dump, overrides, step: int) -> None:
    """Start training and SIGKILL the whole process group once `step` is logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}", "--standalone",
           "-m", "torchtitan.train", "--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(dump),
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
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out[::-1]


def _model(step_dir) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata()
    keys = [
        k
        for k in meta.state_dict_metadata
        if k.startswith(("tok_embeddings", "layers", "norm", "output"))
    ]
    state = {k: torch.empty(meta.state_dict_metadata[k].size, dtype=meta.state_dict_metadata[k].properties.dtype)
             for k in keys}  # fmt: skip
    dcp.load(state, storage_reader=reader)
    return state


def test_kill_and_resume_is_bitwise(tmp_path):
    seed = make_seed_checkpoint(tmp_path / "seed")
    overrides = (*ARGS, *from_seed(seed))
    full, _ = run_train(tmp_path / "full", NPROC, *overrides)

    _kill_after_step(tmp_path / "crash", overrides, step=4)
    assert (tmp_path / "crash" / "checkpoint" / "step-3").is_dir()
    assert not (tmp_path / "crash" / "checkpoint" / "step-6").exists()
    resumed, log = run_train(tmp_path / "crash", NPROC, *overrides)
    assert "Training starts at step 4" in log
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == full[step], (step, full, resumed)

    a = _model(tmp_path / "full" / "checkpoint" / f"step-{STEPS}")
    b = _model(tmp_path / "crash" / "checkpoint" / f"step-{STEPS}")
    assert set(a) == set(b) and any(k.endswith("expert_bias") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
