"""One run per output folder, under torchrun: a second run is refused by name, and a run whose
launcher was killed leaves no orphans behind; its stale lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.distributed.launch import (
    alive,
    assert_clean_failure,
    descendants,
    run_train,
    start_train,
    wait_for_line,
)
from trinity_titan.training.run_lock import LOCK_NAME

pytestmark = pytest.mark.slow


def test_one_run_per_folder_and_a_killed_launcher_frees_it(tmp_path):
    dump = tmp_path / "run"
    first = start_train(dump, 2, "--training.steps", "100000", "--metrics.log_freq", "50",
                        module="trinity_titan.train")  # fmt: skip
    try:
        wait_for_line(first, r"step:\s*1\s+loss")
        holder = json.loads((dump / LOCK_NAME).read_text())

        # A second run on the folder (the other launcher) stops in seconds, naming the holder.
        start = time.monotonic()
        _, log = run_train(dump, 1, "--training.steps", "2", check=False, timeout=300)
        assert_clean_failure(log, f"the output folder {dump} is in use by another run")
        assert f"pid {holder['pid']}, started " in log and "--job.dump_folder" in log
        assert "Building trinity" not in log and "step:" not in log
        assert time.monotonic() - start < 120
        assert json.loads((dump / LOCK_NAME).read_text())["pid"] == holder["pid"]

        # kill -9 of the launcher alone: its workers (own sessions) notice and exit.
        workers = descendants(first.pid)
        assert holder["pid"] in workers
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 15
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers outlived their launcher by 15 s"
        assert "torchrun launcher (pid" in first.stdout.read()
    finally:
        for pid in [*descendants(first.pid), first.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    # A relaunch takes the stale lock over, trains, and releases the lock at its end. A worker
    # whose peer exited first may end through the collective's error instead of its watchdog:
    # then it released the lock on its way out, and there is nothing to take over.
    stale = (dump / LOCK_NAME).exists()
    losses, log = run_train(dump, 2, "--training.steps", "2", module="trinity_titan.train")
    if stale:
        lock_lines = [x for x in log.splitlines() if "lock" in x.lower()]
        assert "Taking over the stale lock" in log, lock_lines
        assert f"pid {holder['pid']}, started " in log and "no longer exists" in log
    assert sorted(losses) == [1, 2]
    assert not (dump / LOCK_NAME).exists()
