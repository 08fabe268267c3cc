"""The one place that talks to MLflow.

The default store is SQLite in the repository root, addressed by an absolute URI. DVC runs
queued experiments in temporary copies of the repository and sets ``DVC_ROOT`` to the parent
repository, so their runs land in the same store as runs made in the workspace.
``MLFLOW_TRACKING_URI`` overrides the default, so a tracking server works unchanged.

Once a run exists, its calls go through a journal on disk (``.mlflow-journal/`` in the
repository, see fmnist_crnn.journal) and reach the store when it answers: training never
waits for the tracking server. ``python -m fmnist_crnn.tracking sync`` sends what a stage
that ended during an outage left waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from fmnist_crnn import timings
from fmnist_crnn.errors import Terminated, TrackingError
from fmnist_crnn.journal import JOURNAL_DIR, Journal

if TYPE_CHECKING:
    import torch

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def repo_root(start: Path | None = None) -> Path:
    """The repository the run belongs to: DVC_ROOT when DVC set it, else the nearest parent
    holding ``.dvc`` or ``.git``, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def default_tracking_uri(root: Path | None = None) -> str:
    return f"sqlite:///{(root or repo_root()) / STORE_FILE}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_store(uri: str) -> None:
    """Point MLflow at ``uri`` (also exported to child processes as MLFLOW_TRACKING_URI)."""
    with timings.span("mlflow_import"):  # the stage's first use pays for MLflow's import
        import mlflow

    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry one call for minutes. A server that does not answer at the
        # start should stop the stage at once; later, the journal retries by itself.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)


def configure(experiment_name: str) -> str:
    """Point MLflow at the store and return the experiment id, creating the experiment.

    For the default local store, artifacts go to ``<repo>/mlartifacts`` by absolute path:
    MLflow would otherwise resolve ``./mlruns`` against the current directory, which for a
    queued DVC experiment is a temporary copy that is deleted afterwards.
    """
    import mlflow

    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = user_uri or default_tracking_uri()
    use_store(uri)  # also exports MLFLOW_TRACKING_URI to child processes
    experiment = _with_retries(uri, lambda: mlflow.get_experiment_by_name(experiment_name))
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not user_uri:
        artifact_location = (repo_root() / ARTIFACTS_DIR / experiment_name).as_uri()
    try:
        return mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process (a parallel queued experiment) created it first.
        return mlflow.get_experiment_by_name(experiment_name).experiment_id


# How long creating a run waits for a tracking server that does not answer (a restart, an
# upgrade): an environment variable, not a params.yaml key, because changing it must not
# re-run training.
WAIT_ENV = "FMNIST_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 600.0
SAY_EVERY_S = 60.0


def wait_bound() -> float:
    """Seconds to wait for a server that does not answer: $FMNIST_TRACKING_WAIT_S or 600."""
    value = os.environ.get(WAIT_ENV, "").strip()
    try:
        bound = float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        bound = -1.0
    if not bound >= 0:  # also NaN
        raise TrackingError(f"{WAIT_ENV}={value!r}: expected a number of seconds >= 0")
    return bound


def _with_retries(uri: str, call: Any, attempts: int = 5, wait_s: float | None = None) -> Any:
    """Call ``call``; retry while the store cannot answer yet, and fail on a refusal.

    A server that does not answer (stopped, restarting) is waited for up to ``wait_s``
    seconds (default ``wait_bound()``), with one line when the wait starts and one a minute.
    Two queued experiments running at once may both create a local SQLite store's tables, or
    insert the same dataset or registered model, at the same moment; MLflow checks, then
    inserts, so one of them gets "database is locked", "already exists" or "UNIQUE constraint
    failed": retried ``attempts`` times, since once the other's write is in, the same call
    succeeds. A local store is never waited for: no server is coming back.
    """
    remote = not uri.startswith(("sqlite:", "file:", "/")) and "://" in uri
    bound = wait_bound() if wait_s is None and remote else (wait_s or 0.0)
    started, said, busy_tries = time.monotonic(), None, 0
    while True:
        try:
            return call()
        except Exception as exc:  # connection errors surface as several exception types
            if _busy(uri, exc) and busy_tries < attempts - 1:
                busy_tries += 1
                time.sleep(0.5 + random.random() * busy_tries)
                continue
            waited = time.monotonic() - started
            if remote and not refused(uri, exc) and waited < bound:
                if said is None or time.monotonic() - said >= SAY_EVERY_S:
                    print(f"MLflow: {uri} does not answer ({_short(exc)}); waiting for it, "
                          f"{waited:.0f} of at most {bound:.0f} s ({WAIT_ENV})",
                          file=sys.stderr, flush=True)
                    said = time.monotonic()
                time.sleep(min(RETRY_S, bound - waited))
                continue
            after = f" after waiting {waited:.0f} s" if remote and waited >= bound > 0 else ""
            raise TrackingError(f"cannot use the MLflow tracking store at {uri}{after}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}. Start the server, or "
                                "unset MLFLOW_TRACKING_URI to use the local store.") from None


