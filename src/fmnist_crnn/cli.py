"""Shared plumbing for the stage scripts: parse paths, load params, turn errors into messages."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from fmnist_crnn import guard, timings
from fmnist_crnn.config import DeclaredParams, Params, load_params
from fmnist_crnn.errors import ProjectError, Terminated


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    return p


def run(main: Callable[[argparse.Namespace, Params], None], p: argparse.ArgumentParser,
        declared: tuple[str, ...]) -> None:
    """Parse arguments, load params and call ``main`` with the ``declared`` keys (sections or
    dotted keys, as the stage's ``params`` in dvc.yaml) and nothing else.

    Known errors exit 2 with one message naming the problem; Ctrl-C exits 130, SIGTERM 143
    (both after the tracked run has been ended KILLED).
    """
    args = p.parse_args()
    guard.watch()  # under a study attempt: stop when its guard is gone
    startup = timings.since_process_start() if timings.enabled() else 0.0
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        main(args, DeclaredParams(params, declared))
        timings.write(timings.stage_name(), startup, time.perf_counter() - started)
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print("interrupted; completed outputs and checkpoints are kept", file=sys.stderr)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
