import mlflow
import numpy as np
import pytest

from fmnist_crnn import tracking
from fmnist_crnn.config import ModelConfig
from fmnist_crnn.model import CRNN


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    yield tmp_path
    mlflow.end_run()


def test_store_is_in_the_repository_root_by_absolute_uri(repo, monkeypatch):
    nested = repo / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"


def test_dvc_root_wins_so_queued_experiments_share_the_store(repo, monkeypatch, tmp_path):
    # DVC runs queued experiments in .dvc/tmp/exps/<tmp> and sets DVC_ROOT to the parent repo.
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    (temp_copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.repo_root() == repo
    experiment_id = tracking.configure("exp")
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (repo / "mlartifacts" / "exp").as_uri()


def test_env_uri_overrides_the_default(repo, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.tracking_uri() == f"sqlite:///{other}"


def test_unreachable_server_fails_fast_naming_the_uri(repo, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingError, match="http://127.0.0.1:9"):
        tracking.configure("exp")


def test_run_gets_name_and_tags_from_dvc_and_failure_marks_it(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "hidden-256")
    with pytest.raises(RuntimeError):
        with tracking.start_run("exp") as run:
            tracking.log_params({"model.hidden_dim": 256, "model.channels": [32, 64]})
            raise RuntimeError("boom")
    stored = mlflow.get_run(run.info.run_id)
    assert stored.info.run_name == "hidden-256"
    assert stored.data.tags["dvc_exp_name"] == "hidden-256"
    assert stored.info.status == "FAILED"
    assert stored.data.params == {"model.hidden_dim": "256", "model.channels": "[32, 64]"}


def test_continuing_a_missing_run_is_a_clear_error(repo):
    with pytest.raises(tracking.TrackingError, match="0123abc"):
        with tracking.start_run("exp", run_id="0123abc"):
            pass


def test_logged_model_loads_with_pyfunc_and_predicts(repo):
    model = CRNN(ModelConfig(channels=(8, 8, 16), embedding_dim=16, hidden_dim=8,
                             num_layers=1, head_dims=(8,)))
    example = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    with tracking.start_run("exp"):
        uri = tracking.log_model(model, example)
    loaded = mlflow.pyfunc.load_model(uri)
    out = np.asarray(loaded.predict(np.random.default_rng(1).random((5, 1, 28, 28),
                                                                     dtype=np.float32)))
    assert out.shape == (5, 10) and np.isfinite(out).all()
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)


def test_busy_sqlite_store_is_retried_and_other_errors_are_clear(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = {"n": 0}

    def racing():
        calls["n"] += 1
        if calls["n"] == 1:  # what a parallel run's concurrent insert of a dataset looks like
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets")
        return "linked"

    assert tracking._with_retries("sqlite:///x.db", racing) == "linked" and calls["n"] == 2

    def broken():
        raise RuntimeError("no such table: runs")

    with pytest.raises(tracking.TrackingError, match="sqlite:///x.db.*no such table"):
        tracking._with_retries("sqlite:///x.db", broken)
