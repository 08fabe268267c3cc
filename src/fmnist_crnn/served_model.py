"""MLflow's "models from code" file of the logged model (see `tracking.log_model`): run by
`mlflow.pyfunc.load_model` and `mlflow models serve` when they load it; nothing imports it."""

from fmnist_crnn import tracking
from fmnist_crnn.model import load_model

tracking.set_served_model(load_model)
