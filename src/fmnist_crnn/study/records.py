"""One JSON record per finished run of a study, under ``<out>/runs/<study>/``.

Records are what the comparison is built from. They are small text files meant to be
committed: local experiment refs and the local MLflow store may not follow a study to the next
machine, but a record does, so a study can be run in several goes and its table rebuilt from
git alone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fmnist_crnn.files import atomic_write_json

PLAN_FILE = "plan.json"


def runs_dir(out_dir: Path, study: str) -> Path:
    return out_dir / "runs" / study


def read_records(out_dir: Path, study: str) -> list[dict[str, Any]]:
    folder = runs_dir(out_dir, study)
    paths = sorted(p for p in folder.glob("*.json") if p.name != PLAN_FILE)
    return [json.loads(p.read_text()) for p in paths]


def plan_path(out_dir: Path, study: str) -> Path:
    return runs_dir(out_dir, study) / PLAN_FILE


def read_plan(out_dir: Path, study: str) -> dict[str, Any]:
    path = plan_path(out_dir, study)
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def add_to_plan(out_dir: Path, study: str, runs: dict[str, dict[str, Any]],
                reference_before: dict[str, float] | None = None) -> None:
    """Remember every planned run (name -> variant, seed, overrides), so the comparison can
    say which are missing; and the reference timed before runs still to land (name ->
    seconds), which each record gets as it lands."""
    plan = read_plan(out_dir, study)
    plan["runs"] = {**plan["runs"], **runs}
    if reference_before:
        plan["reference_before"] = {**plan.get("reference_before", {}), **reference_before}
    atomic_write_json(runs_dir(out_dir, study) / PLAN_FILE, plan)


def collect_experiments(study: str, exp_show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten ``dvc exp show --json`` into one record per finished experiment of ``study``."""
    records = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            # A failed experiment carries an error; a running one reports rev "workspace" with
            # whatever its temporary copy holds: neither has results of its own yet.
            finished = not node.get("error") and not (
                node.get("name") and isinstance(data, dict) and data.get("rev") == "workspace")
            if isinstance(data, dict) and "params" in data and finished:
                record = record_from_exp_show_node(node)
                if record and record["study"] == study:
                    records.append(record)
            for value in node.values():
                if isinstance(value, (dict, list)):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(exp_show)
    # One experiment can appear twice: under two baselines, or once by name and once as a bare
    # commit whose "name" is its revision. Keep one record per revision, the named one.
    by_rev: dict[str, dict[str, Any]] = {}
    for record in records:
        kept = by_rev.get(record["rev"])
        if kept is None or kept["name"] == kept["rev"]:
            by_rev[record["rev"]] = record
    unique = {r["name"]: r for r in by_rev.values()}
    return sorted(unique.values(), key=lambda r: r["name"])


def record_from_exp_show_node(node: dict[str, Any]) -> dict[str, Any] | None:
    """One experiment of ``dvc exp show --json`` as a record (without its history), or None
    when it is not a finished run of a study."""
    data = node.get("data") or {}
    params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
    tracking_params = params.get("tracking") or {}
    metrics = data.get("metrics") or {}
    test = (metrics.get("metrics/test.json") or {}).get("data") or {}
    train = (metrics.get("metrics/train.json") or {}).get("data") or {}
    if not tracking_params.get("study") or "accuracy" not in test:
        return None
    train_params = params.get("train") or {}
    return {
        "name": node.get("name") or data.get("name") or node.get("rev"),
        "rev": node.get("rev") or data.get("rev"),
        "study": tracking_params["study"],
        "variant": tracking_params.get("variant"),
        "seed": train_params.get("seed"),
        "epochs": train_params.get("epochs"),
        "num_threads": train_params.get("num_threads"),
        "limit": (params.get("split") or {}).get("limit"),
        "params": params,
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_without_tta": test.get("accuracy_without_tta"),
        "test_loss": test.get("loss"),
        "test_macro_f1": test.get("macro_f1"),
        "best_val_acc": train.get("best_val_acc"),
        "best_epoch": train.get("best_epoch"),
        "params_count": train.get("params_count"),
        "train_seconds": train.get("train_seconds"),
        # seconds_to_val_acc_90, _93, _94, _95 (fmnist_crnn.history.MILESTONE_KEYS)
        **{k: v for k, v in train.items() if k.startswith("seconds_to_val_acc_")},
    }


def record_new(study: str, out_dir: Path, exp_show: list[dict[str, Any]],
               tracked: dict[str, dict[str, Any]]) -> list[str]:
    """Write a record for each finished experiment of ``study`` that has none yet; ``tracked``
    maps experiment names to their MLflow run (id, per-epoch history, environment)."""
    folder = runs_dir(out_dir, study)
    written = []
    for record in collect_experiments(study, exp_show):
        path = folder / f"{record['name']}.json"
        if path.exists():
            continue
        run = tracked.get(record["name"], {})
        record.update(mlflow_run_id=run.get("run_id"), history=run.get("history", {}),
                      environment=run.get("environment", {}),
                      recorded_at=datetime.now(UTC).isoformat(timespec="seconds"))
        atomic_write_json(path, record)
        written.append(record["name"])
    return written


def write_record(out_dir: Path, study: str, record: dict[str, Any]) -> Path | None:
    """Write a record that arrived whole (from a Dask worker); None when the run has one."""
    path = runs_dir(out_dir, study) / f"{record['name']}.json"
    if path.exists():
        return None
    atomic_write_json(path, record)
    return path


# The default run's training seconds timed on the same machine right before a study's runs and
# right after them (`--reference`): a record's ratio is recomputable from the record alone.
REFERENCE_KEY = "reference_train_seconds"


def set_reference(out_dir: Path, study: str, names: list[str], when: str,
                  seconds: float | None, note: str | None = None) -> list[Path]:
    """Write ``seconds`` as the ``when`` ("before" or "after") reference of the records of
    ``names`` that exist; returns the files written."""
    written = []
    for name in names:
        path = runs_dir(out_dir, study) / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        reference = record.get(REFERENCE_KEY) or {"before": None, "after": None}
        reference[when] = seconds
        if note:
            reference["note"] = note
        record[REFERENCE_KEY] = reference
        atomic_write_json(path, record)
        written.append(path)
    return written


def reference_ratio(record: dict[str, Any]) -> float | None:
    """The run's training time over the shorter of its reference times (the larger ratio)."""
    reference = record.get(REFERENCE_KEY) or {}
    times = [t for t in (reference.get("before"), reference.get("after")) if t]
    if not times or not record.get("train_seconds"):
        return None
    return record["train_seconds"] / min(times)
