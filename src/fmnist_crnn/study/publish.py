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
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from fmnist_crnn.history import MILESTONE_KEYS
from fmnist_crnn.study.catalog import flatten
from fmnist_crnn.study.records import PLAN_FILE
from fmnist_crnn.tracking.store import _param_value, _with_retries, configure

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
        done[import_finished_run(
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


# --- MLflow: this module and fmnist_crnn.tracking are the ones that import it ------------

def study_runs(experiment_name: str, study: str,
               keys: tuple[str, ...] = ("val_acc", "val_loss", "train_acc", "train_loss"),
               ) -> dict[str, dict[str, Any]]:
    """The finished MLflow runs tagged ``study``, by DVC experiment name (the latest run of a
    name: an aborted earlier attempt may share it): run id, per-epoch history of ``keys`` and
    the ``env.*`` tags."""
    import mlflow

    configure(experiment_name)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=[experiment_name], output_format="list",
                              filter_string=f"tags.study = '{study}'",
                              order_by=["attributes.start_time DESC"])
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run.data.tags.get("dvc_exp_name")
        if not name or name in found or run.info.status != "FINISHED" or \
                IMPORTED_KEY in run.data.tags:  # a committed record, not a run made here
            continue
        history = {}
        for key in keys:
            points = client.get_metric_history(run.info.run_id, key)
            by_step = {m.step: m.value for m in sorted(points, key=lambda m: m.timestamp)}
            history[key] = [by_step[s] for s in sorted(by_step)]  # a resumed epoch counts once
        found[name] = {"run_id": run.info.run_id, "history": history,
                       "environment": {k.removeprefix("env."): v
                                       for k, v in run.data.tags.items()
                                       if k.startswith("env.")}}
    return found


IMPORTED_KEY = "imported.record"  # <study>/<name>: which committed record a run came from
IMPORTED_SHA = "imported.sha256"   # the record file's digest: a changed record replaces its run


def import_finished_run(experiment_name: str, key: str, digest: str, run_name: str,
                        params: Mapping[str, Any], history: Mapping[str, list[float]],
                        metrics: Mapping[str, float], tags: Mapping[str, str],
                        time_ms: int) -> str:
    """Put a run that was made elsewhere (a committed record) in the store as a FINISHED run:
    params under their dotted keys, ``history`` at step = epoch (1, 2, ...), ``metrics`` at
    step 0 as the stages log summaries. The run carries ``IMPORTED_KEY`` = ``key``: importing
    the same record again adds nothing ("unchanged"), a record whose ``digest`` changed
    replaces its run ("replaced"); runs made here are never touched. Returns what was done."""
    import mlflow
    from mlflow.entities import Metric, Param

    experiment_id = configure(experiment_name)
    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    earlier = client.search_runs([experiment_id], filter_string=f"tags.`{IMPORTED_KEY}` = "
                                 f"'{key}'", max_results=100)
    if any(r.data.tags.get(IMPORTED_SHA) == digest and r.info.status == "FINISHED"
           for r in earlier):
        return "unchanged"
    for run in earlier:
        client.delete_run(run.info.run_id)
    run = _with_retries(uri, lambda: client.create_run(
        experiment_id, start_time=time_ms, run_name=run_name,
        tags={**{k: str(v) for k, v in tags.items()}, IMPORTED_KEY: key,
              IMPORTED_SHA: digest}))
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's limits per batch
        client.log_batch(run_id, params=items[i:i + 100])
    points = [Metric(k, float(v), time_ms, step) for k, values in history.items()
              for step, v in enumerate(values, start=1) if v is not None]
    points += [Metric(k, float(v), time_ms, 0) for k, v in metrics.items() if v is not None]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])
    client.set_terminated(run_id, status="FINISHED", end_time=time_ms)
    return "replaced" if earlier else "added"


def imported_runs(experiment_name: str, study: str) -> tuple[str, dict[str, str]]:
    """The experiment id and the imported runs of ``study`` (run name -> run id)."""
    import mlflow

    experiment_id = configure(experiment_name)
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`imported.study` = '{study}'", max_results=1000)
    return experiment_id, {r.info.run_name: r.info.run_id for r in runs}
