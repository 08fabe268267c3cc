"""Multi-process training on this machine: 2 processes x 1 thread (torchrun +
DistributedDataParallel, gloo) against 1 process x 2 threads, on the same images.

Each layout trains the model of params.yaml (or of ``--recipe``, with ``-S`` overrides) for
one epoch over the first ``--images`` training images (under DDP each process takes half,
batch_size images per step each; ``--global-batch`` halves it instead, so both layouts step
on the same number of images), in fresh processes, alternating over ``--rounds``. Prints
images/s and seconds per epoch of each and the ratio; writes reports/bench/ddp.json (or
``--out``). A benchmark, not a test.

    python benchmarks/ddp.py --split data/split
    python benchmarks/ddp.py --recipe best-60k-nodrop-30ep --global-batch \
        --out reports/bench/ddp-best-60k-nodrop-30ep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def job(split: Path, images: int, threads: int, result_file: Path, params: Any,
        global_batch: bool) -> None:
    from fmnist_crnn import data, distributed, train

    ctx = distributed.from_env()
    batch = params.train.batch_size // ctx.world_size if global_batch else params.train.batch_size
    share = params.train.warmup_epochs / params.train.epochs  # one epoch, the same schedule
    cfg = dataclasses.replace(params.train, epochs=1, warmup_epochs=share, num_threads=threads,
                              batch_size=batch)
    x, y = data.load_split(split, "train")
    vx, vy = data.load_split(split, "val")
    result = train.fit(params.model, cfg, (x[:images], y[:images]), (vx[:1000], vy[:1000]),
                       params.augment, progress=False, ctx=ctx)
    if ctx.is_main:  # training seconds of the epoch, validation of 1,000 images included
        result_file.write_text(json.dumps({"seconds": result.history[-1]["epoch_seconds"]}))
    distributed.teardown(ctx)


def layout(split: Path, images: int, processes: int, extra: list[str]) -> float:
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    out = Path(name)
    cmd = [sys.executable, __file__, "--job", "--split", str(split), "--images", str(images),
           "--threads", "1" if processes > 1 else "2", "--result", str(out), "--processes",
           str(processes), *extra]
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": "src"}, check=True)
    seconds = json.loads(out.read_text())["seconds"]
    out.unlink()
    return seconds


def main() -> None:
    from fmnist_crnn.config import ConfigError, load_params, parse_overrides, with_overrides
    from fmnist_crnn.study import catalog

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, default=Path("data/split"))
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("reports/bench/ddp.json"))
    p.add_argument("--recipe", choices=list(catalog.RECIPES),
                   help="train a recipe of the accuracy study instead")
    p.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, as dvc exp run -S")
    p.add_argument("--global-batch", action="store_true",
                   help="under DDP each process steps on batch_size / 2 images")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:  # a bad key fails here, before any job starts
        params = with_overrides(load_params("params.yaml"),
                                {**(catalog.RECIPES[args.recipe] if args.recipe else {}),
                                 **parse_overrides(args.overrides)})
    except ConfigError as exc:
        p.error(str(exc))
    if args.job:
        from fmnist_crnn import distributed

        status = distributed.torchrun(args.processes, sys.argv)
        if status is None:
            job(args.split, args.images, args.threads, args.result, params, args.global_batch)
        else:
            sys.exit(status)
        return
    extra = [f"-S{item}" for item in args.overrides]  # what each layout's job trains
    extra += [f"--recipe={args.recipe}"] if args.recipe else []
    extra += ["--global-batch"] if args.global_batch else []
    ddp, single = [], []
    for i in range(args.rounds):
        for processes in ((2, 1) if i % 2 == 0 else (1, 2)):
            seconds = layout(args.split, args.images, processes, extra)
            (ddp if processes == 2 else single).append(seconds)
            print(f"round {i + 1}: {processes} process(es): {seconds:.1f} s, "
                  f"{args.images / seconds:.0f} images/s", flush=True)
    a, b = statistics.median(ddp), statistics.median(single)
    result = {"recipe": args.recipe, "overrides": args.overrides,
              "global_batch": args.global_batch,
              "images_per_epoch": args.images, "rounds": args.rounds,
              "seconds_2_processes_x_1_thread": ddp, "seconds_1_process_x_2_threads": single,
              "images_per_s_2x1": args.images / a, "images_per_s_1x2": args.images / b,
              "speedup_2x1_over_1x2": b / a}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"epoch of {args.images} images: 2x1 {a:.1f} s ({args.images / a:.0f} img/s), "
          f"1x2 {b:.1f} s ({args.images / b:.0f} img/s); 2x1 is {b / a:.2f}x as fast")


if __name__ == "__main__":
    main()
