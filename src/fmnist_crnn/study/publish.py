"""The committed run records in an MLflow store: every record of ``reports/study/runs/`` becomes
a FINISHED run (params, per-epoch history, summary metrics, environment), tagged as imported,
so a fresh clone compares the committed studies in the MLflow UI without re-running them.

``python -m fmnist_crnn.study publish`` (``make ui`` runs it first) loads them into the local
store; with ``MLFLOW_TRACKING_URI`` set, into a team's tracking server. Loading twice adds
nothing; a record that changed replaces its imported run; runs made here are never touched.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.parse
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from fmnist_crnn import tracking
from fmnist_crnn.history import MILESTONE_KEYS
from fmnist_crnn.study.catalog import flatten
from fmnist_crnn.study.records import PLAN_FILE

# A record's summary metrics, logged at step 0 under the names the stages log them.
SUMMARY = ("test_accuracy", "test_accuracy_without_tta", "test_loss", "test_macro_f1",
           "best_val_acc", "best_epoch", "params_count", "train_seconds",
           *MILESTONE_KEYS)


def record_files(out_dir: Path, studies: list[str] | None = None) -> list[Path]:
    base = out_dir / "runs"
    folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    return [path for folder in folders if not studies or folder.name in studies
            for path in sorted(folder.glob("*.json")) if path.name != PLAN_FILE]


def last_commit(path: Path) -> str:
    proc = subprocess.run(["git", "log", "-1", "--format=%H", "--", path.name],
                          cwd=path.parent, capture_output=True, text=True)
    return proc.stdout.strip() or "uncommitted"


def import_tags(record: dict[str, Any], path: Path) -> dict[str, str]:
    """The tags a run made here has (study, variant, DVC experiment, environment), and the
    ones that say where it came from."""
    tags = {"study": record["study"], "variant": record.get("variant") or "",
            "dvc_exp_name": record["name"], "dvc_exp_rev": record.get("rev") or "",
            "imported": "true", "imported.study": record["study"],
            "imported.variant": record.get("variant") or "",
            "imported.seed": str(record.get("seed")), "imported.file": str(path),
            "imported.commit": last_commit(path)}
    tags.update({f"env.{k}": str(v) for k, v in (record.get("environment") or {}).items()})
    return tags


def publish(out_dir: Path, experiment_name: str,
            studies: list[str] | None = None) -> Counter:
    """Import every record (of ``studies``, or all); returns how many were added, replaced,
    unchanged."""
    done: Counter = Counter()
    for path in record_files(out_dir, studies):
        record = json.loads(path.read_text())
        when = datetime.fromisoformat(record["recorded_at"]) if record.get("recorded_at") \
            else datetime.fromtimestamp(path.stat().st_mtime)
        done[tracking.import_finished_run(
            experiment_name, key=f"{record['study']}/{record['name']}",
            digest=hashlib.sha256(path.read_bytes()).hexdigest(), run_name=record["name"],
            params=flatten(record.get("params") or {}), history=record.get("history") or {},
            metrics={k: record.get(k) for k in SUMMARY}, tags=import_tags(record, path),
            time_ms=int(when.timestamp() * 1000))] += 1
    return done


def curves_url(ui: str, experiment_id: str, run_ids: list[str], metric: str = "val_acc") -> str:
    """The MLflow UI's page of ``metric`` per epoch for ``run_ids``, side by side (the page
    "Compare" then a metric name opens)."""
    def j(value: Any) -> str:
        return urllib.parse.quote(json.dumps(value), safe="")

    return (f"{ui.rstrip('/')}/#/metric?runs={j(run_ids)}&metric={j(metric)}"
            f"&experiments={j([experiment_id])}&plot_metric_keys={j([metric])}"
            f"&plot_layout={j({})}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
            f"&show_point=false&deselected_curves={j([])}&last_linear_y_axis_range={j([])}")


def compare_url(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's compare page of ``run_ids`` (params, metrics, plots)."""
    def j(value: Any) -> str:
        return urllib.parse.quote(json.dumps(value), safe="")

    return f"{ui.rstrip('/')}/#/compare-runs?runs={j(run_ids)}&experiments={j([experiment_id])}"
