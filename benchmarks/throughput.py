"""Training and inference throughput: the pipeline's data path and loop against the study's.

In one process, on the same model and batch size, alternating the two so that machine noise
hits both alike:

(a) the pipeline: ``train.fit`` for one epoch over a slice of the in-memory uint8 split
    (``data.batches`` + the loop of the train stage, with the params' augmentation and knobs);
(b) the study's way: ``torchvision.datasets.FashionMNIST`` + ``ToTensor``/``Normalize`` +
    ``DataLoader(batch_size, shuffle=True)`` feeding a plain Adam step on the same CRNN.

Prints images/s of each, their ratio a/b, inference images/s at batch 1000 and single-image
latency, and writes them to JSON. A benchmark, not a test: numbers depend on the machine.

    python benchmarks/throughput.py                      # the model of params.yaml
    python benchmarks/throughput.py -S train.batch_size=128 -S model.hidden_dim=256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from fmnist_crnn import data, train
from fmnist_crnn.config import ConfigError, load_params, parse_overrides, to_dict, with_overrides
from fmnist_crnn.distributed import select_device
from fmnist_crnn.model import CRNN, count_parameters


def study_loader(raw_dir: Path, root: Path, batch_size: int, count: int) -> DataLoader:
    """The study's input pipeline over the same raw files (linked, not copied)."""
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for f in data.RAW_FILES:
        link = folder / f.name
        if not link.exists():
            link.symlink_to((raw_dir / f.name).resolve())
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.2860,), (0.3530,))])
    dataset = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=True)


def study_epoch(model: CRNN, optimizer: torch.optim.Optimizer, loader: DataLoader,
                device: torch.device) -> float:
    """One epoch of the study's loop; returns images/s."""
    model.train()
    seen = 0
    started = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - started)


def pipeline_epoch(params, train_data, val_data) -> float:
    """One epoch of the train stage's own loop (train.fit); returns images/s."""
    result = train.fit(params.model, params.train, train_data, val_data, params.augment,
                       progress=False)
    return len(train_data[1]) / result.history[0]["epoch_seconds"]


@torch.no_grad()
def inference(model: CRNN, images: torch.Tensor, device: torch.device,
              latency_calls: int) -> dict[str, float]:
    model.eval()
    x = data.to_float(images[:1000]).to(device)
    model(x)  # warm-up
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(len(x) / (time.perf_counter() - started))
    one = x[:1]
    latencies = []
    for _ in range(latency_calls):
        started = time.perf_counter()
        model(one)
        if device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append((time.perf_counter() - started) * 1000)
    return {"batch1000_images_per_s": statistics.median(runs),
            "single_image_latency_ms_median": statistics.median(latencies),
            "single_image_latency_ms_p90": statistics.quantiles(latencies, n=10)[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a parameter, as dvc exp run -S")
    parser.add_argument("--split", default="data/split", help="the split stage's output")
    parser.add_argument("--raw", default="data/raw", help="the download stage's output")
    parser.add_argument("--images", type=int, default=6400,
                        help="training images per measured epoch (each side)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of (a) and (b)")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--out", default="reports/bench/throughput.json")
    args = parser.parse_args(argv)

    try:
        params = with_overrides(load_params(args.params),
                                {**parse_overrides(args.overrides), "train.epochs": 1})
    except ConfigError as exc:
        parser.error(str(exc))
    device = select_device(params.train.device)
    images, labels = data.load_split(Path(args.split), "train")
    train_data = (images[: args.images], labels[: args.images])
    val_data = (images[:64], labels[:64])  # fit validates each epoch: keep it negligible

    model = CRNN(params.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    pipeline, study = [], []
    with tempfile.TemporaryDirectory() as tmp:
        loader = study_loader(Path(args.raw), Path(tmp), params.train.batch_size, args.images)
        study_epoch(model, optimizer, loader, device)  # warm-up (allocator, kernels)
        for i in range(args.rounds):
            pipeline.append(pipeline_epoch(params, train_data, val_data))
            study.append(study_epoch(model, optimizer, loader, device))
            print(f"round {i + 1}: pipeline {pipeline[-1]:.0f} images/s, "
                  f"study loop {study[-1]:.0f} images/s", flush=True)
    a, b = statistics.median(pipeline), statistics.median(study)
    test_images, _ = data.load_split(Path(args.split), "test")
    infer = inference(model, test_images, device, args.latency_calls)
    result = {
        "training_images_per_s": {"pipeline": a, "study_loop": b, "ratio": a / b,
                                  "pipeline_rounds": pipeline, "study_loop_rounds": study},
        "inference": infer,
        "setup": {
            "batch_size": params.train.batch_size, "images_per_epoch": args.images,
            "rounds": args.rounds, "parameters": count_parameters(model),
            "overrides": args.overrides, "augment": to_dict(params)["augment"],
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"training: pipeline {a:.0f} images/s, study loop {b:.0f} images/s, "
          f"ratio {a / b:.2f}x")
    print(f"inference: {infer['batch1000_images_per_s']:.0f} images/s at batch 1000, "
          f"single image {infer['single_image_latency_ms_median']:.2f} ms (median)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
