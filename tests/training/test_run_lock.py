"""The output-folder lock: a live holder is refused by name, a gone one is taken over."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
from torchtitan.tools.logging import logger as titan_logger

from trinity_titan.job_config import ConfigError
from trinity_titan.job_config import RunLock as RunLockConfig
from trinity_titan.training.run_lock import (
    LOCK_NAME,
    Holder,
    RunLock,
    lock_name,
    output_folders,
    process_start,
)


def _write_holder(path, **changes) -> Holder:
    holder = Holder(
        host=socket.gethostname(), pid=0, started=time.time() - 60, proc_start="",
        heartbeat=time.time(),
    )  # fmt: skip
    holder = Holder(**{**asdict(holder), **changes})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    return holder


@pytest.fixture
def warnings():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    titan_logger.addHandler(handler)
    yield records
    titan_logger.removeHandler(handler)


def test_take_hold_and_release(tmp_path):
    lock = RunLock(output_folders(str(tmp_path), "checkpoint"), RunLockConfig())
    lock.acquire()
    path = tmp_path / LOCK_NAME
    held = Holder(**json.loads(path.read_text()))
    assert held.pid == lock.me.pid and held.proc_start == process_start(lock.me.pid)
    lock.release()
    assert not path.exists()


def test_a_live_holder_is_refused_by_name(tmp_path):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            path = tmp_path / LOCK_NAME
            _write_holder(path, pid=other.pid, proc_start=process_start(other.pid))
            lock = RunLock(output_folders(str(tmp_path), None), RunLockConfig())
            with pytest.raises(ConfigError) as e:
                lock.acquire()
            message = str(e.value)
            assert f"output folder {tmp_path} is in use by another run" in message
            assert f"host {socket.gethostname()}, pid {other.pid}, started " in message
            assert "--job.dump_folder" in message
            assert json.loads(path.read_text())["pid"] == other.pid  # untouched
            lock.release()  # releases nothing of the other run's
            assert path.exists()
        finally:
            other.kill()


def test_a_dead_or_reused_pid_is_stale_and_taken_over(tmp_path, warnings):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    path = tmp_path / LOCK_NAME
    _write_holder(path, pid=int(gone.stdout))
    lock = RunLock(output_folders(str(tmp_path), None), RunLockConfig())
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == lock.me.pid
    text = [r.getMessage() for r in warnings if r.levelno == logging.WARNING]
    assert any("Taking over the stale lock" in t and "no longer exists" in t for t in text)
    lock.release()

    # this test's own pid, but another process start time: the pid was reused
    _write_holder(path, pid=lock.me.pid, proc_start="1")
    again = RunLock(output_folders(str(tmp_path), None), RunLockConfig())
    again.me = Holder(**{**asdict(again.me), "pid": lock.me.pid, "proc_start": "2"})
    again.acquire()
    assert any("pid was reused" in r.getMessage() for r in warnings)
    again.release()


def test_another_hosts_lock_goes_stale_by_heartbeat(tmp_path, warnings):
    path = tmp_path / LOCK_NAME
    config = RunLockConfig(stale_after_s=100)
    _write_holder(path, host="elsewhere", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(ConfigError, match=r"host elsewhere, pid 1, .*last heartbeat 10 s ago"):
        RunLock(output_folders(str(tmp_path), None), config).acquire()
    _write_holder(path, host="elsewhere", pid=1, heartbeat=time.time() - 101)
    lock = RunLock(output_folders(str(tmp_path), None), config)
    lock.acquire()
    assert any("heartbeat is 101 s old" in r.getMessage() for r in warnings)
    lock.release()


def test_the_heartbeat_is_rewritten(tmp_path):
    lock = RunLock(output_folders(str(tmp_path), None), RunLockConfig(heartbeat_s=0.05))
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()


def test_a_checkpoint_folder_outside_the_dump_folder_is_locked_too(tmp_path):
    folders = output_folders(str(tmp_path / "dump"), str(tmp_path / "ckpts" / "run1"))
    assert list(folders.values()) == [
        tmp_path / "dump" / LOCK_NAME,
        tmp_path / "ckpts" / f"run1.{LOCK_NAME}",
    ]
    assert list(output_folders(str(tmp_path / "dump"), "checkpoint")) == [tmp_path / "dump"]
    # one of two folders in use: the run takes neither
    _write_holder(tmp_path / "ckpts" / f"run1.{LOCK_NAME}", host="elsewhere", pid=1)
    lock = RunLock(folders, RunLockConfig())
    with pytest.raises(ConfigError, match=r"output folder .*run1 is in use"):
        lock.acquire()
    assert not (tmp_path / "dump" / LOCK_NAME).exists()


def test_replica_groups_of_one_run_share_the_folders_but_not_a_replica_id(tmp_path):
    """torchft: each replica group's job locks the shared output folders under its own id."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            _write_holder(
                tmp_path / lock_name(0), pid=other.pid, proc_start=process_start(other.pid)
            )
            group1 = RunLock(output_folders(str(tmp_path), None, lock_name(1)), RunLockConfig())
            group1.acquire()  # group 0 holds its own lock: no conflict
            assert (tmp_path / "trinity_run.replica_1.lock").exists()
            group1.release()
            again0 = RunLock(output_folders(str(tmp_path), None, lock_name(0)), RunLockConfig())
            with pytest.raises(ConfigError, match="is in use by another run"):
                again0.acquire()  # a second job with replica id 0
        finally:
            other.kill()
