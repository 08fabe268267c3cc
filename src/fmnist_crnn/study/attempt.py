"""``python -m fmnist_crnn.study.attempt PARENT_PID -- COMMAND ...``: run COMMAND as a process
group that does not outlive the process that started it.

A Dask worker runs each study run (``dvc exp run`` and the stages it starts) through this. When
the worker dies, even by SIGKILL, its children are re-parented and would keep training beside
the attempt Dask starts again elsewhere. Here the kernel's parent-death signal (Linux) and a
check of the parent every second both notice, and the whole group is stopped: SIGTERM first,
so the train stage ends its MLflow run KILLED, then SIGKILL after ``GRACE_S``. SIGTERM or
SIGINT sent to this process does the same. The exit status is COMMAND's, or 143 when stopped.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from fmnist_crnn import guard

GRACE_S = 30.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent goes (Linux; elsewhere the poll does it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the group, SIGKILL to what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m fmnist_crnn.study.attempt PARENT_PID -- COMMAND ...",
              file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    _die_with_parent()
    if os.getppid() != parent:  # gone before the kernel was asked to tell
        return 143
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The stages watch this process (fmnist_crnn.guard): if it is killed with its worker,
    # they stop the group themselves.
    proc = subprocess.Popen(command, start_new_session=True,
                            env={**os.environ, **guard.env_for_children()})
    while True:
        if stopping or os.getppid() != parent:
            print(f"attempt: the process that started it is gone or asked to stop; stopping "
                  f"process group {proc.pid}", file=sys.stderr, flush=True)
            stop_group(proc.pid)
            proc.wait()
            return 143
        try:
            status = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            continue
        # The leader is done; members it left behind (none, normally) go with it.
        if group_alive(proc.pid):
            stop_group(proc.pid, grace_s=5.0)
        return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
