"""Does pinning the CPU's vector ISA make runs on different CPUs bit-identical, and at what cost?

The same seeded training job (``train.fit``, the model of params.yaml, one epoch over the first
``--images`` training images, one thread) runs in fresh processes under three settings:
torch's own choice of kernels (AVX-512 where the CPU has it), ``ATEN_CPU_CAPABILITY=avx2``,
and that plus ``ONEDNN_MAX_CPU_ISA=AVX2``. Each prints a SHA-256 of the trained weights and
its seconds; settings alternate over ``--rounds``. If the pinned runs differ from the default
on an AVX-512 machine, the ISA is part of the arithmetic, and pinning is the only way two such
machines could agree (it does not make other differences, such as the BLAS library's kernel
choice by cache size, go away). Writes reports/bench/isa.json.

    python benchmarks/isa.py --split data/split
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx2+onednn-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def job(split: Path, images: int) -> None:
    import torch

    from fmnist_crnn import data, train
    from fmnist_crnn.config import load_params

    params = load_params("params.yaml")
    cfg = dataclasses.replace(params.train, epochs=1, num_threads=1)
    x, y = data.load_split(split, "train")
    vx, vy = data.load_split(split, "val")
    started = time.perf_counter()
    result = train.fit(params.model, cfg, (x[:images], y[:images]), (vx[:1000], vy[:1000]),
                       params.augment, progress=False)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for tensor in result.model.state_dict().values():
        digest.update(tensor.contiguous().numpy().tobytes())
    print(json.dumps({"sha256": digest.hexdigest(), "seconds": seconds,
                      "capability": torch.backends.cpu.get_cpu_capability(),
                      "val_acc": result.history[-1]["val_acc"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, default=Path("data/split"))
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("reports/bench/isa.json"))
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        job(args.split, args.images)
        return
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for i in range(args.rounds):
        names = list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))
        for name in names:
            env = {**os.environ, "PYTHONPATH": "src", **SETTINGS[name]}
            out = subprocess.run([sys.executable, __file__, "--job", "--split", str(args.split),
                                  "--images", str(args.images)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {i + 1} {name}: {runs[name][-1]}", flush=True)
    base = statistics.median(r["seconds"] for r in runs["default"])
    summary = {name: {"capability": r[0]["capability"], "sha256": sorted({x["sha256"] for x in r}),
                      "same_as_default": {x["sha256"] for x in r} == {
                          x["sha256"] for x in runs["default"]},
                      "median_seconds": statistics.median(x["seconds"] for x in r),
                      "time_ratio_to_default": statistics.median(x["seconds"] for x in r) / base}
               for name, r in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.images, "rounds": args.rounds,
                                    "settings": summary, "runs": runs}, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:24s} {s['capability']:8s} identical to default: {s['same_as_default']!s:5s}"
              f" time x{s['time_ratio_to_default']:.2f}")


if __name__ == "__main__":
    main()
