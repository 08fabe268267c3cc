"""The logged model: the served model's input checks, logging it through the journal, its
registration, and loading any MLflow model URI."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmnist_crnn.errors import TrackingError
from fmnist_crnn.tracking.run import _record, _run
from fmnist_crnn.tracking.store import tracking_uri

if TYPE_CHECKING:
    import torch

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
