"""A tracked run: every call goes to the run's journal on disk first, then to MLflow."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist_crnn import timings
from fmnist_crnn.errors import Terminated, TrackingError
from fmnist_crnn.journal import Journal
from fmnist_crnn.tracking.replay import Sender, send_pending
from fmnist_crnn.tracking.store import (
    Refused,
    _param_value,
    _short,
    _with_retries,
    configure,
    default_tracking_uri,
    repo_root,
    run_tags,
    use_store,
)

# --- A tracked run: every call goes to the run's journal first, then to MLflow ---------------
#
# Once a run has been created on the tracking store, nothing that follows needs the store to
# answer: each call is written to the run's journal (fmnist_crnn.journal, in the repository
# beside the stage's outputs) and a background thread sends it, in order, when the store
# answers. A stage that ends while the store is away says so in one line; `python -m
# fmnist_crnn.tracking sync` sends the rest later. Every call is idempotent when sent again
# (metrics carry their own timestamps, which MLflow's store deduplicates; the model and the
# registered version carry the journal entry they came from), so a crash between sending an
# entry and writing down that it was sent cannot log it twice.



@dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class TrackedRun:
    info: RunInfo
    journal: Journal


_active: TrackedRun | None = None
_sender: Sender | None = None


def _run() -> TrackedRun:
    if _active is None:
        raise RuntimeError("no tracked run is open: call inside tracking.start_run()")
    return _active




@contextlib.contextmanager
def start_run(experiment_name: str | None, run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[TrackedRun]:
    """Create a run (or continue ``run_id``) and journal every call made inside; the run ends
    FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any other error).

    Creating a run needs the store to answer: a store that is down or refuses the credentials
    stops the stage at once, naming it. Continuing a run whose journal is in this repository
    (evaluate and report after train) does not: its calls wait in the journal. When launched
    by ``mlflow run``, MLFLOW_RUN_ID names the run to log into. ``experiment_name`` is
    needed only to create a run.
    """
    global _active
    root = repo_root()
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    journal = Journal.find(root, run_id) if run_id else None
    if journal is None:
        with timings.span("mlflow_open"):
            journal = _open_on_store(root, experiment_name, run_id, tags)
    else:
        use_store(journal.meta["tracking_uri"])
    if run_id is not None:  # continued: RUNNING again until this stage ends it
        journal.append("status", status="RUNNING")
        if tags:
            journal.append("tags", tags={k: str(v) for k, v in tags.items()})
    run = TrackedRun(RunInfo(journal.run_id, journal.meta["experiment_id"]), journal)
    global _sender
    sender = _sender = Sender(journal)
    _active = run
    previous = _catch_sigterm()
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (errors.Terminated)
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _active = _sender = None
        with timings.span("mlflow_wait_at_end"):
            sender.close()  # what the body logged: any refusal is known after this
            if sender.refusals and status == "FINISHED":
                status = "FAILED"  # a run the store refused a call of is not complete
            journal.append("end", status=status, end_time=_now_ms())
            if sender.error is None:  # the store answers: the end goes now, else it waits
                try:
                    send_pending(journal)
                except Refused as exc:
                    sender.refusals.extend(exc.messages)
                except Exception as exc:  # noqa: BLE001 (no answer: the end waits for sync)
                    sender.error = exc
        _restore_sigterm(previous)
        pending = journal.pending()
        if pending:
            print(f"MLflow: {len(pending)} call(s) of run {journal.run_id} (ending "
                  f"{status}) wait in {journal.folder}: {journal.meta['tracking_uri']} did not "
                  f"answer ({_short(sender.error)}); send them with `python -m "
                  "fmnist_crnn.tracking sync`", file=sys.stderr, flush=True)
    if sender.refusals:  # the body ended without an error of its own
        raise Refused(journal.run_id, sender.refusals)


def _open_on_store(root: Path, experiment_name: str | None, run_id: str | None,
                   tags: Mapping[str, str] | None) -> Journal:
    """Create the run on the store (or find ``run_id`` there) and its journal."""
    import mlflow

    if run_id is None:
        from mlflow.tracking.context.registry import resolve_tags

        if experiment_name is None:
            raise TypeError("a new run needs an experiment name")
        experiment_id = configure(experiment_name)
        uri = mlflow.get_tracking_uri()
        client = mlflow.MlflowClient(uri)
        all_tags = resolve_tags({**run_tags(), **(tags or {})})
        run = _with_retries(uri, lambda: client.create_run(
            experiment_id, run_name=os.environ.get("DVC_EXP_NAME"), tags=all_tags))
        return Journal.create(root, run.info.run_id, {"tracking_uri": uri,
                                                      "experiment_id": experiment_id,
                                                      "logged_params": {}})
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    use_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"MLflow run {run_id} does not exist in {uri}; was the store "
                            "deleted or MLFLOW_TRACKING_URI changed? Run `dvc repro -f train` "
                            "to start a new run.") from None
    return Journal.create(root, run_id, {"tracking_uri": uri,
                                         "experiment_id": run.info.experiment_id,
                                         "logged_params": dict(run.data.params)})


def _catch_sigterm() -> Any:
    """Turn SIGTERM into errors.Terminated while a run is open (main thread only), so a run
    stopped by a worker or a scheduler ends KILLED instead of staying RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminated)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _now_ms() -> int:
    return int(time.time() * 1000)




