"""A study spread over machines with Dask distributed: one task per variant x seed.

Head machine: ``dask scheduler``; each other machine: the project checked out, ``make setup``,
then ``dask worker tcp://HEAD:8786 --nworkers 1 --nthreads 1`` (dask-jobqueue and
dask-kubernetes start the same workers on SLURM, PBS or Kubernetes). The runner
(``python -m fmnist_crnn.study run --scheduler tcp://HEAD:8786``) submits one task per planned
run without a record; Dask places them, and runs a task again elsewhere when its worker is lost.

A task (``run_one``), on its worker:

1. takes a Dask lock named after the run, so the same run never trains twice at once (a
   restarted runner submits again what an earlier runner left running; the second waits);
2. takes a clone of its own under the worker's work folder (a ``flock`` per clone: two tasks
   never share a working tree), fetched and checked out at the study's commit;
3. if the git remote already holds the experiment (``refs/exps/.../NAME``: an attempt whose
   result never reached a runner), builds the record from it and stops there;
4. else ends any MLflow run of the same name and study an earlier attempt left RUNNING
   (its machine gone: KILLED, tagged ``fmnist.ended_by``), ``dvc pull`` (what the remote has
   of the commit's outputs), ``dvc exp run -n NAME -S
   ...`` in the clone's workspace as a process group that dies with the worker
   (fmnist_crnn.study.attempt), ``dvc exp push`` (git ref and DVC outputs to the remotes);
5. returns the run's record, built from the experiment's commit, which the runner writes and
   commits.

MLflow: the worker's own environment names the team's server and the worker's credentials;
each run's calls go through its journal in the clone (fmnist_crnn.tracking), so a server that
restarts mid-run loses nothing.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fmnist_crnn import tracking
from fmnist_crnn.study import records

WORKDIR_ENV = "FMNIST_STUDY_WORKDIR"
DEFAULT_WORKDIR = Path.home() / ".cache" / "fmnist-crnn" / "study-clones"
# The files of an experiment's commit a record is built from (dvc.yaml's outputs, all in git).
RECORD_FILES = {"params": "params.yaml", "test": "metrics/test.json",
                "train": "metrics/train.json", "history": "plots/history.csv",
                "environment": "models/environment.json", "run": "models/mlflow_run.json"}


class RunFailed(RuntimeError):
    """A planned run could not produce a record on its worker (the message says why)."""


# --- on the worker ------------------------------------------------------------------------------

# A run's Dask lock is leased: its holder's worker renews the lease every fifth of this, and
# the scheduler frees a lease not renewed for this long (checking every
# distributed.scheduler.locks.lease-validation-interval, 10 s by default), so the retry of a
# run whose worker died waits at most about 20 s for it instead of Dask's 30 + 10 s. The
# holder renews from its event loop, which the run does not occupy (it waits on a process).
LOCK_LEASE = "10s"


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: one planned run, from clone to record (the module's docstring)."""
    import dask
    from distributed import Lock

    with dask.config.set({"distributed.scheduler.locks.lease-timeout": LOCK_LEASE}):
        # Both read the lease: the renewal interval here, the timeout when registering.
        lock = Lock(f"fmnist-crnn/{spec['study']}/{spec['name']}")
        lock.register()
    with lock:
        workdir = Path(os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR).expanduser()
        with own_clone(workdir) as clone:
            return _run_in_clone(spec, clone)


