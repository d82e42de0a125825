"""Launch `torchrun -m torchtitan.train` the way users do, and read the losses from its log."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures import DEBUG_TOML, REPO

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def _torchrun_cmd(nproc: int, *target: str) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", *target]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    return cmd, env


def _train_target(dump_folder: Path, config: Path, module: str, overrides: tuple[str, ...]):
    return ("-m", module, "--job.config_file", str(config), "--job.dump_folder", str(dump_folder),
            "--metrics.disable_color_printing", *overrides)  # fmt: skip


def torchrun(nproc: int, *target: str, timeout: int, what: str, check: bool = True) -> str:
    """`torchrun --standalone` on CPU (gloo) with the repo importable; return stdout + stderr."""
    cmd, env = _torchrun_cmd(nproc, *target)
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
    target = _train_target(dump_folder, config, module, overrides)
    log = torchrun(nproc, *target, timeout=timeout, what="training", check=check)
    return losses_of(log), log


def losses_of(log: str) -> dict[int, float]:
    """{step: global avg loss} of a training log (the first rank's line of each step)."""
    losses: dict[int, float] = {}
    for step, loss in _STEP.findall(log):
        losses.setdefault(int(step), float(loss))
    return losses


def start_train(
    dump_folder: Path,
    nproc: int,
    *overrides: str,
    config: Path = DEBUG_TOML,
    module: str = "torchtitan.train",
) -> subprocess.Popen:
    """Start training in the background (stdout and stderr merged into `.stdout`)."""
    cmd, env = _torchrun_cmd(nproc, *_train_target(dump_folder, config, module, overrides))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 600) -> list[str]:
    """Read `proc`'s output until a line matches `pattern`; return the lines read."""
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, f"no line matched {pattern!r} in {timeout} s"
    raise AssertionError(f"the run ended before a line matched {pattern!r}:\n{''.join(lines)}")


def descendants(root: int) -> list[int]:
    """Every process below `root` (deepest first)."""
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


def alive(pid: int) -> bool:
    """`pid` exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_clean_failure(log: str, message: str) -> None:
    """The run stopped on a ConfigError the way users should see it: one `error: ...` line with
    `message`, exit status 2, and no traceback of a worker (torchrun's own report of the failed
    worker, a ChildFailedError traceback, is the only one)."""
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], (message, errors, log[-4000:])
    assert "exitcode  : 2" in log, log[-3000:]
    assert log.count("Traceback (most recent call last)") <= 1, log[-6000:]
    assert "ConfigError" not in log and "error_file: <N/A>" in log, log[-6000:]


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
