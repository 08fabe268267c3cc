"""The tracking store: where it is, waiting for it, telling a refusal from an outage, and
the tags every run carries (git state, DVC's experiment name).

The default store is SQLite in the repository root, addressed by an absolute URI. DVC runs
queued experiments in temporary copies of the repository and sets ``DVC_ROOT`` to the parent
repository, so their runs land in the same store as runs made in the workspace.
``MLFLOW_TRACKING_URI`` overrides the default, so a tracking server works unchanged.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fmnist_crnn import timings
from fmnist_crnn.errors import TrackingError
from fmnist_crnn.journal import Journal

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
        # MLflow's defaults retry one call for minutes, backing off 2, 4, 8 ... s. Waiting is
        # done here instead (_with_retries at the start, the journal every RETRY_S after), so
        # MLflow's own retries are two quick ones: a stage whose server is away spends about
        # 2 s, not 8.5-10.8 s, on the last try at its end (docs/results.md, "The test suite").
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
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
RETRY_S = 5.0  # seconds between tries while the store does not answer
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

def _short(error: Exception | None) -> str:
    if error is None:
        return "no answer yet"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _param_value(value: Any) -> str:
    """The value as params.yaml and `dvc exp show` spell it: 20, 0.001, true, null, [3, 3, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    return str(value)
