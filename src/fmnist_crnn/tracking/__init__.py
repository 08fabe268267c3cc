"""The one place that talks to MLflow, one module per job:

- ``store``: where the store is, waiting for a server that is away, a refusal told apart from
  an outage, the tags every run carries;
- ``run``: a tracked run, whose calls go to a journal on disk (fmnist_crnn.journal) first and
  reach the store when it answers, so training never waits for the server;
- ``replay``: sending a journal in order and once (the sender thread, ``python -m
  fmnist_crnn.tracking sync``);
- ``models``: the logged model, its input checks when served, its registration, loading it.

Besides this package only fmnist_crnn.study.publish (committed records into the store) and
fmnist_crnn.server (the server's users) import MLflow.
"""

from fmnist_crnn.errors import TrackingError
from fmnist_crnn.tracking.models import (
    check_served_input,
    load_pyfunc,
    log_model,
    register_and_promote,
    set_served_model,
)
from fmnist_crnn.tracking.replay import send_pending, sync
from fmnist_crnn.tracking.run import (
    TrackedRun,
    log_artifact,
    log_confusion_matrix,
    log_confusion_table,
    log_dataset,
    log_environment,
    log_metrics,
    log_missing_params,
    log_params,
    logged_params,
    set_tags,
    start_run,
)
from fmnist_crnn.tracking.store import (
    WAIT_ENV,
    Refused,
    configure,
    default_tracking_uri,
    dvc_managed_paths,
    end_leftover_runs,
    git_state,
    refused,
    repo_root,
    run_exists,
    run_tags,
    tracking_uri,
    use_store,
    wait_bound,
)

__all__ = [
    "WAIT_ENV", "Refused", "TrackedRun", "TrackingError", "check_served_input", "configure",
    "default_tracking_uri", "dvc_managed_paths", "end_leftover_runs", "git_state",
    "load_pyfunc", "log_artifact", "log_confusion_matrix", "log_confusion_table", "log_dataset",
    "log_environment", "log_metrics", "log_missing_params", "log_model", "log_params",
    "logged_params",
    "refused", "register_and_promote", "repo_root", "run_exists", "run_tags", "send_pending",
    "set_served_model", "set_tags", "start_run", "sync", "tracking_uri", "use_store",
    "wait_bound",
]
