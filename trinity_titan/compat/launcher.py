"""Work-around for torchrun (torch elastic): its workers outlive a killed launcher.

torchrun starts every worker in a session of its own, so a `kill -9` of the launcher (or of its
process group) leaves the workers training as orphans: they keep the run's lock and keep writing
checkpoints, and a relaunch would run beside them. `exit_when_launcher_dies` gives each worker a
watchdog thread that ends it within about a second of its launcher's death. (PR_SET_PDEATHSIG is
not used: it fires when the parent *thread* ends, which need not be the launcher's end.) The
parent is read when the watchdog starts, at `import trinity_titan`; a launcher that died before
that is not seen (its pid cannot tell: torchrun may itself be pid 1 in a container).
"""

from __future__ import annotations

import os
import sys
import threading


def launched_by_torchrun() -> bool:
    """torch elastic's agent sets TORCHELASTIC_RUN_ID in the environment of every worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_when_launcher_dies(poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun, start a daemon thread that exits this worker (status 1) once its parent,
    the launcher, is gone; returns the thread (None when not launched by torchrun)."""
    if not launched_by_torchrun():
        return None
    launcher = os.getppid()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != launcher:
                sys.stderr.write(
                    f"error: rank {os.environ.get('RANK', '?')} (pid {os.getpid()}) exits: its "
                    f"torchrun launcher (pid {launcher}) is gone\n"
                )
                sys.stderr.flush()
                os._exit(1)

    thread = threading.Thread(target=watch, name="trinity-launcher-watch", daemon=True)
    thread.start()
    return thread
