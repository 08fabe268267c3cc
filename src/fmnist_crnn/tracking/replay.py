"""Sending a journal's entries to the store, in order and once: the sender thread's work and
``python -m fmnist_crnn.tracking sync``."""

from __future__ import annotations

import argparse
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fmnist_crnn import timings
from fmnist_crnn.errors import TrackingError
from fmnist_crnn.journal import JOURNAL_DIR, Journal
from fmnist_crnn.tracking.store import (
    RETRY_S,
    Refused,
    _short,
    _with_retries,
    refused,
    repo_root,
    use_store,
)

SERVED_MODEL_SCRIPT = "served_model.py"  # the served model's code, in the package
JOURNAL_TAG = "fmnist.journal_entry"  # which journal entry a logged model or version came from


class Sender:
    """The thread that sends a journal's pending entries whenever there are some, retrying
    every ``RETRY_S`` seconds while the store does not answer."""

    def __init__(self, journal: Journal) -> None:
        import logging

        # urllib3 warns at every retry of every send while the server is away; the journal
        # says once, at the end, what is waiting.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.journal = journal
        self.error: Exception | None = None
        self.refusals: list[str] = []
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-journal", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(timeout=RETRY_S if self.error else None)
            self._wake.clear()
            closing = self._closing
            try:
                send_pending(self.journal)
                self.error = None
            except Refused as exc:  # handled in the journal: reported when the run ends
                self.refusals.extend(exc.messages)
                self.error = None
            except Exception as exc:  # noqa: BLE001 (no answer: keep the entries, retry)
                self.error = exc
            if closing:
                return

    def close(self) -> None:
        """One more send of whatever is pending (the end of the run among it); returns when
        everything is sent or the store failed to answer once more."""
        self._closing = True
        self._wake.set()
        self._thread.join()


def send_pending(journal: Journal) -> int:
    """Send the journal's pending entries in order; returns how many were sent. A call the
    store refuses is marked handled (never sent again) and the rest go on; Refused names them
    at the end. A store that does not answer: raises what it raised, every entry before that
    one marked as sent."""
    import mlflow

    sent, refusals = 0, []
    with journal.sending():
        uri = journal.meta["tracking_uri"]
        client = mlflow.MlflowClient(uri)
        for entry in journal.pending():
            try:
                result = _send(client, journal, entry)
            except Exception as exc:
                if not refused(uri, exc):
                    raise  # the store did not answer: this entry and the rest wait
                message = f"{entry['op']} (entry {entry['seq']}): {_short(exc)}"
                journal.mark_sent(entry["seq"], {"refused": message})
                refusals.append(message)
                continue
            journal.mark_sent(entry["seq"], result)
            sent += 1
    if refusals:
        raise Refused(journal.run_id, refusals)
    return sent


def _send(client: Any, journal: Journal, entry: dict[str, Any]) -> Any:
    from mlflow.entities import Metric, Param, RunTag

    run_id, op = journal.run_id, entry["op"]
    if op == "params":
        items = [Param(k, v) for k, v in entry["params"].items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            client.log_batch(run_id, params=items[i:i + 100])
    elif op == "metrics":
        metrics = [Metric(k, v, entry["timestamp"], entry["step"])
                   for k, v in entry["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
    elif op == "status":
        client.update_run(run_id, status=entry["status"])
    elif op == "end":
        client.set_terminated(run_id, status=entry["status"], end_time=entry["end_time"])
    elif op == "input":
        _send_input(client, run_id, entry)
    elif op == "artifact":
        client.log_artifact(run_id, str(journal.path_of(entry, "file")),
                            artifact_path=entry["artifact_path"])
    elif op == "table":
        client.log_table(run_id, data=entry["data"], artifact_file=entry["artifact_file"])
    elif op == "model":
        with timings.span("model_logging"):
            return _send_model(client, journal, entry)
    elif op == "register":
        with timings.span("registration"):
            return _send_registration(client, journal, entry)
    else:
        raise TrackingError(f"{journal.folder}: unknown journal entry {op!r}")
    return None


def _send_input(client: Any, run_id: str, entry: dict[str, Any]) -> None:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = MetaDataset(LocalArtifactDatasetSource(entry["source"]), name=entry["name"],
                          digest=entry["digest"])
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])])])