def _busy(uri: str, exc: Exception) -> bool:
    """A local SQLite store that another process is writing to: the same call succeeds later."""
    return uri.startswith("sqlite") and any(
        s in str(exc) for s in ("locked", "already exists", "UNIQUE constraint failed"))


def refused(uri: str, exc: Exception) -> bool:
    """Whether the store answered "no" (an invalid name or value, a permission denied, a run
    it does not have), so that the same call would be refused again, rather than not
    answering (no connection, a timeout, a 5xx, a busy SQLite file), which waiting cures.
    A call that fails before reaching the store (TypeError, ValueError) is no outage either."""
    import mlflow

    if isinstance(exc, mlflow.exceptions.MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429) and not _busy(uri, exc)
    return isinstance(exc, (TypeError, ValueError, KeyError, AttributeError))


class Refused(TrackingError):
    """The store refused calls of a run: each is marked handled in the journal, with the
    store's message, and never sent again."""

    def __init__(self, run_id: str, messages: list[str]) -> None:
        self.messages = messages
        super().__init__(f"MLflow refused {len(messages)} call(s) of run {run_id}: "
                         + "; ".join(messages))


def end_leftover_runs(uri: str, experiment_name: str, study: str, name: str,
                      note: str) -> list[str]:
    """End as KILLED, tagged ``fmnist.ended_by``=``note``, every run named ``name`` of
    ``study`` still RUNNING on ``uri``: an earlier attempt of a study run whose machine went
    away with no process left to end it. The caller holds the run's lock, so no attempt of it
    runs elsewhere. Returns their ids."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = _with_retries(uri, lambda: client.get_experiment_by_name(experiment_name))
    if experiment is None:
        return []
    query = (f"tags.study = '{study}' and tags.dvc_exp_name = '{name}' "
             "and attributes.status = 'RUNNING'")
    runs = _with_retries(uri, lambda: client.search_runs([experiment.experiment_id], query,
                                                          max_results=100))
    for run in runs:
        _with_retries(uri, lambda r=run: client.set_tag(r.info.run_id, "fmnist.ended_by", note))
        _with_retries(uri, lambda r=run: client.set_terminated(r.info.run_id, "KILLED"))
    return [run.info.run_id for run in runs]


def run_exists(run_id: str) -> bool:
    """Whether the run is in this repository's journal or on the store."""
    import mlflow

    if Journal.find(repo_root(), run_id) is not None:
        return True
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def dvc_managed_paths(root: Path) -> list[str]:
    """What DVC writes or rewrites in the work tree: dvc.lock and every out, metric and plot
    of dvc.yaml. Their changes are results, not changes to the code."""
    paths = ["dvc.lock"]
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return paths
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return paths


def git_state(root: Path) -> dict[str, str]:
    """Commit of ``root`` and whether its code differs from it; empty outside git.

    ``git_dirty`` ignores what DVC writes (outputs, dvc.lock) and params.yaml, whose values
    the run logs as params: it says whether the code that ran is the committed code.
    """
    excluded = [f":(exclude){p}" for p in ("params.yaml", *dvc_managed_paths(root))]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", *excluded],
                                cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(status.strip())).lower()}


def run_tags(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # The stage runs in the experiment's own copy of the repository (cwd); its git state is
    # the one that produced the numbers, so read it there rather than at DVC_ROOT.
    tags = git_state(Path.cwd())
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    tags.update(extra or {})
    return tags


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

JOURNAL_TAG = "fmnist.journal_entry"
RETRY_S = 5.0  # seconds between sends while the store does not answer


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class TrackedRun:
    info: RunInfo
    journal: Journal


_active: TrackedRun | None = None
_sender: _Sender | None = None


def _run() -> TrackedRun:
    if _active is None:
        raise RuntimeError("no tracked run is open: call inside tracking.start_run()")
    return _active


class _Sender:
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
    sender = _sender = _Sender(journal)
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


def _short(error: Exception | None) -> str:
    if error is None:
        return "no answer yet"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


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
    table = {"actual": [], "predicted": [], "count": []}
    for i, actual in enumerate(class_names):
        for j, predicted in enumerate(class_names):
            table["actual"].append(actual)
            table["predicted"].append(predicted)
            table["count"].append(int(cm[i, j]))
    _record("table", data=table, artifact_file=f"{prefix}/confusion_matrix.json")


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    _record("artifact", files={"file": Path(path)}, artifact_path=artifact_path)



def check_served_input(x: torch.Tensor) -> None:
    """Refuse what the model would silently mispredict: an empty batch, NaN/inf, pixels
    outside [0, 1] (most often 0-255 values not divided by 255). The scoring server answers
    an MlflowException with INVALID_PARAMETER_VALUE as HTTP 400 with this message."""
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    problem = None
    if x.shape[0] == 0:
        problem = "empty batch: send at least one image of shape (1, 28, 28)"
    elif not torch.isfinite(x).all():
        problem = "the input contains NaN or infinite values"
    else:
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            problem = (f"pixel values must lie in [0, 1] (Fashion-MNIST pixels divided by 255); "
                       f"got values from {low:g} to {high:g}")
            if low >= 0.0 and high <= 255.0:
                problem += ": these look like 0-255 pixels, divide them by 255"
    if problem:
        raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)


