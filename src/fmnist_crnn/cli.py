"""Shared plumbing for the stage scripts: parse paths, load params, turn errors into messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fmnist_crnn.config import SECTIONS, Params, load_params
from fmnist_crnn.errors import ProjectError, Terminated


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    return p


class SectionView:
    """The sections of Params a stage declared; reading any other one is an error.

    dvc.yaml must list every params section a stage reads, or changing it would not re-run the
    stage. Each stage declares its sections, this view enforces them at run time, and a test
    checks the declarations against dvc.yaml.
    """

    def __init__(self, params: Params, sections: tuple[str, ...]) -> None:
        self._params = params
        self._sections = sections

    def __getattr__(self, name: str):
        if name in self._sections:
            return getattr(self._params, name)
        raise AttributeError(f"this stage reads params section '{name}' but declares only "
                             f"{list(self._sections)}; declare it and list it in dvc.yaml")


def run(main: Callable[[argparse.Namespace, Params], None], p: argparse.ArgumentParser,
        sections: tuple[str, ...]) -> None:
    """Parse arguments, load params and call ``main`` with the declared ``sections``.

    Known errors exit 2 with one message naming the problem; Ctrl-C exits 130, SIGTERM 143
    (both after the tracked run has been ended KILLED).
    """
    args = p.parse_args()
    try:
        params = load_params(args.params)
        view = params if set(sections) >= set(SECTIONS) else SectionView(params, sections)
        main(args, view)
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print("interrupted; completed outputs and checkpoints are kept", file=sys.stderr)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
