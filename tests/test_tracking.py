import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow.protos import databricks_pb2 as codes

from fmnist_crnn import tracking
from fmnist_crnn.config import ModelConfig
from fmnist_crnn.model import CRNN, save_model
from fmnist_crnn.testing.services import free_port

from .conftest import activated, stranger_env


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
    monkeypatch.setenv(tracking.WAIT_ENV, "0")
    with pytest.raises(tracking.TrackingError, match="http://127.0.0.1:9: "):
        tracking.configure("exp")


def test_a_server_is_retried_without_mlflows_backoff_unless_the_user_sets_one(monkeypatch):
    """The journal and the wait at the start do the waiting: MLflow's own retries of a call
    must not back off 2, 4, 8 s (a stage whose server is away would spend that at its end)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    for name in ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    tracking.use_store("http://127.0.0.1:9")
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 0
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    tracking.use_store("http://127.0.0.1:9")
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_wait_bound_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(tracking.WAIT_ENV, value)
    with pytest.raises(tracking.TrackingError, match=f"{tracking.WAIT_ENV}='{value}'"):
        tracking.wait_bound()


def test_a_local_store_is_never_waited_for(repo, monkeypatch):
    monkeypatch.setenv(tracking.WAIT_ENV, "600")
    calls = []

    def refuse_to_open():
        calls.append(1)
        raise OSError("unable to open database file")

    with pytest.raises(tracking.TrackingError, match="unable to open"):
        tracking.store._with_retries("sqlite:///nowhere/mlflow.db", refuse_to_open)
    assert calls == [1]


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


def test_a_refused_call_fails_the_run_in_one_line_and_is_never_replayed(repo, capsys):
    """A store that answers "no" is not a store that is away: nothing waits for a sync."""
    from fmnist_crnn.journal import Journal

    with pytest.raises(tracking.Refused, match=r"refused 1 call\(s\) of run \w+: params "):
        with tracking.start_run("exp") as run:
            tracking.log_params({"bad?key": 1})  # MLflow refuses the name
            tracking.log_metrics({"acc": 0.5}, step=1)
    stored = mlflow.get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.metrics == {"acc": 0.5}  # the calls after the refused one went
    assert Journal.find(repo, run.info.run_id).pending() == []
    assert "did not answer" not in capsys.readouterr().err
    assert tracking.sync(repo) == 0  # nothing kept for replay
    assert "nothing to send" in capsys.readouterr().out


@pytest.mark.parametrize(("error", "is_refusal"), [
    (mlflow.exceptions.MlflowException("Registered model alias name cannot be empty.",
                                       codes.INVALID_PARAMETER_VALUE), True),
    (mlflow.exceptions.MlflowException("denied", codes.PERMISSION_DENIED), True),
    (mlflow.exceptions.MlflowException("API request failed: Connection refused"), False),
    (mlflow.exceptions.MlflowException("database is locked", codes.TEMPORARILY_UNAVAILABLE),
     False),
    (mlflow.exceptions.MlflowException("UNIQUE constraint failed", codes.BAD_REQUEST), False),
    (ConnectionError("reset by peer"), False),
    (TypeError("unexpected keyword argument"), True),
])
def test_a_refusal_is_told_apart_from_a_store_that_does_not_answer(error, is_refusal):
    assert tracking.refused("sqlite:///x.db", error) is is_refusal


def test_a_retry_ends_the_runs_an_earlier_attempt_left_running(repo):
    uri = tracking.tracking_uri()
    client = mlflow.MlflowClient(uri)
    experiment_id = tracking.configure("exp")

    def run(name, study="s"):
        return client.create_run(experiment_id, tags={"study": study, "dvc_exp_name": name})

    orphan, finished, other, elsewhere = run("s-a-s42"), run("s-a-s42"), run("s-b-s42"), run(
        "s-a-s42", study="t")
    client.set_terminated(finished.info.run_id, "FINISHED")
    ended = tracking.end_leftover_runs(uri, "exp", "s", "s-a-s42", "replaced by attempt 2")
    assert ended == [orphan.info.run_id]
    stored = client.get_run(orphan.info.run_id)
    assert stored.info.status == "KILLED"
    assert stored.data.tags["fmnist.ended_by"] == "replaced by attempt 2"
    assert [client.get_run(r.info.run_id).info.status for r in (finished, other, elsewhere)] == [
        "FINISHED", "RUNNING", "RUNNING"]
    assert tracking.end_leftover_runs(uri, "absent", "s", "s-a-s42", "x") == []


def _logged_tiny_model(folder) -> tuple[str, CRNN]:
    model = CRNN(ModelConfig(channels=(8, 8, 16), embedding_dim=16, hidden_dim=8,
                             num_layers=1, head_dims=(8,)))
    save_model(model, folder / "model.pt")
    example = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    with tracking.start_run("exp"):
        return tracking.log_model(model, folder / "model.pt", example), model


def test_logged_model_loads_with_pyfunc_and_predicts_like_the_network(repo):
    uri, model = _logged_tiny_model(repo)
    loaded = mlflow.pyfunc.load_model(uri)
    batch = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    out = np.asarray(loaded.predict(batch))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)


@pytest.mark.parametrize("batch, message", [
    (np.full((2, 1, 28, 28), 255.0, dtype=np.float32), "0-255 pixels, divide them by 255"),
    (np.full((1, 1, 28, 28), -0.5, dtype=np.float32), r"must lie in \[0, 1\]"),
    (np.full((1, 1, 28, 28), np.nan, dtype=np.float32), "NaN or infinite"),
    (np.zeros((0, 1, 28, 28), dtype=np.float32), "empty batch"),
])
def test_logged_model_refuses_input_it_would_mispredict(repo, batch, message):
    loaded = mlflow.pyfunc.load_model(_logged_tiny_model(repo)[0])
    with pytest.raises(mlflow.exceptions.MlflowException, match=message) as refused:
        loaded.predict(batch)
    assert refused.value.get_http_status_code() == 400


def test_busy_sqlite_store_is_retried_and_other_errors_are_clear(monkeypatch):
    monkeypatch.setattr(tracking.store.time, "sleep", lambda s: None)
    calls = {"n": 0}

    def racing():
        calls["n"] += 1
        if calls["n"] == 1:  # what a parallel run's concurrent insert of a dataset looks like
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets")
        return "linked"

    assert tracking.store._with_retries("sqlite:///x.db", racing) == "linked" and calls["n"] == 2

    def broken():
        raise RuntimeError("no such table: runs")

    with pytest.raises(tracking.TrackingError, match="sqlite:///x.db.*no such table"):
        tracking.store._with_retries("sqlite:///x.db", broken)


def _post(url: str, body: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


@pytest.mark.services
def test_served_model_answers_400_with_the_reason_for_input_it_would_mispredict(repo):
    """`mlflow models serve` as the README runs it, over HTTP."""
    model_dir = mlflow.artifacts.download_artifacts(_logged_tiny_model(repo)[0])
    port = free_port()
    # The README's command in an activated shell: `mlflow models serve` starts `uvicorn` from
    # PATH, so it needs the activation the README asks for.
    env = activated(stranger_env(repo))
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", model_dir, "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        for _ in range(240):  # up to 2 minutes on a busy machine
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {server.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            time.sleep(0.5)
        image = np.random.default_rng(2).random((1, 28, 28)).round(3)
        status, body = _post(url, json.dumps({"inputs": [image.tolist()]}))
        assert status == 200 and len(json.loads(body)["predictions"][0]) == 10
        status, body = _post(url, json.dumps({"inputs": [(image * 255).round().tolist()]}))
        assert status == 400 and "divide them by 255" in json.loads(body)["message"]
        pixels = (image * 255).round().astype(int).tolist()  # JSON integers
        status, body = _post(url, json.dumps({"inputs": [pixels]}))
        assert status == 400 and "divide them by 255" in json.loads(body)["message"]
        # An empty JSON batch never reaches the model: MLflow's own schema check refuses it,
        # naming the data and the expected tensor shape.
        status, body = _post(url, json.dumps({"inputs": []}))
        message = json.loads(body)["message"]
        assert status == 400 and "'[]'" in message and "(-1, 1, 28, 28)" in message
    finally:
        server.terminate()
        server.wait(timeout=30)