def _record(op: str, files: Mapping[str, Path] | None = None, **fields: Any) -> int:
    run = _run()
    seq = run.journal.append(op, files=dict(files or {}), **fields)
    if _sender is not None:
        _sender.notify()
    return seq


def log_params(flat: Mapping[str, Any]) -> None:
    _record("params", params={key: _param_value(value) for key, value in flat.items()})


def log_missing_params(flat: Mapping[str, Any]) -> None:
    """Log the params the run lacks. MLflow params cannot change: a value that differs from
    the logged one (a later stage re-run with new settings) is recorded as a tag
    ``changed.<key>`` instead. What is logged is known from the journal, without the store."""
    logged = logged_params(_run().journal)
    values = {key: _param_value(value) for key, value in flat.items()}
    missing = {k: v for k, v in values.items() if k not in logged}
    if missing:
        _record("params", params=missing)
    changed = {f"changed.{k}": v for k, v in values.items() if k in logged and logged[k] != v}
    if changed:
        _record("tags", tags=changed)


def logged_params(journal: Journal) -> dict[str, str]:
    logged = dict(journal.meta.get("logged_params") or {})
    for entry in journal.entries():
        if entry["op"] == "params":
            logged.update(entry["params"])
    return logged


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    _record("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step or 0,
            timestamp=_now_ms())


def log_environment(info: Mapping[str, Any]) -> None:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), **info}
    set_tags({f"env.{k}": v for k, v in info.items()})


def set_tags(tags: Mapping[str, Any]) -> None:
    _record("tags", tags={k: str(v) for k, v in tags.items()})


def log_dataset(name: str, digest: str, source: str, context: str) -> None:
    """Record the data a run saw as an MLflow dataset input, identified by its digest."""
    _record("input", name=name, digest=digest[:36], source=source, context=context)


def log_confusion_matrix(figure: Any, cm: np.ndarray, class_names: list[str],
                         prefix: str) -> None:
    """The confusion matrix as ``figure`` (drawn by the caller) and as a table (actual x
    predicted counts)."""
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "confusion_matrix.png"
        figure.savefig(png)
        plt.close(figure)
        _record("artifact", files={"file": png}, artifact_path=prefix)
    log_confusion_table(cm, class_names, prefix)


def log_confusion_table(cm: np.ndarray, class_names: list[str], prefix: str) -> None:
    """The confusion matrix as an MLflow table ``<prefix>/confusion_matrix.json``: actual x
    predicted counts, one row per cell."""
    table = {"actual": [], "predicted": [], "count": []}
    for i, actual in enumerate(class_names):
        for j, predicted in enumerate(class_names):
            table["actual"].append(actual)
            table["predicted"].append(predicted)
            table["count"].append(int(cm[i, j]))
    _record("table", data=table, artifact_file=f"{prefix}/confusion_matrix.json")


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    _record("artifact", files={"file": Path(path)}, artifact_path=artifact_path)
