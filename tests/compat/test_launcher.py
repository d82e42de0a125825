"""A torchrun worker ends within seconds of its launcher's death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures import REPO

# The "launcher" starts a "worker" in a session of its own (as torchrun does), prints its pid and
# waits; the worker starts the watchdog, writes the ready file and sleeps.
LAUNCHER = """
import os, subprocess, sys, time
env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
code = ("import pathlib, sys, time; from trinity_titan.compat.launcher import "
        "exit_when_launcher_dies; exit_when_launcher_dies(poll_s=0.2); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(300)")
worker = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], env=env,
                          start_new_session=True)
print(worker.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_worker_exits_when_its_launcher_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ready)], env=env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    worker = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 180  # importing trinity_titan (torch, torchtitan)
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert _alive(worker)  # the watchdog leaves a worker with a live launcher alone
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its launcher by 10 s"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_without_torchrun_there_is_no_watchdog():
    from trinity_titan.compat.launcher import exit_when_launcher_dies

    env_had = os.environ.pop("TORCHELASTIC_RUN_ID", None)
    try:
        assert exit_when_launcher_dies() is None
    finally:
        if env_had is not None:
            os.environ["TORCHELASTIC_RUN_ID"] = env_had
