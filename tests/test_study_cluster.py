"""The Dask study's pieces that need no cluster: the attempt supervisor (no process outlives
a lost worker), the checks before submitting, the store a worker logs to."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fmnist_crnn.study import cluster

PARENT = """
import os, subprocess, sys, time
grandchild = "import time; time.sleep(300)"
command = ("import subprocess, sys, time; "
           f"subprocess.Popen([sys.executable, '-c', '{grandchild}']); ")
child = subprocess.Popen([sys.executable, "-m", "fmnist_crnn.study.attempt", str(os.getpid()),
                          "--", sys.executable, "-c", command + "time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def _group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def test_an_attempt_stops_its_whole_process_group_when_its_parent_is_killed():
    """The stand-in for a Dask worker starts an attempt whose command has a child of its own;
    kill -9 of the worker leaves no process of the attempt running."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    worker = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env=env)
    attempt = psutil.Process(int(worker.stdout.readline()))
    deadline = time.monotonic() + 30
    while not [c for c in attempt.children()]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    group = attempt.children()[0].pid  # the command leads its own process group
    while len(_group_members(group)) < 2:  # the command and its child
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 60
    while _group_members(group) or attempt.is_running() and \
            attempt.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the attempt outlived its parent"
        time.sleep(0.2)


def test_an_attempt_passes_the_command_status_through(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmnist_crnn.study.attempt", str(os.getpid()),
                           "--", sys.executable, "-c", "raise SystemExit(7)"],
                          env={**os.environ, "PYTHONPATH": str(Path(cluster.__file__).parents[2])})
    assert proc.returncode == 7


def test_sigterm_to_an_attempt_stops_its_command():
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_crnn.study.attempt",
                             str(os.getpid()), "--", sys.executable, "-c",
                             "import time; time.sleep(300)"],
                            env={**os.environ,
                                 "PYTHONPATH": str(Path(cluster.__file__).parents[2])})
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143


def test_a_stage_stops_its_process_group_when_its_guard_is_killed():
    """The guard SIGKILLed with its worker: the stage notices and stops its own group."""
    from fmnist_crnn import guard

    src = str(Path(cluster.__file__).parents[2])
    attempt_guard = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    stage = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom fmnist_crnn import guard\n"
         "guard.watch(poll_s=0.1, grace_s=10)\nprint('watching', flush=True)\n"
         "time.sleep(300)"],
        env={**os.environ, "PYTHONPATH": src, guard.ENV: guard.identity(attempt_guard.pid)},
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stage.stdout.readline() == "watching\n"
        time.sleep(0.5)  # five polls: a living guard stops nothing
        assert stage.poll() is None
        attempt_guard.kill()
        attempt_guard.wait()
        assert stage.wait(timeout=30) == -signal.SIGTERM
        assert "attempt guard" in stage.stderr.read()
    finally:
        for proc in (attempt_guard, stage):
            if proc.poll() is None:
                proc.kill()


def test_the_attempt_names_itself_to_its_command():
    out = subprocess.run([sys.executable, "-m", "fmnist_crnn.study.attempt", str(os.getpid()),
                          "--", sys.executable, "-c",
                          "import os; print(os.environ['FMNIST_ATTEMPT_GUARD'])"],
                         env={**os.environ,
                              "PYTHONPATH": str(Path(cluster.__file__).parents[2])},
                         capture_output=True, text=True, check=True).stdout
    pid = out.split(":")[0]
    assert pid.isdigit() and int(pid) != os.getpid()


@pytest.mark.parametrize(("study", "worker", "expected"), [
    ("http://mlflow-host:5000", "http://mlflow-host:5000/", "http://mlflow-host:5000/"),
    ("http://mlflow-host:5000", None, "http://mlflow-host:5000"),
    (None, "http://mlflow-host:5000", "http://mlflow-host:5000"),
])
def test_a_worker_logs_to_the_study_server(study, worker, expected):
    assert cluster.worker_tracking_uri(study, worker) == expected


def test_a_worker_on_another_server_or_without_one_is_refused(tmp_path):
    with pytest.raises(cluster.RunFailed, match="logs to MLFLOW_TRACKING_URI=http://other.*"
                                                "the study to http://mlflow-host"):
        cluster.worker_tracking_uri("http://mlflow-host:5000", "http://other:5000")
    with pytest.raises(cluster.RunFailed, match="no MLFLOW_TRACKING_URI"):
        cluster.worker_tracking_uri(f"sqlite:///{tmp_path}/absent/mlflow.db", None)
    store = tmp_path / "mlflow.db"
    store.touch()  # the runner's machine: its local store is reachable
    assert cluster.worker_tracking_uri(f"sqlite:///{store}", None) == f"sqlite:///{store}"


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def head(tmp_path, monkeypatch):
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "head"
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("a: 1\n")
    (repo / "train.py").write_text("changed = False\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def test_the_checks_before_submitting_name_what_is_missing(head, tmp_path):
    with pytest.raises(cluster.RunFailed, match="no git remote 'origin'"):
        cluster.check_ready(head, "origin")
    git(tmp_path, "init", "-q", "--bare", "remote.git")
    git(head, "remote", "add", "origin", str(tmp_path / "remote.git"))
    with pytest.raises(cluster.RunFailed, match="not on the git remote 'origin'.*git push"):
        cluster.check_ready(head, "origin")
    git(head, "push", "-q", "origin", "HEAD")
    with pytest.raises(cluster.RunFailed, match="no default DVC remote"):
        cluster.check_ready(head, "origin")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "s", str(tmp_path / "s")],
                   cwd=head, check=True)
    git(head, "commit", "-qam", "remote")
    git(head, "push", "-q", "origin", "HEAD")
    (head / "train.py").write_text("changed = True\n")
    with pytest.raises(cluster.RunFailed, match="differ from the commit: train.py"):
        cluster.check_ready(head, "origin")
    git(head, "checkout", "train.py")
    (head / "params.yaml").write_text("a: 2\n")  # allowed: each run resets it to the commit's
    pushed = git(head, "rev-parse", "HEAD")
    assert cluster.check_ready(head, "origin") == (str(tmp_path / "remote.git"), pushed)
    # A record committed by the runner since: the workers still run the pushed commit.
    git(head, "checkout", "params.yaml")
    record = head / "reports/study/runs/s/s-baseline-s42.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}\n")
    git(head, "add", "-A")
    git(head, "commit", "-qm", "record")
    assert cluster.check_ready(head, "origin")[1] == pushed
    (head / "params.yaml").write_text("a: 3\n")
    git(head, "commit", "-qam", "a change the workers must see")
    with pytest.raises(cluster.RunFailed, match="not on the git remote"):
        cluster.check_ready(head, "origin")


def test_the_experiment_ref_is_found_by_its_name():
    listing = ("aaa refs/exps/ab/cdef/spread-baseline-s42\n"
               "bbb refs/exps/ab/cdef/spread-baseline-s420\n")
    assert cluster._ref_named(listing, "spread-baseline-s42") == \
        "refs/exps/ab/cdef/spread-baseline-s42"
    assert cluster._ref_named(listing, "spread-baseline") is None


def test_a_runs_lock_is_leased_for_lock_lease_when_made_and_registered(monkeypatch):
    """Dask reads the lease when the lock is made (its renewal interval) and when it is
    registered with the scheduler (the timeout): both must see LOCK_LEASE, not Dask's 30 s."""
    import dask
    import distributed

    seen = []
    lease = "distributed.scheduler.locks.lease-timeout"

    class Entered(Exception):
        pass

    class RecordingLock:
        def __init__(self, name):
            seen.append(("made", name, dask.config.get(lease)))

        def register(self):
            seen.append(("registered", dask.config.get(lease)))

        def __enter__(self):
            raise Entered

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(distributed, "Lock", RecordingLock)
    with pytest.raises(Entered):
        cluster.run_one({"study": "s", "name": "s-baseline-s42"})
    assert seen == [("made", "fmnist-crnn/s/s-baseline-s42", cluster.LOCK_LEASE),
                    ("registered", cluster.LOCK_LEASE)]
