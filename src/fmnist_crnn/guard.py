"""A stage started under a study attempt stops when that attempt's guard is gone.

``python -m fmnist_crnn.study.attempt`` runs ``dvc exp run`` as a process group of its own and
stops that group when its worker dies. When the guard dies too (SIGKILL to the worker's whole
process group, as a terminal, a supervisor or a batch system sends it), nobody is left to stop
the group: ``dvc exp run`` and its stage are re-parented to init and would train on beside the
attempt Dask starts again. So the guard names itself in ``FMNIST_ATTEMPT_GUARD`` (its pid and
start time, so a reused pid is not mistaken for it), and every stage (fmnist_crnn.cli) watches
it from a thread: once it is gone, SIGTERM to the stage's process group (the stage ends its
MLflow run KILLED; DVC and torchrun's children stop), SIGKILL after ``GRACE_S``.

Linux (``/proc``); elsewhere nothing is watched. Standard library only: every stage imports it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

ENV = "FMNIST_ATTEMPT_GUARD"
POLL_S = 1.0
GRACE_S = 30.0


def identity(pid: int) -> str | None:
    """``PID:START`` (the start time in clock ticks since boot, from /proc), or None when the
    process does not exist or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the name in field 2 may hold spaces, so count after its ')'.
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def env_for_children() -> dict[str, str]:
    """What the guard adds to its command's environment (empty without /proc)."""
    me = identity(os.getpid())
    return {ENV: me} if me else {}


def guard_gone(value: str) -> bool:
    pid = value.split(":", 1)[0]
    return not pid.isdigit() or identity(int(pid)) != value


def watch(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> threading.Thread | None:
    """Start the watching thread when this process runs under a guard; returns it."""
    value = os.environ.get(ENV)
    if not value or identity(os.getpid()) is None:
        return None

    def loop() -> None:
        while not guard_gone(value):
            time.sleep(poll_s)
        group = os.getpgrp()
        print(f"attempt guard {value.split(':')[0]} is gone (killed with its worker); stopping "
              f"process group {group}", file=sys.stderr, flush=True)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
            os.killpg(group, sig)
            time.sleep(wait_s)

    thread = threading.Thread(target=loop, name="attempt-guard", daemon=True)
    thread.start()
    return thread
