"""Device choice, and several training processes under torchrun: process group, shards, the
rank-0 guard.

Nothing else in the package knows about ranks. torchrun (``python -m torch.distributed.run``)
sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything here is a no-op and training is
the single process of the study. Backends: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fmnist_crnn.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only this process logs to MLflow, writes outputs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Context:
    return Context(rank=int(os.environ.get("RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def setup(ctx: Context, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each process takes the GPU of its local rank."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(order: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's part of an epoch's order, as DistributedSampler deals it: the order is padded
    (by repeating its start) to a multiple of the world size, then rank r takes every
    world_size-th index from r. The shards are disjoint and together cover every index."""
    if not ctx.enabled:
        return order
    total = -(-len(order) // ctx.world_size) * ctx.world_size
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[ctx.rank :: ctx.world_size]


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model``: gradients are averaged across processes, so
    every rank holds the same weights after every step."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def all_reduce_sum(values: list[float], device: torch.device, ctx: Context) -> list[float]:
    """Sums of ``values`` over all ranks (training loss and accuracy counts)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """The main process's ``obj``, on every process."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def torchrun(processes: int, argv: list[str]) -> int | None:
    """Run this script (``argv``) as ``processes`` processes on this machine with torchrun's
    launcher and return their exit status; None when one process is asked for, or when
    torchrun already started this one (then its settings apply, several machines included).
    """
    if processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Parsed without the script's own arguments, which torchrun's parser would try to read.
    args = parse_args(["--standalone", f"--nproc-per-node={processes}", argv[0]])
    args.training_script_args = argv[1:]
    try:
        run(args)
    except ChildFailedError as exc:
        print(f"error: a training process failed: {exc.get_first_failure()[1].message}",
              file=sys.stderr)
        return 1
    return 0


def sync_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """Give every process the main one's buffers (batch-norm running statistics, which each
    process updated from its own last batch), so all validate the same model."""
    if not ctx.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def check_same_weights(model: torch.nn.Module, ctx: Context) -> None:
    """DDP's promise, checked: every process ends with bit-identical weights."""
    if not ctx.enabled:
        return
    import hashlib

    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * ctx.world_size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {ctx.world_size} training processes ended with different "
                           f"weights: {digests}")
    if ctx.is_main:
        print(f"weights identical on all {ctx.world_size} processes ({digests[0][:12]})")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; "
                          "use 'auto' or 'cpu'")
    return torch.device(name)
