"""What validating in bfloat16 saves and changes: a trained model's validation split in
float32 (the train stage's per-epoch validation by default, ``train.amp`` or not) against the
bfloat16 autocast of ``train.amp``'s training steps (``train.amp_validation``).

Calls ``train.validate`` (the per-epoch validation of the train stage) in both precisions,
alternating over a few rounds so that both see the same machine load, and prints seconds and
correct predictions of each. A benchmark, not a test: read the seconds within one
run; the correct counts are deterministic on one machine.

    PYTHONPATH=src python benchmarks/validation_precision.py --model models/model.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fmnist_crnn import data, train
from fmnist_crnn.distributed import select_device
from fmnist_crnn.environment import cpu_model
from fmnist_crnn.model import load_model

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.pt", help="a trained model.pt")
    parser.add_argument("--split", default="data/split", help="the split stage's output")
    parser.add_argument("--batch-size", type=int, default=128, help="the recipe's batch size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="the recipe trains channels-last (train.channels_last)")
    parser.add_argument("--out", default="reports/bench/precision/validation.json")
    args = parser.parse_args(argv)

    device = select_device("cpu")
    model = load_model(args.model, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    val_data = data.load_split(Path(args.split), "val")
    if not len(val_data[1]):
        raise SystemExit(f"{args.split}/val.pt is empty (split.val_fraction 0): nothing to time")
    rounds = []
    for number in range(1, args.rounds + 1):
        for name, dtype in PRECISIONS.items():
            started = time.perf_counter()
            loss, acc = train.validate(model, val_data, args.batch_size, device, dtype)
            seconds = time.perf_counter() - started
            correct = round(acc * len(val_data[1]))
            rounds.append({"round": number, "precision": name, "seconds": seconds,
                           "correct": correct, "accuracy": acc, "loss": loss})
            print(f"round {number} {name:>8}: {seconds:6.2f} s, {correct} of "
                  f"{len(val_data[1])} correct ({acc:.4%}), loss {loss:.4f}", flush=True)
    result = {"model": args.model, "images": len(val_data[1]), "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "cpu": cpu_model(), "rounds": rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