# MLflow's "models from code" file for the logged model: it calls `set_served_model`, so
# nothing is pickled and the weights travel as a plain checkpoint.
SERVED_MODEL_SCRIPT = "served_model.py"


def set_served_model(load_weights: Callable[[str], torch.nn.Module]) -> None:
    """Declare the logged model's pyfunc: the CRNN behind `check_served_input`, so the served
    model (and `mlflow.pyfunc.load_model`) refuses input it would mispredict instead of
    answering. ``load_weights`` rebuilds the network from the checkpoint artifact."""
    import mlflow.models
    import mlflow.pyfunc
    import torch

    class ServedCRNN(mlflow.pyfunc.PythonModel):
        # No type hints on predict: MLflow would read them as a schema; the signature is
        # logged from the input example instead.
        def load_context(self, context):  # noqa: ANN001, ANN202
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.net = load_weights(context.artifacts["checkpoint"]).to(self.device).eval()

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN202
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            check_served_input(x)
            with torch.no_grad():
                return self.net(x.to(self.device)).cpu().numpy()

    mlflow.models.set_model(ServedCRNN())


def log_model(model: torch.nn.Module, checkpoint: Path, example: np.ndarray,
              name: str = "model") -> str:
    """Log the model file ``checkpoint`` (the weights of ``model``) as an MLflow pyfunc model
    with its signature and an input example; return its URI (``runs:/<run>/<name>``, which
    MLflow resolves to the logged model once the journal has sent it)."""
    import torch

    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "example.npy", example)
        np.save(Path(tmp) / "output.npy", output)
        _record("model", name=name, files={"checkpoint": Path(checkpoint),
                                           "example": Path(tmp) / "example.npy",
                                           "output": Path(tmp) / "output.npy"})
    return f"runs:/{_run().info.run_id}/{name}"


def register_and_promote(model_uri: str, name: str, alias: str, test_accuracy: float) -> None:
    """Register the model as a new version of ``name``; move ``alias`` to it only when its
    test accuracy beats the current holder's. Sent (and reported) by the journal."""
    _record("register", model_uri=model_uri, name=name, alias=alias,
            test_accuracy=test_accuracy)


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
    package_dir = Path(__file__).resolve().parent
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



def _param_value(value: Any) -> str:
    """The value as params.yaml and `dvc exp show` spell it: 20, 0.001, true, null, [3, 3, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    return str(value)


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


def _auth_client() -> Any:
    """MLflow's basic-auth client for the tracking server; the caller's credentials come from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    from mlflow.server import get_app_client

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(f"users and permissions live on a tracking server; "
                            f"MLFLOW_TRACKING_URI is {uri}")
    return get_app_client("basic-auth", tracking_uri=uri)


def create_user(username: str, password: str) -> None:
    _auth_client().create_user(username=username, password=password)


def grant_experiment(username: str, experiment_name: str, permission: str) -> None:
    """Give ``username`` ``permission`` on the experiment (replacing an earlier grant)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(f"no experiment named '{experiment_name}' at {tracking_uri()}")
    _auth_client().grant_user_permission(username, "experiment", experiment.experiment_id,
                                         permission)


def load_pyfunc(model_uri: str) -> Any:
    """The MLflow model at ``model_uri`` (``models:/name@alias``, ``runs:/id/model``, a path).

    Never creates a tracking store: outside a repository with ``mlflow.db`` and without
    MLFLOW_TRACKING_URI, a registry or run URI is an error that says what to set.
    """
    import mlflow

    uri = tracking_uri()
    needs_store = model_uri.startswith(("models:/", "runs:/"))
    if needs_store and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        if os.environ.get("MLFLOW_TRACKING_URI"):
            raise TrackingError(f"MLFLOW_TRACKING_URI names {uri}, which does not exist; "
                                f"cannot resolve {model_uri}")
        raise TrackingError(f"no MLflow store at {uri[len('sqlite:///'):]} to resolve "
                            f"{model_uri}; run from the repository that trained the model or "
                            "set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot load the model {model_uri} from {uri}: "
                            f"{first_line}") from None


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


if __name__ == "__main__":
    main()
