"""One run per output folder: a lock file that names its holder (host, pid, start time).

Two trainings on one dump folder would write into the same step folders, and the last writer
would silently win. Rank 0 takes this lock before any compute (trinity_titan/training/run_start.py);
a second run finds it held and stops with a `ConfigError` naming the folder and the holder.

A lock whose holder is gone is stale, and is taken over with a WARNING:
- on the holder's own host, when its process no longer exists (its pid, with the process start
  time, so that a reused pid does not count);
- from another host, when the holder's heartbeat (rewritten every `run_lock.heartbeat_s`) is older
  than `run_lock.stale_after_s` (the hosts' clocks are assumed to agree to well within that).

Readers and writers of the lock file serialise on `flock` where the file system has it, so two
runs that start together cannot both take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torchtitan.tools.logging import logger

from trinity_titan.job_config import ConfigError
from trinity_titan.job_config import RunLock as RunLockConfig

LOCK_NAME = "trinity_run.lock"
"""The lock file inside the dump folder (beside a checkpoint folder outside it: `<name>.trinity_run.lock`)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written into the lock file."""

    host: str
    pid: int
    started: float
    """Unix time the run took the lock."""
    proc_start: str
    """Field 22 of /proc/<pid>/stat (start time since boot); '' where there is no /proc."""
    heartbeat: float
    """Unix time of the holder's last heartbeat."""

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"host {self.host}, pid {self.pid}, started {started}, last heartbeat "
            f"{max(0.0, now - self.heartbeat):.0f} s ago"
        )

    def is_same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.proc_start) == (other.host, other.pid, other.proc_start)


def process_start(pid: int) -> str:
    """The kernel's start time of process `pid` ('' if it does not exist or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: Holder, now: float, config: RunLockConfig) -> str | None:
    """Why `holder` is gone (None: it may still be running)."""
    if holder.host == socket.gethostname():
        if not _pid_exists(holder.pid):
            return f"process {holder.pid} no longer exists"
        if holder.proc_start and process_start(holder.pid) not in ("", holder.proc_start):
            return f"process {holder.pid} is another process now (the pid was reused)"
        return None
    age = now - holder.heartbeat
    if age > config.stale_after_s:
        return (
            f"its heartbeat is {age:.0f} s old (> run_lock.stale_after_s = "
            f"{config.stale_after_s:g} s)"
        )
    return None


@contextlib.contextmanager
def _exclusive(path: Path, create: bool = True) -> Iterator[int]:
    """The lock file open for reading and writing, under an exclusive flock where supported.
    FileNotFoundError if it does not exist and `create` is False."""
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                os.close(fd)
                raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False  # released (unlinked) while we waited: open the new file
        if same:
            break
        os.close(fd)
        if not create:
            raise FileNotFoundError(errno.ENOENT, "lock file was removed", str(path))
    try:
        yield fd
    finally:
        os.close(fd)  # also drops the flock


def _read(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # not a lock we wrote (or a torn write of a crashed writer): treat as free


def _write(fd: int, holder: Holder) -> None:
    data = json.dumps(asdict(holder)).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def lock_name(replica_id: int | None = None) -> str:
    """The lock file's name: one per run, or one per torchft replica group (the groups of one
    fault-tolerant run share their output folders)."""
    return LOCK_NAME if replica_id is None else f"trinity_run.replica_{replica_id}.lock"


def output_folders(
    dump_folder: str, checkpoint_folder: str | None, name: str = LOCK_NAME
) -> dict[Path, Path]:
    """Folder -> its lock file: the dump folder (lock inside), and a checkpoint folder outside it
    (lock beside it: inside, TorchTitan would take the folder's existence for a resume)."""
    dump = Path(dump_folder).absolute()
    folders = {dump: dump / name}
    if checkpoint_folder is not None:
        ckpt = Path(os.path.normpath(dump / checkpoint_folder))
        if dump != ckpt and dump not in ckpt.parents:
            folders[ckpt] = ckpt.parent / f"{ckpt.name}.{name}"
    return folders


class RunLock:
    """The lock files of one run; rank 0 owns it for the run's lifetime."""

    def __init__(self, folders: dict[Path, Path], config: RunLockConfig) -> None:
        self.folders = folders
        """Output folder -> its lock file."""
        self.config = config
        self.me = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            proc_start=process_start(os.getpid()),
            heartbeat=time.time(),
        )
        self.held: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take every lock file or none; ConfigError if a live run holds one."""
        try:
            for folder, path in self.folders.items():
                self._take(folder, path)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="trinity-run-lock", daemon=True)
        self._thread.start()

    def _take(self, folder: Path, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path) as fd:
            holder, now = _read(fd), time.time()
            if holder is not None and not holder.is_same_process(self.me):
                reason = stale_reason(holder, now, self.config)
                if reason is None:
                    raise ConfigError(
                        f"the output folder {folder} is in use by another run ({holder.describe(now)}; "
                        f"lock file {path}). Fix: wait for that run to end or stop it, or set "
                        "--job.dump_folder to another folder. A lock whose run is gone is taken "
                        "over by itself: at once on the same host, after run_lock.stale_after_s "
                        "without heartbeat from another host."
                    )
                logger.warning(
                    f"Taking over the stale lock {path} of a run that ended without releasing it "
                    f"({holder.describe(now)}): {reason}"
                )
            _write(fd, self.me)
        self.held.append(path)

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            for path in self.held:
                try:
                    with _exclusive(path, create=False) as fd:
                        holder = _read(fd)
                        if holder is not None and holder.is_same_process(self.me):
                            self.me = Holder(**{**asdict(self.me), "heartbeat": time.time()})
                            _write(fd, self.me)
                            continue
                except FileNotFoundError:
                    holder = None
                self._taken_over(path, holder)

    def _taken_over(self, path: Path, holder: Holder | None) -> None:
        """Another run decided this one was gone: two runs must never share a folder."""
        by = holder.describe(time.time()) if holder else "the lock file was removed"
        sys.stderr.write(
            f"error: the lock {path} was taken over by another run ({by}); this run stops so "
            "that two runs never write into one folder\n"
        )
        sys.stderr.flush()
        os._exit(3)

    def release(self) -> None:
        """Remove the lock files this run holds (never another run's; nothing in a forked child,
        e.g. a dataloader worker, that inherited this object)."""
        if os.getpid() != self.me.pid:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for path in reversed(self.held):
            with contextlib.suppress(FileNotFoundError), _exclusive(path, create=False) as fd:
                holder = _read(fd)
                if holder is not None and holder.is_same_process(self.me):
                    os.unlink(path)
        self.held = []
