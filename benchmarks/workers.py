"""How to spend two cores on a study: 2 queue workers x 1 thread, or 1 worker x 2 threads?

The same training job (``train.fit`` on the model of params.yaml, one epoch over the first
``--images`` images of the split, in a fresh process like a queued experiment) runs twice per
layout: (a) two processes at once with ``train.num_threads=1`` each; (b) one after the other
with 2 threads each; (c) two processes at once with 2 threads each, what torch's default of a
thread per core gives two trainings side by side (tests/conftest.py sets one thread per test
process for this reason). Layouts rotate over ``--rounds`` so that machine noise hits all.
Prints the wall seconds of each layout and the ratios b/a (above 1: two workers finish
sooner) and c/a, and writes them to JSON. A benchmark, not a test: numbers depend on the
machine and its load.

    python benchmarks/workers.py --split data/split --out reports/bench/workers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def job(split: Path, threads: int, images: int) -> None:
    from fmnist_crnn import data, train
    from fmnist_crnn.config import load_params

    params = load_params("params.yaml")
    cfg = dataclasses.replace(params.train, epochs=1, num_threads=threads)
    x, y = data.load_split(split, "train")
    vx, vy = data.load_split(split, "val")
    train.fit(params.model, cfg, (x[:images], y[:images]), (vx[:2000], vy[:2000]),
              params.augment, progress=False)


def layout(split: Path, threads: int, parallel: bool, images: int) -> float:
    cmd = [sys.executable, __file__, "--job", "--split", str(split), "--threads", str(threads),
           "--images", str(images)]
    env = {**os.environ, "PYTHONPATH": "src"}
    started = time.perf_counter()
    if parallel:
        procs = [subprocess.Popen(cmd, env=env) for _ in range(2)]
        codes = [p.wait() for p in procs]
    else:
        codes = [subprocess.run(cmd, env=env).returncode for _ in range(2)]
    if any(codes):
        raise SystemExit(f"a job failed: {codes}")
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, default=Path("data/split"))
    p.add_argument("--images", type=int, default=21000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("reports/bench/workers.json"))
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        job(args.split, args.threads, args.images)
        return
    layouts = {"a": ("2 workers x 1 thread", 1, True), "b": ("1 worker x 2 threads", 2, False),
               "c": ("2 workers x 2 threads", 2, True)}
    seconds: dict[str, list[float]] = {key: [] for key in layouts}
    for i in range(args.rounds):
        order = list(layouts)[i % 3:] + list(layouts)[:i % 3]
        for key in order:
            label, threads, parallel = layouts[key]
            seconds[key].append(layout(args.split, threads, parallel, args.images))
            print(f"round {i + 1}: {label}: {seconds[key][-1]:.1f} s", flush=True)
    a, b, c = (statistics.median(seconds[key]) for key in layouts)
    result = {
        "jobs_per_layout": 2, "images_per_job": args.images, "rounds": args.rounds,
        "seconds_2_workers_x_1_thread": seconds["a"], "seconds_1_worker_x_2_threads": seconds["b"],
        "seconds_2_workers_x_2_threads": seconds["c"],
        "median_2x1": a, "median_1x2": b, "median_2x2": c, "ratio_1x2_over_2x1": b / a,
        "ratio_2x2_over_2x1": c / a, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median wall for two jobs: 2x1 {a:.1f} s, 1x2 {b:.1f} s, 2x2 {c:.1f} s; ratio "
          f"1x2/2x1 = {b / a:.2f} ({'two workers' if b > a else 'one worker'} finish sooner), "
          f"2x2/2x1 = {c / a:.2f}")


if __name__ == "__main__":
    main()
