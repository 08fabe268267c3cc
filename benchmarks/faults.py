"""The fault drill: a slice study on Dask with a fault of each kind on a fixed schedule, then one
table that says whether anything was lost or done twice.

Set-up, all on loopback: PostgreSQL behind `mlflow server` (proxied artifacts), a bare git
remote and a local-folder DVC remote, `dask scheduler` and two `dask worker` processes (each in
its own process group and work folder, as on two machines), and the runner `python -m
fmnist_crnn.study run --scheduler ...` from a fresh repository whose data stages are done and
pushed. Every planned run is held after its first epoch (FMNIST_CRNN_HOLD_DIR), and the drill
acts on the runs in the order they arrive there:

1. the first: its worker's process is SIGKILLed (Dask's nanny restarts it);
2. the second: its worker's whole process group is SIGKILLed (nanny, worker and the attempt's
   guard at once) and the worker is started again; then the runner is SIGKILLed and started
   again, and the server is stopped for ``--away`` seconds (90) while the retries start;
3. the third: the server is stopped mid-training until after the run has ended and its record
   has landed; then the server is started and `python -m fmnist_crnn.tracking sync` is run in
   that run's clone;
4. the others go on at once.

The table counts, from the end state: planned runs, records, record commits, experiment refs
on the git remote, FINISHED runs, duplicate names among them, RUNNING leftovers, records whose
MLflow run is not FINISHED with one value per epoch, processes of attempts left, and failed
runs (reported by the runner). A drill passes when records = planned = FINISHED runs and every
other count is 0. A benchmark, not a test (about 10-15 minutes on 2 cores).

    PYTHONPATH=src python benchmarks/faults.py --out reports/bench/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from fmnist_crnn.environment import cpu_model
from fmnist_crnn.testing import services
from fmnist_crnn.testing.repository import head_repository, sh

REPO = Path(__file__).resolve().parents[1]
STUDY = "drill"
EXPERIMENT = "fashion-mnist-crnn"
ATTEMPT_PATTERNS = ("stages/", "exp run", "fmnist_crnn.study.attempt", "torchrun")


class Drill:
    def __init__(self, root: Path, env: dict[str, str], args: argparse.Namespace,
                 backend: str) -> None:
        self.root, self.env, self.args = root, env, args
        self.holds = root / "holds"
        self.holds.mkdir()
        self.server = services.PlainMlflowServer(root, env, backend=backend)
        self.cluster = services.DaskCluster(root)
        self.workers: dict[str, subprocess.Popen] = {}
        self.events: list[str] = []
        self.arrived: list[str] = []
        self.started = time.monotonic()
        self.head = head_repository(root, env, {"split.limit": args.limit}, data_stages=True)
        self.run_env = {**env, "MLFLOW_TRACKING_URI": self.server.url}

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.0f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.cluster.start_worker(
            {**self.run_env, "FMNIST_CRNN_HOLD_DIR": str(self.holds),
             "FMNIST_STUDY_WORKDIR": str(self.root / name)}, name)

    def start_runner(self, label: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", STUDY,
                   "--variants", *self.args.variants, "--seeds", str(self.args.seeds),
                   "--epochs", str(self.args.epochs), "--set", "train.num_threads=1",
                   "--scheduler", self.cluster.address]
        log = open(self.root / f"runner-{label}.log", "w")  # noqa: SIM115 (closed by the process)
        return subprocess.Popen(command, cwd=self.head, env=self.run_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def planned(self) -> list[str]:
        return [f"{STUDY}-{v}-s{42 + i}" for v in self.args.variants
                for i in range(self.args.seeds)]

    def worker_of(self, name: str) -> tuple[str, psutil.Process]:
        """The worker (its name and its worker process) that runs ``name``'s held stage."""
        # From the process tree, not from Dask: a worker just killed may still be listed.
        stage = psutil.Process(int((self.holds / f"at-{name}-1").read_text()))
        [attempt] = [p for p in stage.parents()
                     if "fmnist_crnn.study.attempt" in " ".join(p.cmdline())]
        worker = attempt.parent()  # `dask worker`'s worker process; its nanny leads the group
        group = os.getpgid(worker.pid)
        [label] = [n for n, proc in self.workers.items() if proc.pid == group]
        return label, worker

    def attempt_logs(self, names: set[str]) -> list[Path]:
        """The `dvc exp run` logs of the attempts of ``names``, on every worker."""
        return [log for log in self.root.glob("w*/clone-*.log")
                if log.stem.split("-", 2)[-1] in names]

    def release(self, name: str) -> None:
        (self.holds / f"hold-{name}-1").unlink()

    def record_path(self, name: str) -> Path:
        return self.head / "reports/study/runs" / STUDY / f"{name}.json"

    def run(self) -> dict:
        self.server.start()
        self.cluster.start_scheduler(self.run_env)
        for name in ("w1", "w2"):
            self.start_worker(name)
        self.cluster.wait_for_workers(2)
        names = self.planned()
        for name in names:
            (self.holds / f"hold-{name}-1").touch()
        runner = self.start_runner("1")
        self.say(f"runner started: {len(names)} runs planned, each held after epoch 1")
        arrived: list[str] = []
        deadline = time.monotonic() + self.args.limit_s
        while len(arrived) < len(names):
            if time.monotonic() > deadline:
                raise SystemExit(f"the drill did not end in {self.args.limit_s} s: "
                                 f"{self.events}")
            for name in names:
                if name not in arrived and (self.holds / f"at-{name}-1").exists():
                    arrived.append(name)
                    self.arrived = arrived
                    runner = self.act(len(arrived), name, runner)
            time.sleep(0.5)
        out = self.finish(runner)
        return self.table(out)

    def act(self, nth: int, name: str, runner: subprocess.Popen) -> subprocess.Popen:
        if nth == 1:
            label, worker = self.worker_of(name)
            worker.kill()
            self.release(name)
            self.say(f"{name} after epoch 1: SIGKILL to the worker process of {label}")
        elif nth == 2:
            label, worker = self.worker_of(name)
            os.killpg(os.getpgid(worker.pid), signal.SIGKILL)
            self.release(name)
            self.say(f"{name} after epoch 1: SIGKILL to {label}'s whole process group")
            self.start_worker(label)
            runner.kill()
            runner.wait()
            runner = self.start_runner("2")
            self.say("runner SIGKILLed and started again")
            # The outage begins once a retry of the two killed runs has started its `dvc exp
            # run` (its log appears), so that the retries create their runs while it lasts.
            killed = set(self.arrived[:2])
            # A retry's log is a new file, or the killed attempt's rewritten from the start.
            before = {log: log.stat().st_size for log in self.attempt_logs(killed)}
            while not any(log not in before or log.stat().st_size < before[log]
                          for log in self.attempt_logs(killed)):
                time.sleep(0.5)
            self.server.stop()
            self.say(f"a retry started; server stopped for {self.args.away} s while the "
                     "retries create their runs")
            time.sleep(self.args.away)
            self.server.start()
            self.say("server started again")
        elif nth == 3:
            self.server.stop()
            self.release(name)
            self.say(f"{name} after epoch 1: server stopped until after the run ends")
            while not self.record_path(name).exists():
                if runner.poll() is not None:
                    raise SystemExit(f"the runner ended before {name} was recorded")
                time.sleep(1)
            self.server.start()
            self.say(f"{name} recorded; server started again")
            log = max(self.root.glob(f"w*/clone-*-{name}.log"), key=lambda f: f.stat().st_mtime)
            clone = log.parent / log.name.split(f"-{name}")[0]
            sync = subprocess.run([sys.executable, "-m", "fmnist_crnn.tracking", "sync"],
                                  cwd=clone, env=self.run_env, capture_output=True, text=True)
            said = [line for line in sync.stdout.splitlines() if line.startswith("run ")]
            self.say(f"tracking sync in {clone.parent.name}/{clone.name}: exit "
                     f"{sync.returncode}: {'; '.join(said) or sync.stderr.strip()[-300:]}")
        else:
            self.release(name)
            self.say(f"{name} after epoch 1: goes on")
        return runner

    def finish(self, runner: subprocess.Popen) -> str:
        status = runner.wait(timeout=self.args.limit_s)
        out = (self.root / "runner-2.log").read_text() if (self.root / "runner-2.log").exists() \
            else (self.root / "runner-1.log").read_text()
        self.say(f"runner exited {status}")
        self.runner_status = status
        return out

    def table(self, runner_out: str) -> dict:
        import mlflow

        names = self.planned()
        folder = self.head / "reports/study/runs" / STUDY
        records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")
                   if p.name != "plan.json"}
        log = sh(["git", "log", "--format=%s"], self.head, self.env).splitlines()
        commits = [line for line in log if line.startswith(f"study {STUDY}: record")]
        refs = sh(["git", "ls-remote", str(self.root / "remote.git"), "refs/exps/*"], self.head,
                  self.env)
        on_remote = {line.rsplit("/", 1)[-1] for line in refs.splitlines()} & set(names)
        client = mlflow.MlflowClient(self.server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], f"tags.study = '{STUDY}'",
                                  max_results=1000) if experiment else []
        finished = [r for r in runs if r.info.status == "FINISHED"]
        finished_names = [r.data.tags.get("dvc_exp_name") for r in finished]
        incomplete = [name for name, rec in records.items()
                      if not self._complete(client, rec.get("mlflow_run_id"))]
        left = [p.pid for p in psutil.process_iter(["cmdline", "cwd"])
                if self._of_an_attempt(p)]
        waited = sum(log.read_text().count("does not answer")
                     for log in self.root.glob("w*/clone-*.log"))
        failed = sum(" failed: " in line for line in runner_out.splitlines())
        return {
            "planned runs": len(names), "records": len(records),
            "record commits": len(commits), "experiment refs on the remote": len(on_remote),
            "FINISHED runs": len(finished),
            "duplicate names": len(finished_names) - len(set(finished_names)),
            "RUNNING leftovers": sum(r.info.status == "RUNNING" for r in runs),
            "records without a complete run": len(incomplete),
            "processes left": len(left), "failed runs": failed,
            "KILLED runs (ended attempts)": sum(r.info.status == "KILLED" for r in runs),
            "stage lines waiting for the server": waited,
            "runner exit status": self.runner_status,
        }

    def _complete(self, client, run_id: str | None) -> bool:
        if not run_id:
            return False
        run = client.get_run(run_id)
        epochs = self.args.epochs
        steps = sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))
        return run.info.status == "FINISHED" and steps == list(range(1, epochs + 1))

    def _of_an_attempt(self, proc: psutil.Process) -> bool:
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
        except psutil.Error:
            return False
        return cwd.startswith(str(self.root)) and any(p in cmdline for p in ATTEMPT_PATTERNS)

    def stop(self) -> None:
        self.cluster.stop()
        self.server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["baseline", "dropout01"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=3000, help="first N training and test images")
    p.add_argument("--away", type=float, default=90.0,
                   help="seconds the server is away across run starts")
    p.add_argument("--limit-s", type=float, default=2400.0, help="give up after this long")
    p.add_argument("--out", type=Path, default=REPO / "reports/bench/faults.json")
    args = p.parse_args()
    if args.variants and len(args.variants) * args.seeds < 3:
        p.error("the schedule needs at least 3 planned runs")
    root = Path(tempfile.mkdtemp(prefix="fmnist-drill-"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key, value in (("GIT_AUTHOR_NAME", "drill"), ("GIT_AUTHOR_EMAIL", "drill@localhost"),
                       ("GIT_COMMITTER_NAME", "drill"),
                       ("GIT_COMMITTER_EMAIL", "drill@localhost")):
        env.setdefault(key, value)
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    with services.postgres() as pg:
        drill = Drill(root, env, args, services.create_database(pg, "mlflow"))
        try:
            table = drill.run()
        finally:
            drill.stop()
    ok = (table["records"] == table["planned runs"] == table["FINISHED runs"]
          == table["record commits"] == table["experiment refs on the remote"]
          and not any(table[k] for k in ("duplicate names", "RUNNING leftovers",
                                         "records without a complete run", "processes left",
                                         "failed runs", "runner exit status")))
    print("\n| count | value |\n|---|---:|")
    for key, value in table.items():
        print(f"| {key} | {value} |")
    print(f"\ndrill {'PASSED' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_model(),
                          "cores": os.cpu_count()},
              "args": {k: v if not isinstance(v, Path) else str(v) for k, v in
                       vars(args).items()},
              "events": drill.events, "table": table, "passed": ok,
              "wall_s": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
