"""Where a stage's time goes, for `make bench-overhead` (benchmarks/overhead.py).

With FMNIST_CRNN_TIMINGS naming a file, each stage appends one JSON line to it when it ends:
the seconds from its process's start to its ``main`` (the interpreter and the imports), its
``main`` in all, and the named spans measured inside it (opening the MLflow run, waiting for
the journal at the end, model logging, registration). Without the variable nothing is
measured or written, and this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "FMNIST_CRNN_TIMINGS"
_spans: dict[str, float] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def add(name: str, seconds: float) -> None:
    with _lock:
        _spans[name] = _spans.get(name, 0.0) + seconds


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    """Add the time spent inside to ``name`` (any thread; spans of one name add up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def since_process_start() -> float:
    """Seconds since this process started: the interpreter, its imports and, for a stage,
    the shell of stages/run.sh that exec'd it."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def write(stage: str, startup_s: float, main_s: float) -> None:
    """Append this stage's line to the file FMNIST_CRNN_TIMINGS names."""
    path = os.environ.get(ENV)
    if not path:
        return
    with _lock:
        line = {"stage": stage, "pid": os.getpid(), "startup_s": round(startup_s, 3),
                "main_s": round(main_s, 3), **{k: round(v, 3) for k, v in _spans.items()}}
    with open(Path(path), "a") as out:
        out.write(json.dumps(line) + "\n")


def stage_name() -> str:
    return Path(sys.argv[0]).stem