def _send_model(client: Any, journal: Journal, entry: dict[str, Any]) -> str:
    """Log the journal's copy of the model file as a pyfunc model of the run. A model already
    made from this entry (a send cut short) is completed, not made twice."""
    import mlflow
    from mlflow.models import Model, infer_signature

    run_id = journal.run_id
    key = f"{run_id}/{entry['seq']}"
    earlier = [m for m in client.search_logged_models(
        experiment_ids=[journal.meta["experiment_id"]],
        filter_string=f"source_run_id = '{run_id}'") if m.tags.get(JOURNAL_TAG) == key]
    # Made here, in the run's experiment (Model.log would put it in the default one), so
    # that runs:/<run>/model finds it.
    model_id = earlier[0].model_id if earlier else client.create_logged_model(
        journal.meta["experiment_id"], name=entry["name"], source_run_id=run_id,
        tags={JOURNAL_TAG: key}).model_id
    example = np.load(journal.path_of(entry, "example"))
    output = np.load(journal.path_of(entry, "output"))
    package_dir = Path(__file__).resolve().parents[1]  # fmnist_crnn/, served_model.py in it
    use_store(journal.meta["tracking_uri"])  # Model.log uses the global URI
    info = Model.log(
        artifact_path=None, name=entry["name"], flavor=mlflow.pyfunc, run_id=run_id,
        model_id=model_id,
        python_model=str(package_dir / SERVED_MODEL_SCRIPT),
        artifacts={"checkpoint": str(journal.path_of(entry, "checkpoint"))},
        signature=infer_signature(example, output), input_example=example,
        # Listing requirements skips MLflow's slow import-tracing inference.
        pip_requirements=[f"{pkg}=={metadata.version(pkg)}"
                          for pkg in ("torch", "torchvision", "mlflow", "numpy")],
        # The model code is this package: ship it with the model.
        code_paths=[str(package_dir)], flavor_name="pyfunc.ModelFromCode",
    )
    return info.model_uri


def _send_registration(client: Any, journal: Journal, entry: dict[str, Any]) -> dict:
    """Register the model as a version of the entry's name (once: a version made from this
    entry is found again) and move the alias when the test accuracy beats the holder's."""
    import mlflow

    name, alias, accuracy_ = entry["name"], entry["alias"], entry["test_accuracy"]
    key = f"{journal.run_id}/{entry['seq']}"
    earlier = [v for v in client.search_model_versions(f"name = '{name}'")
               if v.tags.get(JOURNAL_TAG) == key]
    if earlier:
        version = earlier[0].version
    else:
        version = _with_retries(journal.meta["tracking_uri"], lambda: mlflow.register_model(
            entry["model_uri"], name, await_registration_for=0,
            tags={"test_accuracy": f"{accuracy_:.6f}", JOURNAL_TAG: key})).version
    try:
        holder = client.get_model_version_by_alias(name, alias)
        best = float(holder.tags.get("test_accuracy", "-inf"))
        held = str(holder.version) == str(version)
    except mlflow.exceptions.MlflowException:  # no holder yet
        best, held = float("-inf"), False
    promoted = held or accuracy_ > best
    if promoted and not held:
        client.set_registered_model_alias(name, alias, version)
    print(f"registered {name} version {version}; "
          + (f"alias '{alias}' moved to it" if promoted else
             f"alias '{alias}' stays (a holder scores higher)"), flush=True)
    return {"version": str(version), "promoted": promoted}





def sync(root: Path) -> int:
    """Send every journal of ``root`` that has entries waiting; returns how many runs still
    have some (0: everything is on the store)."""

    left = 0
    journals = [j for j in Journal.all(root) if j.pending()]
    if not journals:
        print(f"nothing to send: every journal in {root / JOURNAL_DIR} is sent")
    for journal in journals:
        uri = journal.meta["tracking_uri"]
        use_store(uri)
        waiting = len(journal.pending())
        try:
            sent = send_pending(journal)
        except Refused as exc:  # handled: the next sync does not try them again
            left += 1
            print(f"run {journal.run_id}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001 (report, keep the rest for the next sync)
            left += 1
            print(f"run {journal.run_id}: {len(journal.pending())} of {waiting} call(s) still "
                  f"waiting: {uri} did not take them ({_short(exc)})", file=sys.stderr)
            continue
        ends = [e["status"] for e in journal.entries() if e["op"] == "end"]
        print(f"run {journal.run_id}: sent {sent} call(s) to {uri}"
              + (f"; the run is {ends[-1]}" if ends else ""))
    return left


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist_crnn.tracking",
                                     description="Send the MLflow calls that wait in this "
                                     "repository's journal (.mlflow-journal/) to their store.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("sync", help="send every waiting call, in order, exactly once")
    cmd.add_argument("--root", type=Path, default=None,
                     help="the repository holding .mlflow-journal (default: this one)")
    args = parser.parse_args(argv)
    sys.exit(1 if sync(args.root or repo_root()) else 0)

