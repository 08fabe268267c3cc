"""The team set-up against real components started on loopback: PostgreSQL behind
`mlflow server` with MLflow's basic-auth app, artifacts and the DVC remote in an
S3-compatible bucket (moto's server mode)."""

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pytest

from fmnist_crnn.testing import services

from .conftest import DVC, stranger_env
from .repos import make_repo, run

pytestmark = [pytest.mark.e2e, pytest.mark.services]
ADMIN = ("admin", "admin-test-password-1")
EXPERIMENT = "fashion-mnist-crnn"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """PostgreSQL + S3 bucket + `python -m fmnist_crnn.server serve` (= `make server`)."""
    workdir = tmp_path_factory.mktemp("team")
    with services.postgres() as pg, services.s3_server() as s3:
        services.make_bucket(s3, "team")
        backend = services.create_database(pg, "mlflow")
        services.create_database(pg, "mlflow_auth")
        env = {**services.stranger_base_env(), **services.S3_ENV,
               "MLFLOW_BACKEND_STORE_URI": backend,
               "MLFLOW_ARTIFACTS_DESTINATION": "s3://team/mlflow",
               "MLFLOW_S3_ENDPOINT_URL": s3,
               "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
               "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
               # As docs/team.md: the name clients use for the server machine.
               "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow-host:*"}
        with services.mlflow_server(env, workdir) as url:
            yield {"url": url, "s3": s3, "workdir": workdir}


def client_env(team, user=ADMIN):
    """What a team member sets: the server's URI and their credentials, nothing else."""
    return {"MLFLOW_TRACKING_URI": team["url"], "MLFLOW_TRACKING_USERNAME": user[0],
            "MLFLOW_TRACKING_PASSWORD": user[1]}


def rest(team, path, user=None, body=None, host=None):
    """GET (or POST ``body``) on the REST API, with another Host header if given; returns
    (status, JSON)."""
    request = urllib.request.Request(f"{team['url']}{path}",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if host:
        request.add_header("Host", host)
    if user:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.fixture(scope="module")
def pipeline_on_server(team, tmp_path_factory):
    """The pipeline on a slice, its runs sent to the team server."""
    repo, env = make_repo(tmp_path_factory, {"train": {"epochs": 2}},
                          extra_env={**services.S3_ENV, **client_env(team)}, name="teamrepo")
    run([*DVC, "repro"], repo, env)
    return repo, env


def test_a_pipeline_run_lands_on_the_server_with_everything(team, pipeline_on_server):
    repo, _ = pipeline_on_server
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    status, body = rest(team, f"/api/2.0/mlflow/runs/get?run_id={run_id}", ADMIN)
    assert status == 200
    logged = body["run"]
    assert logged["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert params["model.hidden_dim"] == "128" and params["train.epochs"] == "2"
    metrics = {m["key"] for m in logged["data"]["metrics"]}
    assert {"test_accuracy", "best_val_acc"} <= metrics
    status, history = rest(team, "/api/2.0/mlflow/metrics/get-history"
                                 f"?run_id={run_id}&metric_key=val_acc", ADMIN)
    assert [m["step"] for m in history["metrics"]] == [1, 2]
    # Artifacts (confusion matrices, the model) went through the server into the bucket.
    keys = services.list_keys(team["s3"], "team", "mlflow/")
    assert any(k.endswith("test/confusion_matrix.png") for k in keys)
    assert any(k.endswith("MLmodel") for k in keys)


def test_predict_and_the_registry_work_unchanged_against_the_server(team, pipeline_on_server):
    repo, env = pipeline_on_server
    out = run([sys.executable, "-m", "fmnist_crnn.predict", "--model-uri",
               f"models:/{EXPERIMENT}@champion", "data/raw/t10k-images-idx3-ubyte"], repo, env)
    assert out.count("data/raw/t10k-images-idx3-ubyte[") == 10000  # every test image


def test_the_server_answers_the_host_name_it_was_given_and_refuses_others(team):
    port = team["url"].rsplit(":", 1)[1]
    path = f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}"
    assert rest(team, path, ADMIN, host=f"mlflow-host:{port}")[0] in (200, 404)
    assert rest(team, path, ADMIN, host=f"other-host:{port}")[0] == 403
    assert rest(team, path, ADMIN)[0] in (200, 404)  # 127.0.0.1: always allowed


def test_no_credentials_401_no_permission_403_granted_200(team, pipeline_on_server):
    path = f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}"
    assert rest(team, path)[0] == 401
    bob = ("bob", "bob-test-password-1")
    env = {**services.stranger_base_env(), **client_env(team),
           "FMNIST_NEW_USER_PASSWORD": bob[1]}
    for args in (["add-user", "bob"], ):
        proc = subprocess.run([sys.executable, "-m", "fmnist_crnn.server", *args], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert rest(team, path, bob)[0] == 403  # default permission: none
    proc = subprocess.run([sys.executable, "-m", "fmnist_crnn.server", "grant", "bob",
                           EXPERIMENT, "--permission", "READ"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    status, body = rest(team, path, bob)
    assert status == 200 and body["experiment"]["name"] == EXPERIMENT
    # READ is not EDIT: bob cannot log into the team's experiment.
    experiment_id = body["experiment"]["experiment_id"]
    status, _ = rest(team, "/api/2.0/mlflow/runs/create", bob,
                     {"experiment_id": experiment_id})
    assert status == 403


def test_two_queued_experiments_run_in_parallel_and_both_land(team, pipeline_on_server):
    repo, env = pipeline_on_server
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    study = [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", "team", "--variants",
             "baseline", "dropout01", "--jobs", "2", "--epochs", "1", "--poll", "5",
             # The model through the server and its registry: test_a_pipeline_run_lands...
             "--set", "tracking.log_model=false"]
    try:  # ~2 minutes; the limit only turns a hang into a failure that shows the queue
        proc = subprocess.run(study, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1200)
    except subprocess.TimeoutExpired as exc:
        queue = subprocess.run([*DVC, "queue", "status"], cwd=repo, env=env,
                               capture_output=True, text=True)
        pytest.fail(f"the study runner did not end:\n{exc.stdout}\n{exc.stderr}\n"
                    f"dvc queue status:\n{queue.stdout}{queue.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mlflow.set_tracking_uri(team["url"])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in client_env(team).items():
            mp.setenv(key, value)
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                  filter_string="tags.study = 'team'")
    names = sorted(r.data.tags["dvc_exp_name"] for r in runs)
    assert names == ["team-baseline-s42", "team-dropout01-s42"]  # no lost run, no duplicate
    assert all(r.info.status == "FINISHED" for r in runs)


def test_dvc_remote_on_s3_a_second_clone_pulls_and_is_up_to_date(team, pipeline_on_server,
                                                                  tmp_path):
    repo, env = pipeline_on_server
    services.make_bucket(team["s3"], "dvc-store")
    run([*DVC, "remote", "add", "-d", "team", "s3://dvc-store/fmnist"], repo, env)
    run([*DVC, "remote", "modify", "team", "endpointurl", team["s3"]], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "remote", "--allow-empty"], repo, env)
    run([*DVC, "push"], repo, env)
    assert any(k.startswith("fmnist/files/md5/")
               for k in services.list_keys(team["s3"], "dvc-store"))
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    clone_env = {**stranger_env(clone), **services.S3_ENV}
    run([*DVC, "pull"], clone, clone_env)
    assert "up to date" in run([*DVC, "status"], clone, clone_env)
    assert (clone / "models/model.pt").read_bytes() == (repo / "models/model.pt").read_bytes()
