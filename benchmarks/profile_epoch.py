"""Where an epoch's time goes, part by part, in the train stage's own loop.

Runs ``train.train_one_epoch`` (the loop the train stage runs) on a slice of the split and
``train.validate`` on a slice of the validation split. Hooks time each part without changing
the loop: the forward of the convolution blocks, the recurrent layer and the head (module
hooks), their backward (gradient hooks at the boundaries between them: the CPU autograd
engine runs the backward in order, head first), augmentation, the optimizer step (optimizer
hooks); the rest of the wall time is loss, batching, EMA, clipping and bookkeeping. A second,
shorter pass under ``torch.profiler`` lists the operators that take the most time.

Seconds are scaled to a full epoch (the split's training and validation sizes). A benchmark,
not a test: the numbers depend on the machine and its load; read the shares within one run.

    python benchmarks/profile_epoch.py                  # the model of params.yaml
    python benchmarks/profile_epoch.py --recipe best    # the accuracy recipe
    python benchmarks/profile_epoch.py -S model.hidden_dim=256 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fmnist_crnn import data, distributed, train
from fmnist_crnn.config import ConfigError, load_params, parse_overrides, with_overrides
from fmnist_crnn.distributed import select_device
from fmnist_crnn.model import CRNN, count_parameters
from fmnist_crnn.study import catalog

PARTS = {"blocks": "convolution blocks", "lstm": "recurrent layer", "head": "head"}


class Clock:
    """Seconds per part, summed over the batches, from hooks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.started: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    def start(self, name: str) -> None:
        self.started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self.started.pop(name)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def end_backward(self) -> None:
        """At the optimizer step: split the backward at the marks the gradient hooks left."""
        m, self.marks = self.marks, {}
        if {"head_out", "head_in", "lstm_in", "blocks_done"} <= set(m):
            self.seconds["backward/head"] += m["head_in"] - m["head_out"]
            self.seconds["backward/lstm"] += m["lstm_in"] - m["head_in"]
            self.seconds["backward/blocks"] += m["blocks_done"] - m["lstm_in"]

    def hook_forward(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(f"forward/{name}"))
        module.register_forward_hook(lambda *_: self.stop(f"forward/{name}"))

    def hook_model(self, model: torch.nn.Module) -> None:
        for block in model.blocks:  # a ModuleList is never called itself: hook each block
            self.hook_forward(block, "blocks")
        self.hook_forward(model.lstm, "lstm")
        self.hook_forward(model.head, "head")

        def on_grad(tensor: torch.Tensor, name: str) -> None:
            if tensor.requires_grad:
                tensor.register_hook(lambda grad: self.mark(name))

        model.head.register_forward_hook(lambda m, inp, out: on_grad(out, "head_out"))
        model.head.register_forward_pre_hook(lambda m, inp: on_grad(inp[0], "head_in"))
        model.lstm.register_forward_pre_hook(lambda m, inp: on_grad(inp[0], "lstm_in"))
        # The first block's gradients are the last the backward computes.
        for param in model.blocks[0].parameters():
            param.register_post_accumulate_grad_hook(lambda p: self.mark("blocks_done"))

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        def pre(*_: object) -> None:
            self.end_backward()
            self.start("optimizer step")

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(lambda *_: self.stop("optimizer step"))


@contextlib.contextmanager
def timed_augmentation(clock: Clock) -> Iterator[None]:
    original = data.augment_batch

    def augment(*args, **kwargs):
        clock.start("augmentation")
        try:
            return original(*args, **kwargs)
        finally:
            clock.stop("augmentation")

    data.augment_batch = augment
    try:
        yield
    finally:
        data.augment_batch = original


def one_epoch(params, train_data, val_data, clock: Clock | None = None) -> dict[str, float]:
    """One timed epoch of the train stage's loop, then validation; seconds per part."""
    device = select_device(params.train.device)
    memory_format = torch.channels_last if params.train.channels_last else torch.contiguous_format
    steps = data.num_batches(len(train_data[1]), params.train.batch_size)
    state = train.new_state(params.model, params.train, steps, device, memory_format,
                            train_data[0])
    if clock is not None:
        clock.hook_model(state.model)
        clock.hook_optimizer(state.optimizer)
    clock = clock or Clock()
    batches = list(data.batches(*train_data, params.train.batch_size, state.generator))
    with timed_augmentation(clock):
        started = time.perf_counter()
        train.train_one_epoch(state, state.model, params.train, params.augment, batches,
                              device, memory_format, distributed.Context())
        clock.seconds["wall/training"] = time.perf_counter() - started
    seconds = dict(clock.seconds)  # before validation runs the hooked forward again
    started = time.perf_counter()
    train.validate(state.evaluated, val_data, params.train.batch_size, device)
    seconds["wall/validation"] = time.perf_counter() - started
    return seconds


