"""A durable, ordered journal of one tracked run's calls, and how far it has been sent.

The tracking module writes every MLflow call here first and sends it when the server answers,
so a run keeps training while the server is away, a crash loses nothing that was written, and
nothing is sent twice. This module knows files only, not MLflow.

One folder per run, ``<root>/.mlflow-journal/<run_id>/``:

    meta.json      tracking URI, experiment and run id (written once, when the run opens)
    entries.jsonl  one JSON object per call, ``seq`` 0, 1, 2, ... appended and fsync'ed
    sent.json      ``{"sent": N, "results": {...}}``: entries below N have reached the server
    files/<seq>/   what an entry sends as a file (figures, tables, the model), copied there

Appends take an exclusive ``flock`` on the folder's ``lock`` file, sends one on ``send.lock``
(so appending never waits for the network), and two processes (the train stage and ``python -m
fmnist_crnn.tracking sync``) never send the same entry at once. A sent entry's files are
removed; the entry stays (evaluate reads which params the run has from it).
A line cut short by a crash mid-append is not an entry: it is dropped when the next append
rewrites the tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmnist_crnn.files import atomic_write_json

JOURNAL_DIR = ".mlflow-journal"


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def create(cls, root: Path, run_id: str, meta: dict[str, Any]) -> Journal:
        journal = cls(Path(root) / JOURNAL_DIR / run_id)
        (journal.folder / "files").mkdir(parents=True, exist_ok=True)
        if not (journal.folder / "meta.json").exists():
            atomic_write_json(journal.folder / "meta.json", {"run_id": run_id, **meta})
        return journal

    @classmethod
    def find(cls, root: Path, run_id: str) -> Journal | None:
        folder = Path(root) / JOURNAL_DIR / run_id
        return cls(folder) if (folder / "meta.json").exists() else None

    @classmethod
    def all(cls, root: Path) -> list[Journal]:
        base = Path(root) / JOURNAL_DIR
        return [cls(p.parent) for p in sorted(base.glob("*/meta.json"))]

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @contextlib.contextmanager
    def locked(self, name: str = "lock") -> Iterator[None]:
        with open(self.folder / name, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def sending(self) -> contextlib.AbstractContextManager[None]:
        return self.locked("send.lock")

    def entries(self) -> list[dict[str, Any]]:
        path = self.folder / "entries.jsonl"
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the tail of an append cut short by a crash
                break
        return entries

    def files_for(self, seq: int) -> Path:
        folder = self.folder / "files" / str(seq)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def append(self, op: str, files: dict[str, Path] | None = None, **fields: Any) -> int:
        """Write one entry (and copy ``files`` beside it) durably; return its ``seq``.

        Files are copied before the entry is written, so an entry never names a missing file.
        """
        with self.locked():
            entries = self.entries()
            seq = len(entries)
            copied = {}
            for key, source in (files or {}).items():
                target = self.files_for(seq) / Path(source).name
                shutil.copyfile(source, target)
                copied[key] = str(target.relative_to(self.folder))
            entry = {"seq": seq, "op": op, **fields, **({"files": copied} if copied else {})}
            path = self.folder / "entries.jsonl"
            # Rewrite a torn tail, if any, so the new entry starts on a line of its own.
            good = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
            if path.exists() and path.read_text() != good:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(good)
                os.replace(tmp, path)
            with open(path, "a") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            return seq

    def state(self) -> dict[str, Any]:
        path = self.folder / "sent.json"
        return json.loads(path.read_text()) if path.exists() else {"sent": 0, "results": {}}

    def mark_sent(self, seq: int, result: Any = None) -> None:
        state = self.state()
        state["sent"] = seq + 1
        if result is not None:
            state["results"][str(seq)] = result
        atomic_write_json(self.folder / "sent.json", state)
        shutil.rmtree(self.folder / "files" / str(seq), ignore_errors=True)

    def pending(self) -> list[dict[str, Any]]:
        return self.entries()[self.state()["sent"]:]

    def path_of(self, entry: dict[str, Any], key: str) -> Path:
        return self.folder / entry["files"][key]
