"""The per-epoch history: the file the report and the study records read
(plots/history.csv), the same epochs as DVCLive writes them while training runs, and time to
accuracy."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from fmnist_crnn.files import atomic_write_bytes

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                  "epoch_seconds")


# Validation accuracies whose time-to-reach train.json records, under these keys.
MILESTONES = (0.90, 0.93, 0.94, 0.95)
MILESTONE_KEYS = tuple(f"seconds_to_val_acc_{round(t * 100)}" for t in MILESTONES)


def seconds_to_accuracy(history: list[dict[str, float]], target: float) -> float | None:
    """Training seconds (validation included) until val_acc first reaches ``target``."""
    elapsed = 0.0
    for record in history:
        elapsed += record["epoch_seconds"]
        if record.get("val_acc", 0.0) >= target:
            return elapsed
    return None


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        # A value the run did not measure (no validation split) is an empty cell.
        writer.writerow({k: (int(row[k]) if k == "epoch" else f"{row[k]:.6g}")
                         for k in HISTORY_FIELDS if k in row})
    atomic_write_bytes(path, buffer.getvalue().encode())


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class LiveHistory:
    """Each epoch's metrics written by DVCLive as the epoch ends (``<folder>/metrics.json`` and
    ``<folder>/plots/metrics/<name>.tsv``, step = epoch), so `dvc exp show` and DVC's VS Code
    extension show a running or queued experiment's progress from its workspace
    (docs/decisions.md). A resumed run first writes the epochs it resumes from."""

    def __init__(self, folder: Path, earlier: list[dict[str, float]]) -> None:
        from dvclive import Live

        self._live = Live(str(folder), dvcyaml=None, save_dvc_exp=False, report=None)
        for record in earlier:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        self._live.step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch":
                self._live.log_metric(key, value)
        self._live.next_step()

    def end(self) -> None:
        self._live.end()
