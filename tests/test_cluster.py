"""No run lost to a fault, with the real components on loopback: an `mlflow server` process
that the tests stop and start again, a `dask scheduler` with two `dask worker` processes (each
with its own work folder, as on two machines), a bare git remote and a local-folder DVC remote.

The tests act between two epochs through the train stage's hold files
(FMNIST_CRNN_HOLD_DIR, train.hold_after_epoch), never by racing a timer.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from fmnist_crnn.testing import services

from .conftest import DVC
from .repos import make_repo, run

pytestmark = [pytest.mark.e2e, pytest.mark.services]
EXPERIMENT = "fashion-mnist-crnn"
SLICE = {"train": {"epochs": 2}}


def wait_for(path: Path, proc: subprocess.Popen | None = None, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the process ended ({proc.returncode}) before {path.name}:\n"
                                 f"{out[-4000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def runs_of(url: str, filter_string: str = "") -> list:
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=filter_string,
                              max_results=1000)


def steps(url: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(url).get_metric_history(run_id, key))


def pending_calls(repo: Path) -> int:
    from fmnist_crnn.journal import Journal

    return sum(len(j.pending()) for j in Journal.all(repo))


@pytest.fixture()
def server(tmp_path):
    srv = services.PlainMlflowServer(tmp_path, services.stranger_base_env())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def tracked_repo(tmp_path_factory, server, tmp_path):
    holds = tmp_path / "holds"
    holds.mkdir()
    repo, env = make_repo(tmp_path_factory, {"train": {"epochs": 4}},
                          extra_env={"MLFLOW_TRACKING_URI": server.url,
                                     "FMNIST_CRNN_HOLD_DIR": str(holds)}, name="outage")
    return repo, env, holds


def start_held(repo, env, holds, name, *epochs) -> subprocess.Popen:
    """`dvc exp run -n NAME`, held after each of ``epochs``; returns once it waits after the
    first (``release`` lets it go on)."""
    for epoch in epochs:
        (holds / f"hold-{name}-{epoch}").touch()
    proc = subprocess.Popen([*DVC, "exp", "run", "-n", name], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(holds / f"at-{name}-{epochs[0]}", proc)
    return proc


def release(holds, name, epoch) -> None:
    (holds / f"hold-{name}-{epoch}").unlink()


def assert_complete_run(url: str, run_id: str, epochs: int) -> None:
    """FINISHED, every epoch's metrics exactly once, the artifacts, the model, the version."""
    client = mlflow.MlflowClient(url)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    for key in ("val_acc", "train_loss", "epoch_seconds"):
        assert steps(url, run_id, key) == list(range(1, epochs + 1)), key
    assert {"test_accuracy", "best_val_acc", "train_seconds"} <= set(logged.data.metrics)
    assert logged.data.params["train.epochs"] == str(epochs)
    assert "report.mistakes" in logged.data.params  # the report stage's params joined
    artifacts = {a.path for a in client.list_artifacts(run_id, "val")} | {
        a.path for a in client.list_artifacts(run_id, "test")}
    assert {"val/confusion_matrix.png", "test/confusion_matrix.json"} <= artifacts
    models = client.search_logged_models([logged.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    versions = client.search_model_versions(f"name = '{EXPERIMENT}'")
    assert [v.run_id for v in versions].count(run_id) == 1
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)


def test_server_stopped_mid_run_and_back_before_the_end_loses_nothing(server, tracked_repo):
    repo, env, holds = tracked_repo
    proc = start_held(repo, env, holds, "srv", 1, 3)
    server.stop()
    release(holds, "srv", 1)
    wait_for(holds / "at-srv-3", proc)  # epochs 2 and 3 trained with the server away
    assert pending_calls(repo) > 0
    server.start()
    release(holds, "srv", 3)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "wait in" not in out
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    assert pending_calls(repo) == 0
    mlflow.set_tracking_uri(server.url)
    assert_complete_run(server.url, run_id, epochs=4)


def test_server_down_until_after_the_run_then_sync_completes_it(server, tracked_repo):
    repo, env, holds = tracked_repo
    proc = start_held(repo, env, holds, "down", 1)
    server.stop()
    release(holds, "down", 1)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    # The DVC outputs are all there, and one line per stage says what waits and what to run.
    assert json.loads((repo / "metrics/test.json").read_text())["accuracy"] > 0.15
    waiting = [line for line in out.splitlines() if "python -m fmnist_crnn.tracking sync" in line]
    assert waiting and all(line.startswith("MLflow: ") for line in waiting), out[-3000:]
    assert "Traceback" not in out
    assert pending_calls(repo) > 0
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]

    # Still down: sync says so, keeps everything, exits 1.
    sync = [sys.executable, "-m", "fmnist_crnn.tracking", "sync"]
    proc = subprocess.run(sync, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "still waiting" in proc.stderr
    server.start()
    proc = subprocess.run(sync, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_id}: sent" in proc.stdout and "the run is FINISHED" in proc.stdout
    assert pending_calls(repo) == 0
    mlflow.set_tracking_uri(server.url)
    assert_complete_run(server.url, run_id, epochs=4)
    # Again: nothing left to send, nothing sent twice.
    proc = subprocess.run(sync, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing to send" in proc.stdout
    assert_complete_run(server.url, run_id, epochs=4)


def test_a_run_started_while_the_server_is_away_waits_for_it(server, tmp_path):
    """The server stopped (a restart) when a run is created: the stage waits, says so on one
    line, and the run is created once the server answers."""
    (tmp_path / ".dvc").mkdir()
    server.stop()
    code = ("from fmnist_crnn import tracking\n"
            "with tracking.start_run('fashion-mnist-crnn') as run:\n"
            "    tracking.log_metrics({'acc': 0.5}, step=1)\n"
            "print(run.info.run_id)\n")
    env = {**services.stranger_base_env(), "MLFLOW_TRACKING_URI": server.url,
           "FMNIST_TRACKING_WAIT_S": "300", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    before = []  # blocks until the stage says it waits (or ends: then the assert shows why)
    while "does not answer" not in (line := proc.stderr.readline()) and line:
        before.append(line)
    first = "".join(before) + line
    assert f"MLflow: {server.url} does not answer" in line and "at most 300 s" in line, first
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, first + err[-3000:]
    [created] = runs_of(server.url)
    assert created.info.run_id == out.split()[-1] and created.info.status == "FINISHED"
    assert steps(server.url, created.info.run_id, "acc") == [1]


def test_a_run_stopped_by_sigterm_ends_killed_not_running(server, tracked_repo):
    repo, env, holds = tracked_repo
    proc = start_held(repo, env, holds, "term", 2)
    os.kill(int((holds / "at-term-2").read_text()), signal.SIGTERM)
    release(holds, "term", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    [killed] = runs_of(server.url, "attributes.run_name = 'term'")
    assert killed.info.status == "KILLED", out[-3000:]
    assert steps(server.url, killed.info.run_id, "val_acc") == [1, 2]


# --- the study over Dask workers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """mlflow server + dask scheduler + 2 workers + a bare git remote + a DVC remote. The
    server and the scheduler start first and import while the repository is made."""
    workdir = tmp_path_factory.mktemp("cluster")
    base = services.stranger_base_env()
    srv = services.PlainMlflowServer(workdir, base)
    cluster = services.DaskCluster(workdir)
    bin_first = f"{Path(sys.executable).parent}:"
    try:
        srv.launch()
        cluster.start_scheduler({**base, "PATH": bin_first + base["PATH"]})
        holds = workdir / "holds"
        holds.mkdir()
        repo, env = make_repo(tmp_path_factory, SLICE,
                              extra_env={"MLFLOW_TRACKING_URI": srv.url}, name="head")
        remote = workdir / "remote.git"
        run(["git", "init", "-q", "--bare", str(remote)], workdir, env)
        run(["git", "remote", "add", "origin", str(remote)], repo, env)
        run([*DVC, "remote", "add", "-d", "store", str(workdir / "dvc-store")], repo, env)
        run(["git", "commit", "-qam", "remotes"], repo, env)
        run(["git", "push", "-q", "origin", "HEAD"], repo, env)
        worker_env = {**env, "PATH": bin_first + env["PATH"], "FMNIST_CRNN_HOLD_DIR": str(holds)}

        def start_worker(name: str) -> subprocess.Popen:
            return cluster.start_worker(
                {**worker_env, "FMNIST_STUDY_WORKDIR": str(workdir / name)}, name)

        workers = {name: start_worker(name) for name in ("w1", "w2")}
        srv.wait_ready()
        cluster.wait_for_workers(2)
        yield {"repo": repo, "env": env, "remote": remote, "cluster": cluster,
               "server": srv, "holds": holds, "workdir": workdir, "workers": workers,
               "start_worker": start_worker}
    finally:
        cluster.stop()
        srv.stop()


# The spread scenario's two variants, one per worker. A fault scenario studies one: its run
# is attacked on one worker and retried on the other, which is what it proves.
TWO = ("baseline", "dropout01")
ONE = ("baseline",)


def start_study(team, study, variants=ONE) -> subprocess.Popen:
    return subprocess.Popen(study_command(team, study, variants), cwd=team["repo"],
                            env=team["env"], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def study_command(team, study, variants, epochs=2):
    """The study's runs: 2 epochs, so that a fault scenario can act between them."""
    return [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", study, "--variants",
            *variants, "--seeds", "1", "--epochs", str(epochs), "--scheduler",
            team["cluster"].address]


def assert_study_landed(team, study, variants=ONE):
    """A record per variant (committed), its experiment on the git remote, one FINISHED
    MLflow run per name and none left RUNNING."""
    repo = team["repo"]
    names = {f"{study}-{v}-s42" for v in variants}
    folder = repo / "reports/study/runs" / study
    recorded = {p.stem for p in folder.glob("*.json") if p.name != "plan.json"}
    assert recorded == names
    log = run(["git", "log", "--format=%s"], repo, team["env"])
    assert sorted(f"{study}-{line.split()[-1]}" for line in log.splitlines()
                  if line.startswith(f"study {study}: record")) == sorted(names)
    refs = run(["git", "ls-remote", str(team["remote"]), "refs/exps/*"], repo, team["env"])
    assert {line.rsplit("/", 1)[-1] for line in refs.splitlines()} >= names
    runs = runs_of(team["server"].url, f"tags.study = '{study}'")
    finished = sorted(r.data.tags["dvc_exp_name"] for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(names)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return [json.loads((folder / f"{n}.json").read_text()) for n in sorted(names)], runs


@pytest.mark.distributed
def test_a_slice_study_spreads_over_both_workers_and_lands_every_run_once(team):
    proc = subprocess.run(study_command(team, "spread", TWO, epochs=1), cwd=team["repo"],
                          env=team["env"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records, runs = assert_study_landed(team, "spread", TWO)
    assert {r["worker"]["name"] for r in records} == {"w1", "w2"}
    assert all(r["test_accuracy"] > 0.15 and len(r["history"]["val_acc"]) == 1 for r in records)
    assert len(runs) == 2
    # The experiments' outputs went to the DVC remote: a clone can pull one.
    assert any((team["workdir"] / "dvc-store").rglob("*"))
    # Run again: everything is recorded, nothing is submitted.
    again = subprocess.run(study_command(team, "spread", TWO, epochs=1), cwd=team["repo"],
                           env=team["env"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 recorded, 0 to run" in again.stdout


@pytest.mark.distributed
def test_a_worker_killed_mid_run_loses_nothing_and_leaves_no_process(team):
    holds, victim = team["holds"], "kill-baseline-s42"
    runner, worker, attempt = held_attempt(team, "kill", victim)
    assert len(attempt) >= 2  # dvc exp run and the train stage at least
    worker.kill()  # SIGKILL: no clean-up of its own
    (holds / f"hold-{victim}-1").unlink()
    wait_gone(attempt)
    out, _ = runner.communicate(timeout=1800)
    assert runner.returncode == 0, out[-4000:]
    records, runs = assert_study_landed(team, "kill")
    # Exactly one FINISHED run of the victim: the killed attempt's ended KILLED, or the retry
    # continued it from its checkpoint.
    assert_one_finished(runs, victim)


def held_attempt(team, study: str, victim: str):
    """Start ``study`` with ``victim`` held after epoch 1; once it waits there, return the
    runner, the Dask worker process running it and the processes of its attempt (its own
    process group: `dvc exp run` and the stage at least)."""
    (team["holds"] / f"hold-{victim}-1").touch()
    runner = start_study(team, study)
    wait_for(team["holds"] / f"at-{victim}-1", runner)
    stage = psutil.Process(int((team["holds"] / f"at-{victim}-1").read_text()))
    workers = set(team["cluster"].wait_for_workers(2).values())
    [worker] = [p for p in stage.parents() if p.pid in workers]
    group = os.getpgid(stage.pid)
    return runner, worker, [p for p in psutil.process_iter() if _in_group(p, group)]


def wait_gone(processes, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, "a process of the killed attempt kept running"
        time.sleep(0.5)


def assert_one_finished(runs, name) -> None:
    statuses = sorted(r.info.status for r in runs if r.data.tags["dvc_exp_name"] == name)
    assert statuses in (["FINISHED"], ["FINISHED", "KILLED"]), statuses


@pytest.mark.distributed
def test_a_worker_killed_with_its_process_group_leaves_one_finished_run(team):
    """SIGKILL to the worker's whole process group (as a terminal, a supervisor or a batch
    system sends it) kills the attempt's guard too: the stage notices and stops the attempt."""
    holds, victim = team["holds"], "group-baseline-s42"
    runner, worker, attempt = held_attempt(team, "group", victim)
    worker_group = os.getpgid(worker.pid)  # `dask worker`: its nanny, the worker, the guard
    [name] = [n for n, proc in team["workers"].items() if proc.pid == worker_group]
    assert len(attempt) >= 2 and os.getpgid(attempt[0].pid) != worker_group
    try:
        os.killpg(worker_group, signal.SIGKILL)
        (holds / f"hold-{victim}-1").unlink()
        wait_gone(attempt)
        out, _ = runner.communicate(timeout=1800)
        assert runner.returncode == 0, out[-4000:]
        records, runs = assert_study_landed(team, "group")
        assert_one_finished(runs, victim)
        # The stage stopped the attempt itself: its guard was dead too.
        log = next((team["workdir"] / name).glob(f"clone-*-{victim}.log")).read_text()
        assert "attempt guard" in log and "is gone" in log, log[-3000:]
        assert not [r for r in runs if r.info.status == "RUNNING"]
    finally:
        team["workers"][name] = team["start_worker"](name)
        team["cluster"].wait_for_workers(2)


def _in_group(proc: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(proc.pid) == group
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.distributed
def test_a_runner_killed_and_started_again_trains_no_run_twice(team):
    holds, held = team["holds"], "restart-baseline-s42"
    (holds / f"hold-{held}-1").touch()
    first = start_study(team, "restart")
    wait_for(holds / f"at-{held}-1", first)
    first.kill()  # the runner goes; the run it started goes on training on its worker
    first.communicate()
    second = start_study(team, "restart")
    time.sleep(10)  # the second runner has submitted the held run again
    (holds / f"hold-{held}-1").unlink()
    out, _ = second.communicate(timeout=1800)
    assert second.returncode == 0, out[-4000:]
    records, runs = assert_study_landed(team, "restart")
    assert [r.data.tags["dvc_exp_name"] for r in runs].count(held) == 1  # trained once
