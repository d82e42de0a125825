"""Launch `torchrun -m torchtitan.train` the way users do, and read the losses from its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures import DEBUG_TOML, REPO

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def torchrun(nproc: int, *target: str, timeout: int, what: str, check: bool = True) -> str:
    """`torchrun --standalone` on CPU (gloo) with the repo importable; return stdout + stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", *target]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}):\n{log[-6000:]}")
    return log


def run_train(
    dump_folder: Path,
    nproc: int,
    *overrides: str,
    config: Path = DEBUG_TOML,
    timeout: int = 600,
    check: bool = True,
    module: str = "torchtitan.train",
) -> tuple[dict[int, float], str]:
    """Run training with `-m module`; return ({step: global avg loss}, full log)."""
    log = torchrun(
        nproc, "-m", module, "--job.config_file", str(config), "--job.dump_folder",
        str(dump_folder), "--metrics.disable_color_printing", *overrides,
        timeout=timeout, what="training", check=check,
    )  # fmt: skip
    losses: dict[int, float] = {}
    for step, loss in _STEP.findall(log):
        losses.setdefault(int(step), float(loss))
    return losses, log


def make_seed_checkpoint(dump_folder: Path, *overrides: str) -> Path:
    """A 1-rank step-0 checkpoint: runs on different layouts start from identical weights."""
    run_train(
        dump_folder,
        1,
        "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint",
        "--parallelism.data_parallel_shard_degree",
        "1",
        *overrides,
    )
    return dump_folder / "checkpoint" / "step-0"


def from_seed(seed: Path) -> tuple[str, ...]:
    """Overrides that start a run from `seed` (model weights only)."""
    return ("--checkpoint.enable", "--checkpoint.initial_load_path", str(seed))


def run_workers(script: Path, nproc: int, *args: str, timeout: int = 300) -> str:
    """Run a worker script under torchrun (gloo on CPU); fail with its log if any rank fails."""
    return torchrun(nproc, str(script), *args, timeout=timeout, what="workers")