@contextlib.contextmanager
def own_clone(workdir: Path) -> Iterator[Path]:
    """The first clone folder under ``workdir`` no other task holds, held until the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    for slot in range(1000):
        handle = open(workdir / f"clone-{slot}.lock", "a")  # noqa: SIM115 (held below)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield workdir / f"clone-{slot}"
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    raise RunFailed(f"no free clone folder under {workdir}")


def _run_in_clone(spec: dict[str, Any], clone: Path) -> dict[str, Any]:
    name, timings = spec["name"], {}
    env = _task_env(spec)
    started = time.perf_counter()
    _prepare_clone(spec, clone, env)
    timings["clone_s"] = time.perf_counter() - started
    ref = _remote_experiment(clone, name, env)
    if ref is not None:  # an earlier attempt finished and pushed: take its result
        _git(["fetch", "-q", "origin", f"+{ref}:{ref}"], clone, env)
        return _with_worker_info(record_from_commit(clone, spec, ref, env), timings,
                                 reused=True)
    started = time.perf_counter()
    _dvc(["pull", "--allow-missing", "-q"], clone, env, check=False)
    timings["pull_s"] = time.perf_counter() - started
    params = yaml.safe_load((clone / "params.yaml").read_text())
    ended = tracking.end_leftover_runs(
        env["MLFLOW_TRACKING_URI"], params["tracking"]["experiment_name"], spec["study"], name,
        f"left RUNNING by an earlier attempt; ended by the attempt on {socket.gethostname()} "
        f"(pid {os.getpid()}), which runs it again (or continues it from this clone)")
    if ended:
        print(f"{name}: ended {len(ended)} run(s) an earlier attempt left RUNNING: "
              f"{', '.join(ended)}", flush=True)
    started = time.perf_counter()
    log = clone.parent / f"{clone.name}-{name}.log"
    with open(log, "w") as out:
        status = subprocess.call(
            [sys.executable, "-m", "fmnist_crnn.study.attempt", str(os.getpid()), "--",
             sys.executable, "-m", "dvc", "exp", "run", "-n", name, *spec["args"]],
            cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    timings["run_s"] = time.perf_counter() - started
    if status != 0:
        tail = log.read_text()[-1500:].strip()
        raise RunFailed(f"{name}: `dvc exp run` exited {status} on {socket.gethostname()} "
                        f"({log}):\n{tail}")
    started = time.perf_counter()
    _dvc(["exp", "push", "origin", name], clone, env)
    timings["push_s"] = time.perf_counter() - started
    ref = _local_experiment(clone, name, env)
    return _with_worker_info(record_from_commit(clone, spec, ref, env), timings, reused=False)


def _task_env(spec: dict[str, Any]) -> dict[str, str]:
    """The worker's environment (its MLflow credentials, AWS keys), with the store the study
    logs to, the worker's own interpreter for the stages, and no DVC variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FMNIST_PYTHON"] = sys.executable
    env["MLFLOW_TRACKING_URI"] = worker_tracking_uri(spec.get("tracking_uri"),
                                                     os.environ.get("MLFLOW_TRACKING_URI"))
    env.setdefault("GIT_AUTHOR_NAME", "fmnist-crnn worker")
    env.setdefault("GIT_AUTHOR_EMAIL", f"worker@{socket.gethostname()}")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    return env


def worker_tracking_uri(study_uri: str | None, worker_uri: str | None) -> str:
    """The store a worker logs to: its own MLFLOW_TRACKING_URI, which must be the study's
    server; without one, the study's URI when this machine can reach it."""
    host = socket.gethostname()
    if worker_uri:
        if study_uri and study_uri.startswith(("http://", "https://")) and \
                worker_uri.rstrip("/") != study_uri.rstrip("/"):
            raise RunFailed(f"worker {host} logs to MLFLOW_TRACKING_URI={worker_uri}, the study "
                            f"to {study_uri}; start the worker with the study's server")
        return worker_uri
    if study_uri and study_uri.startswith("sqlite:///"):
        if Path(study_uri[len("sqlite:///"):]).exists():
            return study_uri  # the same machine as the runner: its local store
    elif study_uri:
        return study_uri
    raise RunFailed(f"worker {host} has no MLFLOW_TRACKING_URI and cannot reach the study's "
                    f"store {study_uri}; start it with MLFLOW_TRACKING_URI (and credentials) of "
                    "the team's server")


def _prepare_clone(spec: dict[str, Any], clone: Path, env: dict[str, str]) -> None:
    """Clone (once), fetch, check out the study's commit and undo what an earlier run left
    in the working tree; DVC's outputs and checkpoints stay (a killed attempt resumes)."""
    if not (clone / ".git").exists():
        _git(["clone", "-q", "--no-checkout", spec["git_remote"], str(clone)], clone.parent, env)
    else:
        _git(["remote", "set-url", "origin", spec["git_remote"]], clone, env)
    _git(["fetch", "-q", "origin"], clone, env)
    _git(["checkout", "-q", "-f", "--detach", spec["commit"]], clone, env)
    _git(["clean", "-q", "-f", "-d"], clone, env)
    # DVC's read/write lock of a killed `dvc exp run`: no other process uses this clone now.
    (clone / ".dvc" / "tmp" / "rwlock").unlink(missing_ok=True)


def _remote_experiment(clone: Path, name: str, env: dict[str, str]) -> str | None:
    out = _git(["ls-remote", "origin", "refs/exps/*"], clone, env)
    return _ref_named(out, name)


