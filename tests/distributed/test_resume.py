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

from tests.distributed.launch import DEBUG_TOML, REPO, from_seed, make_seed_checkpoint, run_train

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
