"""The slice study on Dask workers: 1 worker against 2 (1 thread each), and DVC's own queue
with 2 workers beside them, on this machine.

Each layout runs the same study (``--variants`` x ``--seeds``, ``--epochs`` epochs on the first
``--limit`` images) from a fresh copy of this repository with a bare git remote and a
local-folder DVC remote, as a team would: ``dask scheduler`` and ``dask worker`` processes on
loopback, each worker with its own work folder (a fresh clone, as on a new machine), the
runner `python -m fmnist_crnn.study run --scheduler ...`; then `... run --jobs 2` without a
scheduler (DVC's queue). Prints and writes (``--out``) the wall seconds of each layout, the
ratios, and per run the worker's overhead (clone/fetch, pull, push and what `dvc exp run` spent
outside training) against its training seconds. A benchmark, not a test.

    PYTHONPATH=src python benchmarks/cluster.py --out reports/bench/cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from fmnist_crnn.testing import services  # the loopback processes the tests start
from fmnist_crnn.testing.repository import head_repository, sh

REPO = Path(__file__).resolve().parents[1]



def study_args(args: argparse.Namespace, study: str) -> list[str]:
    return [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", study,
            "--variants", *args.variants, "--seeds", str(args.seeds), "--epochs",
            str(args.epochs), "--limit", str(args.limit), "--set", "train.num_threads=1"]


def on_dask(args: argparse.Namespace, head: Path, root: Path, env: dict[str, str],
            workers: int) -> tuple[float, list[dict]]:
    cluster = services.DaskCluster(root)
    study = f"dask{workers}"
    try:
        cluster.start_scheduler(env)
        for i in range(workers):
            cluster.start_worker({**env, "FMNIST_STUDY_WORKDIR": str(root / f"{study}-w{i}")},
                                 f"{study}-w{i}")
        cluster.wait_for_workers(workers)
        started = time.perf_counter()
        sh([*study_args(args, study), "--scheduler", cluster.address], head, env)
        wall = time.perf_counter() - started
    finally:
        cluster.stop()
    return wall, _records(head, study)


def on_queue(args: argparse.Namespace, head: Path, env: dict[str, str]) -> tuple[float, list]:
    started = time.perf_counter()
    sh([*study_args(args, "queue2"), "--jobs", "2", "--poll", "5"], head, env)
    return time.perf_counter() - started, _records(head, "queue2")


def _records(head: Path, study: str) -> list[dict]:
    folder = head / "reports/study/runs" / study
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
            if p.name != "plan.json"]


def overhead(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        w = r["worker"]
        outside = w["run_s"] - r["train_seconds"]
        rows.append({"name": r["name"], "worker": w["name"], "clone_s": w["clone_s"],
                     "pull_s": w["pull_s"], "push_s": w["push_s"], "run_s": w["run_s"],
                     "train_seconds": r["train_seconds"],
                     "exp_run_outside_training_s": round(outside, 2),
                     "overhead_over_training": round(
                         (w["clone_s"] + w["pull_s"] + w["push_s"] + outside)
                         / r["train_seconds"], 2)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["baseline", "dropout01"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=6000)
    p.add_argument("--out", type=Path, default=Path("reports/bench/cluster.json"))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fmnist-cluster-bench-"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_CRNN_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@localhost")
    env.pop("PYTHONPATH", None)
    try:
        head = head_repository(root, env)
        one, one_records = on_dask(args, head, root, env, 1)
        print(f"Dask, 1 worker: {one:.1f} s", flush=True)
        two, two_records = on_dask(args, head, root, env, 2)
        print(f"Dask, 2 workers: {two:.1f} s", flush=True)
        queue, _ = on_queue(args, head, env)
        print(f"DVC queue, 2 workers: {queue:.1f} s", flush=True)
    finally:
        subprocess.run(["pkill", "-f", f"{root}"], check=False)
        shutil.rmtree(root, ignore_errors=True)
    rows = overhead(one_records + two_records)
    runs = len(args.variants) * args.seeds
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python benchmarks/cluster.py",
        "study": {"variants": args.variants, "seeds": args.seeds, "epochs": args.epochs,
                  "limit": args.limit, "runs": runs},
        "wall_s": {"dask_1_worker": round(one, 1), "dask_2_workers": round(two, 1),
                   "dvc_queue_2_workers": round(queue, 1)},
        "ratio_1_worker_over_2_workers": round(one / two, 2),
        "ratio_dvc_queue_over_dask_2_workers": round(queue / two, 2),
        "median_overhead_over_training": statistics.median(
            r["overhead_over_training"] for r in rows),
        "per_run": rows,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "cpu": services_cpu(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"1 worker / 2 workers = {one / two:.2f}; DVC queue / Dask (2 workers) = "
          f"{queue / two:.2f}; median worker overhead / training = "
          f"{result['median_overhead_over_training']:.2f}")


def services_cpu() -> str:
    from fmnist_crnn.environment import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
