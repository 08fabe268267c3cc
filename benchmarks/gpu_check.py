"""The GPU check (run through benchmarks/gpu_check.sh, which stops first without CUDA).

Each check runs the project's own train stage (stages/train.py) as a process, in a scratch
folder with its own MLflow store, on the first ``--limit`` images of the real dataset:

1. the default model on CUDA, twice with the same seed: do the weights and every epoch's
   metrics agree bit for bit (CUDA seeding, deterministic algorithms)?
2. the accuracy recipe (`best`) for ``--epochs`` epochs with float16 AMP and its gradient
   scaler, the per-epoch validation under autocast too: finite losses, accuracy rising?
3. torchrun + nccl: with 2+ GPUs the train stage as one process per GPU (the weights must
   end identical on all); with one GPU an nccl all-reduce with one rank;
4. training images/s of the default model on CUDA against the CPU, same slice, same epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def prepare(work: Path, limit: int) -> Path:
    from fmnist_crnn import data
    from fmnist_crnn.config import DataConfig, SplitConfig

    data.fetch_raw(DataConfig(), work / "raw")
    data.make_split(work / "raw", work / "split", SplitConfig(limit=limit))
    (work / ".dvc").mkdir()  # the scratch folder is the repository: its MLflow store stays here
    return work / "split"


def train(work: Path, name: str, split: Path, overrides: dict, env: dict | None = None) -> dict:
    """The train stage with ``overrides`` on params.yaml; returns its outputs and output."""
    folder = work / name
    folder.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {"tracking.log_model": False, "tracking.registered_model_name": None,
                       **overrides}.items():
        section, field = key.split(".")
        params[section][field] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args = [sys.executable, str(REPO / "stages" / "train.py"), "--params", "params.yaml",
            "--split", str(split), "--model", "model.pt", "--checkpoint", "last.pt",
            "--metrics", "train.json", "--history", "history.csv", "--run", "run.json",
            "--environment", "environment.json", "--live", "live"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"),
                               "DVC_ROOT": str(work), **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "wall_s": wall, "error": (proc.stdout + proc.stderr)[-2000:]}
    from fmnist_crnn.history import read_history

    return {"ok": True, "wall_s": wall, "output": proc.stdout + proc.stderr,
            "history": read_history(folder / "history.csv"),
            "weights": torch.load(folder / "model.pt", weights_only=True)["state_dict"]}


def same_weights(a: dict, b: dict) -> tuple[bool, float]:
    diff = max((x.double() - b[k].double()).abs().max().item() for k, x in a.items())
    return all(torch.equal(x, b[k]) for k, x in a.items()), diff


def nccl_one_rank() -> str:
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    value = torch.ones(4, device="cuda")
    dist.all_reduce(value)
    dist.destroy_process_group()
    return f"nccl all-reduce with 1 rank: {value.tolist()}"


def images_per_second(result: dict, images: int) -> float:
    last = result["history"][-1]  # the last epoch: past CUDA's warm-up
    return images / last["epoch_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "reports" / "bench" / "gpu_check.json"))
    p.add_argument("--limit", type=int, default=12000, help="first N training and test images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda",
                   help="cpu runs every check but nccl on the CPU (the script's own test)")
    args = p.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
              "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpus": gpus,
              "torch": torch.__version__,
              "cuda": torch.version.cuda, "platform": platform.platform(),
              "limit": args.limit, "epochs": args.epochs}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        split = prepare(work, args.limit)
        from fmnist_crnn.data import load_split

        n_train = len(load_split(split, "train")[1])
        default = {"train.device": args.device, "train.epochs": args.epochs}
        a, b = (train(work, name, split, default) for name in ("cuda-a", "cuda-b"))
        if a["ok"] and b["ok"]:
            identical, diff = same_weights(a["weights"], b["weights"])
            same_history = [{k: v for k, v in r.items() if k != "epoch_seconds"}
                            for r in a["history"]] == [
                            {k: v for k, v in r.items() if k != "epoch_seconds"}
                            for r in b["history"]]
            report["default_twice"] = {"weights_identical": identical, "max_abs_diff": diff,
                                       "metrics_identical": same_history,
                                       "val_acc": [r["val_acc"] for r in a["history"]]}
        else:
            failed.append("default_twice")
            report["default_twice"] = {"error": (a if not a["ok"] else b)["error"]}

        from fmnist_crnn.study.catalog import RECIPES

        recipe = {**RECIPES["best"], "train.device": args.device, "train.epochs": args.epochs,
                  "train.warmup_epochs": round(0.2 * args.epochs, 3)}
        amp = train(work, "recipe-amp", split, recipe)
        report["recipe_amp"] = ({"val_acc": [r["val_acc"] for r in amp["history"]],
                                 "train_loss": [r["train_loss"] for r in amp["history"]],
                                 "epoch_seconds": [r["epoch_seconds"] for r in amp["history"]]}
                                if amp["ok"] else {"error": amp["error"]})
        if not amp["ok"]:
            failed.append("recipe_amp")

        if args.device != "cuda":
            report["nccl"] = {"skipped": f"device {args.device}"}
        elif gpus >= 2:
            ddp = train(work, "ddp", split, {**default, "train.processes": gpus})
            ok = ddp["ok"] and f"weights identical on all {gpus} processes" in ddp["output"]
            report["nccl"] = {"processes": gpus, "weights_identical_on_all": ok,
                              **({} if ddp["ok"] else {"error": ddp["error"]})}
            if not ok:
                failed.append("nccl")
        else:
            try:
                report["nccl"] = {"processes": 1, "check": nccl_one_rank(),
                                  "note": "one GPU: the pipeline's DDP across GPUs needs 2+"}
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                report["nccl"] = {"error": repr(exc)}
                failed.append("nccl")

        # On --device cpu the default run already is the CPU's rate: not trained again.
        cpu = a if args.device == "cpu" else train(work, "cpu", split, {"train.device": "cpu",
                                                                         "train.epochs": 1})
        if cpu["ok"] and a["ok"]:
            gpu_rate, cpu_rate = images_per_second(a, n_train), images_per_second(cpu, n_train)
            report["images_per_s"] = {args.device: gpu_rate, "cpu": cpu_rate,
                                      "ratio": gpu_rate / cpu_rate,
                                      "cpu_threads": torch.get_num_threads()}
        else:
            failed.append("images_per_s")
    report["failed"] = failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))
    print(f"wrote {args.out}; failed checks: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
