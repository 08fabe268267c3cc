"""Driving DVC's experiment queue: queue the planned runs that have no result yet, start the
workers, wait. DVC does the running; this module only calls its commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def _dvc_env() -> dict[str, str]:
    # The dvc of this interpreter's environment, whatever PATH says; `dvc queue start` spawns
    # its workers as `dvc` from PATH, so put this environment's bin/ first there too.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc(*args: str, capture: bool = True) -> str:
    """Run ``dvc ARGS`` with this interpreter's DVC; returns its stdout when captured (else
    its output goes where this program's goes)."""
    proc = _run(args, capture_output=capture)
    _check(args, proc, (proc.stderr or proc.stdout or "") if capture else "")
    return proc.stdout if capture else ""


def _run(args: Iterable[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], text=True, env=_dvc_env(),
                          **kwargs)


def _check(args: list[str] | tuple[str, ...], proc: subprocess.CompletedProcess,
           output: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}): "
                           f"{output.strip()[-2000:]}")


def start_workers(jobs: int) -> None:
    """`dvc queue start -j JOBS`, its output printed once it returns.

    The launchers it leaves behind inherit its stdout and stderr and hold them open until
    their worker exits, so these go to a temporary file, never to a pipe: a pipe would block
    this call, or whoever reads this program's output (``| tee``, a test capturing it), until
    the last worker has gone.
    """
    args = ["queue", "start", "-j", str(jobs)]
    with tempfile.TemporaryFile("w+") as log:
        proc = _run(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        output = log.read()
    _check(args, proc, output)
    print(output.strip(), flush=True)


STATES = ("Queued", "Running", "Success", "Failed")


def parse_status(text: str) -> tuple[list[tuple[str, str]], tuple[int, int] | None]:
    """`dvc queue status` output -> its (name, state) rows and its (active, idle) workers."""
    rows = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[-1] in STATES:
            rows.append((words[1], words[-1]))
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return rows, (int(workers[1]), int(workers[2])) if workers else None


def queue_status() -> dict[str, str]:
    """Experiment name -> Queued / Running / Success / Failed, from `dvc queue status`."""
    return dict(parse_status(dvc("queue", "status"))[0])


def queue_runs(runs: Iterable[tuple[str, list[str]]]) -> list[str]:
    """Queue each (name, -S arguments) that is not queued or running already."""
    states = queue_status()
    queued = []
    for name, args in runs:
        if states.get(name) in ("Queued", "Running"):
            print(f"{name}: already {states[name].lower()}")
            continue
        dvc("exp", "run", "--queue", "-n", name, *args)
        queued.append(name)
        print(f"queued {name}")
    return queued


def wait(jobs: int, on_finished: Callable[[], None] = lambda: None,
         poll_s: float = 300.0) -> None:
    """Block until no queued or running experiment is left, calling ``on_finished`` whenever
    a task has finished since the last round (`dvc exp show`, which collecting needs, costs
    ~13 s of CPU with a few dozen experiments: every minute, it would slow the timed runs).

    Workers can exit with tasks still queued (a `dvc queue stop` issued earlier reaches the
    next workers too): then start them again, but only when no task is running and two polls
    in a row saw no worker: a worker just started can run its task before `dvc queue status`
    counts it, and starting another then would run two timed trainings side by side. A
    failed ``on_finished`` is retried at the next poll instead of ending the wait: while a
    worker creates or removes its temporary copy, `dvc exp show` can fail on the half-made
    directory, and the queue runs on regardless.
    """
    finished_before = None
    idle_before = False
    while True:
        rows, workers = parse_status(dvc("queue", "status"))
        finished = sum(state in ("Success", "Failed") for _, state in rows)
        if finished != finished_before:
            try:
                on_finished()
                finished_before = finished
            except RuntimeError as exc:
                print(f"collecting failed, retrying at the next poll: {exc}", flush=True)
        active = [name for name, state in rows if state in ("Queued", "Running")]
        if not active:
            return
        idle = workers == (0, 0) and not any(state == "Running" for _, state in rows)
        if idle and idle_before:
            print("no queue worker is left; starting them again")
            start_workers(jobs)
            idle = False
        idle_before = idle
        print(f"{time.strftime('%H:%M:%S')} {len(active)} experiment(s) queued or running",
              flush=True)
        time.sleep(poll_s)


def time_default_run() -> float:
    """Train the default run again in the workspace (`dvc repro -f -s train && dvc repro`) and
    return its training seconds: the reference a study's times are divided by. The stages
    before train run first, unforced (`dvc repro split`), so a clone where nothing has run yet
    gets its data instead of a train stage that finds no split.

    DVC stages the dvc.lock it rewrites (``core.autostage``), and on another CPU the lock then
    names that machine's outputs; so a lock that was not staged before is unstaged again, and
    the next ``git commit`` of the study's records or the user's own files does not take it.
    """
    import json

    lock_was_staged = _staged("dvc.lock")
    dvc("repro", "split", capture=False)
    dvc("repro", "-f", "-s", "train", capture=False)
    dvc("repro", capture=False)
    if lock_was_staged is False:
        subprocess.run(["git", "reset", "-q", "--", "dvc.lock"], capture_output=True)
    return float(json.loads(Path("metrics/train.json").read_text())["train_seconds"])


def _staged(path: str) -> bool | None:
    """Whether git's index holds a change of ``path`` against HEAD; None outside a git
    repository (or without git), where nothing is staged or unstaged."""
    try:
        proc = subprocess.run(["git", "diff", "--cached", "--quiet", "--", path],
                              capture_output=True)
    except OSError:
        return None
    return {0: False, 1: True}.get(proc.returncode)
