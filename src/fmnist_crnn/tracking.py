"""The one place that talks to MLflow.

The default store is SQLite in the repository root, addressed by an absolute URI. DVC runs
queued experiments in temporary copies of the repository and sets ``DVC_ROOT`` to the parent
repository, so their runs land in the same store as runs made in the workspace.
``MLFLOW_TRACKING_URI`` overrides the default, so a tracking server works unchanged.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from fmnist_crnn.errors import TrackingError

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


def configure(experiment_name: str) -> str:
    """Point MLflow at the store and return the experiment id, creating the experiment.

    For the default local store, artifacts go to ``<repo>/mlartifacts`` by absolute path:
    MLflow would otherwise resolve ``./mlruns`` against the current directory, which for a
    queued DVC experiment is a temporary copy that is deleted afterwards.
    """
    import mlflow

    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = user_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry for minutes; a server that does not answer should fail fast.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI to child processes
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


def _with_retries(uri: str, call: Any, attempts: int = 5) -> Any:
    """Call ``call``; retry briefly when a local SQLite store is busy.

    Two queued experiments running at once may both create the store's tables, or insert the
    same dataset or registered model, at the same moment; MLflow checks, then inserts, so one
    of them gets "database is locked", "already exists" or "UNIQUE constraint failed". Once
    the other's write is in, the same call succeeds.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # connection errors surface as several exception types
            text = str(exc)
            busy = uri.startswith("sqlite") and any(
                s in text for s in ("locked", "already exists", "UNIQUE constraint failed"))
            if busy and attempt < attempts - 1:
                time.sleep(0.5 + random.random() * (attempt + 1))
                continue
            raise TrackingError(f"cannot use the MLflow tracking store at {uri}: "
                                f"{type(exc).__name__}: {text[:300]}. Start the server, or unset "
                                "MLFLOW_TRACKING_URI to use the local store.") from None
    raise AssertionError("unreachable")


def run_exists(run_id: str) -> bool:
    import mlflow

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


@contextlib.contextmanager
def start_run(experiment_name: str, run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (or continue, given ``run_id``) a run; end it FAILED or KILLED on errors.

    When launched by ``mlflow run``, MLFLOW_RUN_ID names the run to log into.
    """
    import mlflow

    experiment_id = configure(experiment_name)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id is not None and not run_exists(run_id):
        raise TrackingError(f"MLflow run {run_id} does not exist in {mlflow.get_tracking_uri()}; "
                            "was the store deleted or MLFLOW_TRACKING_URI changed? Run "
                            "`dvc repro -f train` to start a new run.")
    tags = dict(run_tags() if run_id is None else {}, **(tags or {}))
    run_name = os.environ.get("DVC_EXP_NAME") if run_id is None else None
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                           run_name=run_name, tags=tags or None)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def log_params(flat: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.log_params({key: _param_value(value) for key, value in flat.items()})


def log_missing_params(flat: Mapping[str, Any]) -> None:
    """Log the params the active run lacks. MLflow params cannot change: a value that differs
    from the logged one (a later stage re-run with new settings) is recorded as a tag
    ``changed.<key>`` instead."""
    import mlflow

    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    values = {key: _param_value(value) for key, value in flat.items()}
    mlflow.log_params({k: v for k, v in values.items() if k not in logged})
    changed = {f"changed.{k}": v for k, v in values.items() if k in logged and logged[k] != v}
    if changed:
        mlflow.set_tags(changed)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_environment(info: Mapping[str, Any]) -> None:
    import mlflow

    info = {"python": sys.version.split()[0], "platform": platform.platform(), **info}
    mlflow.set_tags({f"env.{k}": str(v) for k, v in info.items()})


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_dataset(name: str, digest: str, source: str, context: str) -> None:
    """Record the data a run saw as an MLflow dataset input, identified by its digest."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest[:36])
    _with_retries(mlflow.get_tracking_uri(), lambda: mlflow.log_input(dataset, context=context))


def log_confusion_matrix(figure: Any, cm: np.ndarray, class_names: list[str],
                         prefix: str) -> None:
    """The confusion matrix as ``figure`` (drawn by the caller) and as a table (actual x
    predicted counts)."""
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(figure, f"{prefix}/confusion_matrix.png")
    plt.close(figure)
    table = {"actual": [], "predicted": [], "count": []}
    for i, actual in enumerate(class_names):
        for j, predicted in enumerate(class_names):
            table["actual"].append(actual)
            table["predicted"].append(predicted)
            table["count"].append(int(cm[i, j]))
    mlflow.log_table(table, f"{prefix}/confusion_matrix.json")


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


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
    with its signature and an input example; return its URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    package_dir = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package_dir / SERVED_MODEL_SCRIPT),
        artifacts={"checkpoint": str(checkpoint)},
        signature=infer_signature(example, output),
        input_example=example,
        # Listing requirements skips MLflow's slow import-tracing inference.
        pip_requirements=[f"{pkg}=={metadata.version(pkg)}"
                          for pkg in ("torch", "torchvision", "mlflow", "numpy")],
        # The model code is this package: ship it with the model.
        code_paths=[str(package_dir)],
    )
    return info.model_uri


def register_and_promote(model_uri: str, name: str, alias: str,
                         test_accuracy: float) -> tuple[str, bool]:
    """Register the model as a new version of ``name``; move ``alias`` to it only when its
    test accuracy beats the current holder's. Returns (version, promoted)."""
    import mlflow

    client = mlflow.MlflowClient()
    version = _with_retries(mlflow.get_tracking_uri(), lambda: mlflow.register_model(
        model_uri, name, tags={"test_accuracy": f"{test_accuracy:.6f}"})).version
    try:
        holder = client.get_model_version_by_alias(name, alias)
        best = float(holder.tags.get("test_accuracy", "-inf"))
    except mlflow.exceptions.MlflowException:  # no holder yet
        best = float("-inf")
    promoted = test_accuracy > best
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    return str(version), promoted


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
        if not name or name in found or run.info.status != "FINISHED":
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