def top_operators(params, train_data, val_data, count: int = 12) -> list[dict]:
    """The operators with the most self CPU time in a short profiled epoch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_epoch(params, train_data, val_data)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"operator": e.key, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total, "calls": e.count}
            for e in events[:count]]


def table(seconds: dict[str, float], train_images: int, val_images: int,
          full_train: int, full_val: int) -> list[dict]:
    """Per-part seconds scaled to a full epoch, with shares of it."""
    scale_train, scale_val = full_train / train_images, full_val / val_images
    rows = []
    for name, label in PARTS.items():
        rows.append({"part": f"{label}: forward", "s": seconds.get(f"forward/{name}", 0.0)})
        rows.append({"part": f"{label}: backward", "s": seconds.get(f"backward/{name}", 0.0)})
    rows.append({"part": "augmentation", "s": seconds.get("augmentation", 0.0)})
    rows.append({"part": "optimizer step", "s": seconds.get("optimizer step", 0.0)})
    for row in rows:
        row["s"] *= scale_train
    measured = sum(r["s"] for r in rows)
    rows.append({"part": "rest of the training loop",
                 "s": max(seconds["wall/training"] * scale_train - measured, 0.0)})
    rows.append({"part": "validation", "s": seconds["wall/validation"] * scale_val})
    epoch = sum(r["s"] for r in rows)
    for row in rows:
        row["share"] = row["s"] / epoch
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", choices=list(catalog.RECIPES),
                        help="profile a recipe of the accuracy study instead")
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a parameter, as dvc exp run -S")
    parser.add_argument("--split", default="data/split", help="the split stage's output")
    parser.add_argument("--images", type=int, default=4096, help="training images profiled")
    parser.add_argument("--val-images", type=int, default=2048, help="validation images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", help="JSON file (default reports/bench/profile-<name>.json)")
    args = parser.parse_args(argv)

    overrides = dict(catalog.RECIPES[args.recipe]) if args.recipe else {}
    overrides.pop("train.epochs", None)  # one profiled epoch; the schedule's length is moot
    try:
        overrides.update(parse_overrides(args.overrides))
        params = with_overrides(load_params(args.params), overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    images, labels = data.load_split(Path(args.split), "train")
    val_images, val_labels = data.load_split(Path(args.split), "val")
    train_data = (images[: args.images], labels[: args.images])
    val_data = (val_images[: args.val_images], val_labels[: args.val_images])
    if args.threads:
        torch.set_num_threads(args.threads)
    # Warm-up (allocator, oneDNN kernels), the timed pass, then a short profiled pass.
    small = (train_data[0][:512], train_data[1][:512])
    one_epoch(params, small, (val_data[0][:256], val_data[1][:256]))
    seconds = one_epoch(params, train_data, val_data, Clock())
    operators = top_operators(params, small, (val_data[0][:256], val_data[1][:256]))
    rows = table(seconds, len(train_data[1]), len(val_data[1]), len(labels), len(val_labels))
    name = args.recipe or "default"
    result = {
        "name": name, "overrides": overrides, "rows": rows,
        "epoch_seconds_estimate": sum(r["s"] for r in rows),
        "raw_seconds": seconds, "top_operators": operators,
        "setup": {"train_images_profiled": len(train_data[1]),
                  "val_images_profiled": len(val_data[1]),
                  "full_train_images": len(labels), "full_val_images": len(val_labels),
                  "parameters": count_parameters(CRNN(params.model)),
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "torch": torch.__version__, "python": platform.python_version(),
                  "machine": platform.machine()},
    }
    out = Path(args.out or f"reports/bench/profile-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: estimated epoch {result['epoch_seconds_estimate']:.0f} s "
          f"({torch.get_num_threads()} threads)")
    for row in rows:
        print(f"  {row['part']:38s} {row['s']:7.1f} s  {row['share']:6.1%}")
    print("operators with the most self CPU time (short profiled pass):")
    for op in operators:
        print(f"  {op['operator']:38s} {op['share']:6.1%}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