def _local_experiment(clone: Path, name: str, env: dict[str, str]) -> str:
    out = _git(["for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], clone, env)
    ref = _ref_named(out, name)
    if ref is None:
        raise RunFailed(f"{name}: `dvc exp run` ended without an experiment ref")
    return ref


def _ref_named(listing: str, name: str) -> str | None:
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].rsplit("/", 1)[-1] == name:
            return parts[1]
    return None


def record_from_commit(repo: Path, spec: dict[str, Any], ref: str,
                       env: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's record from the files of its experiment commit (all kept in git)."""
    def show(path: str) -> str:
        return _git(["show", f"{ref}:{path}"], repo, env)

    rev = _git(["rev-parse", ref], repo, env).strip()
    params = yaml.safe_load(show(RECORD_FILES["params"]))
    node = {"name": spec["name"], "rev": rev, "data": {
        "params": {"params.yaml": {"data": params}},
        "metrics": {path: {"data": json.loads(show(path))}
                    for path in (RECORD_FILES["test"], RECORD_FILES["train"])}}}
    record = records.record_from_exp_show_node(node)
    if record is None:
        raise RunFailed(f"{spec['name']}: its experiment {rev[:8]} has no test metrics or is not "
                        f"tagged with a study")
    rows = list(csv.DictReader(io.StringIO(show(RECORD_FILES["history"]))))
    history = {key: [float(r[key]) for r in rows if r.get(key)]
               for key in ("val_acc", "val_loss", "train_acc", "train_loss")}
    record.update(mlflow_run_id=json.loads(show(RECORD_FILES["run"])).get("run_id"),
                  history=history, environment=json.loads(show(RECORD_FILES["environment"])),
                  recorded_at=datetime.now(UTC).isoformat(timespec="seconds"))
    return record


def _with_worker_info(record: dict[str, Any], timings: dict[str, float],
                      reused: bool) -> dict[str, Any]:
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except ValueError:  # not inside a Dask task
        worker = None
    record["worker"] = {"host": socket.gethostname(), "name": worker,
                        "reused_pushed_result": reused,
                        **{k: round(v, 2) for k, v in timings.items()}}
    return record


def _git(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"`git {' '.join(args)}` failed in {cwd}: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def _dvc(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RunFailed(f"`dvc {' '.join(args)}` failed in {cwd}: "
                        f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


# --- on the head machine ----------------------------------------------------------------------

def check_ready(repo: Path, git_remote: str) -> tuple[str, str]:
    """What workers need before anything is submitted: a clean tracked tree, its commit on
    the git remote (or one that differs only by study records), a default DVC remote.
    Returns (remote URL, the commit the workers run)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)

    url = git("remote", "get-url", git_remote)
    if url.returncode != 0:
        raise RunFailed(f"no git remote '{git_remote}' in {repo}: workers clone the study's "
                        f"commit from it (git remote add {git_remote} URL)")
    commit = git("rev-parse", "HEAD").stdout.strip()
    # params.yaml may differ (every run resets it to the commit's values); DVC's files too.
    excluded = [f":(exclude){p}" for p in ("reports/study", "params.yaml",
                                            *tracking.dvc_managed_paths(repo))]
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                *excluded).stdout.strip()
    if dirty:
        raise RunFailed("the workers run the committed code and params.yaml, and these differ "
                        f"from the commit: {' '.join(dirty.split()[1::2][:5])}; commit them "
                        "first")
    git("fetch", "-q", git_remote)
    unpushed = git("rev-list", "HEAD", "--not", f"--remotes={git_remote}").stdout.split()
    if unpushed:
        # Commits that only add study records (the runner's own) change nothing a worker runs:
        # the workers take the last pushed commit below them.
        base = git("rev-parse", "--verify", "-q", f"{unpushed[-1]}^").stdout.strip()
        changed = base and git("diff", "--name-only", base, "HEAD", "--", ".",
                               ":(exclude)reports/study").stdout.strip()
        if not base or changed:
            raise RunFailed(f"commit {commit[:8]} is not on the git remote '{git_remote}'; "
                            f"push it first (git push {git_remote} HEAD)")
        commit = base
    default = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=repo,
                             capture_output=True, text=True)
    if default.returncode != 0 or not default.stdout.strip():
        raise RunFailed("no default DVC remote: workers push each experiment's outputs to it "
                        "(dvc remote add -d NAME URL, committed in .dvc/config)")
    return url.stdout.strip(), commit


def run_on_cluster(scheduler: str, study: str, todo: list[tuple[str, list[str]]],
                   on_record: Callable[[dict[str, Any]], None], repo: Path,
                   git_remote: str, tracking_uri: str) -> list[str]:
    """Submit one task per (name, -S arguments), call ``on_record`` with each record as it
    lands; returns the names that failed."""
    from distributed import Client, as_completed

    remote_url, commit = check_ready(repo, git_remote)
    failed = []
    with Client(scheduler, timeout="30s") as client:
        workers = len(client.scheduler_info().get("workers", {}))
        print(f"study {study}: {len(todo)} run(s) to {scheduler} ({workers} worker(s) now), "
              f"commit {commit[:8]} from {remote_url}", flush=True)
        futures = {}
        for name, args in todo:
            spec = {"study": study, "name": name, "args": args, "git_remote": remote_url,
                    "commit": commit, "tracking_uri": tracking_uri}
            # The run's name is the task's key: a runner started again while the scheduler
            # still holds the task gets that task back instead of a second one.
            future = client.submit(run_one, spec, key=f"fmnist-crnn-{study}-{name}",
                                   pure=False)
            futures[future] = name
        for future in as_completed(futures):
            name = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 (one failed run does not stop the study)
                failed.append(name)
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
                continue
            on_record(record)
    return failed
