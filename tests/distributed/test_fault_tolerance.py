"""Fault-tolerant HSDP with torchft on CPU: a replica group dies, the other keeps training, and the
restarted group heals from it.

Two replica groups of one rank each (gloo), each its own torchrun job of
`-m tests.distributed.ft_dump_trainer` (trinity_titan.train_ft plus a state dump after every
step), and a torchft lighthouse on 127.0.0.1, all on free ports. The run uses everything that
carries state across steps and groups: Muon + AdamW, SMEBU (expert bias and momentum), the
balance loss and each group's data position. Group 1 is killed with SIGKILL mid-run: group 0 keeps
stepping (its log goes on past the kill with one replica group in the step) without a restart.
Group 1 is started again: it loads its own data position, heals from group 0 (weights, Muon and
AdamW state, expert bias and SMEBU momentum, LR schedule, step), and both then train in step:
equal losses and bitwise-equal state at every common step after the heal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import DEBUG_TOML, REPO, descendants, losses_of

pytestmark = pytest.mark.slow

DEADLINE_S = 170
"""The whole scenario's time limit (it took 40-60 s per variant on a 2-core CPU)."""
ARGS = (
    "--training.steps", "2000",  # never reached: the test stops the groups
    "--training.local_batch_size", "2",
    "--lr_scheduler.warmup_steps", "2",
    "--optimizer.name", "Muon",
    "--optimizer.muon_lr", "2e-2",
    "--moe.balance_method", "smebu",
    "--moe.smebu_lambda", "5e-2",
    "--moe.balance_loss_coeff", "1e-2",
    "--fault_tolerance.enable",
    "--fault_tolerance.group_size", "2",
    "--fault_tolerance.process_group_timeout_ms", "5000",
)  # fmt: skip
_HEALTH = re.compile(r"health\s+(\d+)\s.*ft/replica_groups: (\d+)")
_HEALED = re.compile(r"Healed from a live replica group: at step (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A process tree started in its own session, its output in a file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the launcher and everything below it (torchrun's workers have sessions of
        their own), workers first."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class Group(Job):
    """One replica group: a torchrun job of the dump trainer."""

    def __init__(
        self, replica: int, ranks: int, dump: Path, log: Path, env: dict[str, str]
    ) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--standalone", "-m", "tests.distributed.ft_dump_trainer",
               "--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(dump),
               "--metrics.disable_color_printing", *ARGS,
               "--parallelism.data_parallel_shard_degree", str(ranks),
               "--fault_tolerance.replica_id", str(replica)]  # fmt: skip
        super().__init__(cmd, log, env)
        self.states = [dump / "ft_state" / f"replica_{replica}_rank{r}" for r in range(ranks)]

    def losses(self) -> dict[int, float]:
        return losses_of(self.log())

    def groups_in_step(self) -> dict[int, int]:
        """{step: replica groups whose data the step used}, from the health lines."""
        return _groups(self.log())

    def dumped_steps(self) -> set[int]:
        """Steps whose state every rank has written."""
        per_rank = [{int(p.stem.split("-")[1]) for p in f.glob("step-*.pt")} for f in self.states]
        return set.intersection(*per_rank)

    def dump(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Every rank's state after `step` (its shards, with FSDP)."""
        return [torch.load(f / f"step-{step}.pt") for f in self.states]


def wait_until(what: str, done: Callable[[], bool], jobs: list[Job], deadline: float) -> None:
    """Poll `done` until it holds; fail if a job exits or the deadline passes."""
    while not done():
        for job in jobs:
            if job.proc.poll() is not None:
                raise AssertionError(f"{job.log_path.name} exited while waiting for {what}:\n"
                                     f"{job.log()[-6000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {j.log_path.name}\n{j.log()[-3000:]}" for j in jobs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


@pytest.mark.parametrize("ranks", [1, 2], ids=["1_rank", "fsdp_2_ranks"])
def test_a_killed_group_drops_out_and_heals_on_restart(tmp_path, ranks):
    deadline = time.monotonic() + DEADLINE_S
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{port}")  # fmt: skip
    lighthouse_bin = Path(sys.executable).parent / "torchft_lighthouse"
    dump = tmp_path / "run"  # the groups share their output folder, as on a cluster
    jobs: list[Job] = []
    try:
        lighthouse = Job([str(lighthouse_bin), "--min_replicas", "1", "--join_timeout_ms", "1000",
                          "--quorum_tick_ms", "100", "--heartbeat_timeout_ms", "1000",
                          "--bind", f"127.0.0.1:{port}"], tmp_path / "lighthouse.log", env)  # fmt: skip
        jobs.append(lighthouse)
        a = Group(0, ranks, dump, tmp_path / "group0.log", env)
        b = Group(1, ranks, dump, tmp_path / "group1.log", env)
        jobs += [a, b]
        wait_until("both groups in the steps", lambda: sum(
            n == 2 for n in a.groups_in_step().values()) >= 3, jobs, deadline)  # fmt: skip

        b.kill()
        jobs.remove(b)
        killed_at = max(a.losses())
        wait_until("group 0 to step on alone", lambda: sum(
            s > killed_at and n == 1 for s, n in a.groups_in_step().items()) >= 5, jobs, deadline)  # fmt: skip
        alone = sorted(s for s, n in a.groups_in_step().items() if s > killed_at and n == 1)

        b = Group(1, ranks, dump, tmp_path / "group1_restarted.log", env)
        jobs.append(b)
        wait_until("group 1 to heal", lambda: _HEALED.search(b.log()) is not None, jobs, deadline)
        healed_at = int(_HEALED.search(b.log()).group(1))
        wait_until("common steps after the heal", lambda: len(
            {s for s in a.dumped_steps() & b.dumped_steps() if s > healed_at}) >= 3, jobs, deadline)  # fmt: skip
        common = sorted(s for s in a.dumped_steps() & b.dumped_steps() if s > healed_at)
        states = {s: (a.dump(s), b.dump(s)) for s in common[:3]}
        log_a, log_b = a.log(), b.log()
    finally:
        for job in jobs:
            job.kill()

    # Group 0 trained on through the kill: one launch, steps past the kill in a quorum of one.
    assert log_a.count("Training starts at step 1") == ranks, log_a[-3000:]  # each rank, once
    assert alone[0] <= killed_at + 3 and len(alone) >= 5, (killed_at, alone)
    # The restarted group resumed its data position and took group 0's step.
    assert re.search(r"Loading the FT checkpoint at step \d+", log_b), log_b[-3000:]
    assert healed_at > killed_at, (healed_at, killed_at)
    # In step again: the live groups' loss, two groups in each step, identical state on each rank.
    losses_a, losses_b = losses_of(log_a), losses_of(log_b)
    groups_a, groups_b = _groups(log_a), _groups(log_b)
    assert groups_b[healed_at] == 1, groups_b  # the healing group's own batch does not count
    for step in common:
        assert losses_a[step] == losses_b[step], (step, losses_a[step], losses_b[step])
        assert groups_a[step] == groups_b[step] == 2, (step, groups_a, groups_b)
    for step, (ranks_a, ranks_b) in states.items():
        for sa, sb in zip(ranks_a, ranks_b, strict=True):
            assert set(sa) == set(sb)
            for part in ("expert_bias", "expert_bias_momentum", "momentum_buffer", "exp_avg_sq"):
                assert any(part in k for k in sa), part
            momenta = [k for k in sa if k.endswith("expert_bias_momentum")]
            assert any(sa[k].abs().max() > 0 for k in momenta), "SMEBU momentum never moved"
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (step, key)


def _groups(log: str) -> dict[int, int]:
    return {int(s): int(n) for s, n in _HEALTH.findall(log)}
