"""Training: the loop, the optimizer, per-epoch checkpoints for resuming, best weights.

The loop only: the train stage's bookkeeping (the tracked run, outputs, resume of a stage)
is in fmnist_crnn.runs.training."""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from fmnist_crnn import data, distributed
from fmnist_crnn.config import (
    AugmentConfig,
    ModelConfig,
    TrainConfig,
)
from fmnist_crnn.distributed import select_device
from fmnist_crnn.errors import TrainingError
from fmnist_crnn.evaluate import (
    accuracy,
    predict_logits,
)
from fmnist_crnn.files import atomic_torch_save, atomic_write_bytes
from fmnist_crnn.model import CRNN

Dataset = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, 28, 28), int64 labels (N,)


@dataclass
class FitResult:
    model: CRNN  # holding the best-validation weights
    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float
    resumed_from_epoch: int = 0
    device: str = "cpu"
    # With an EMA of the weights: the trained (not averaged) weights after the last epoch.
    last_raw: CRNN | None = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels.

    On CPU this makes runs bit-identical. On CUDA some kernels (the LSTM's among them) have no
    deterministic variant; torch then warns instead of failing (warn_only).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = parameter_groups(model, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """The model's parameters, one group; with ``train.norm_bias_lr_scale`` other than 1, the
    BatchNorm biases in a second group at that multiple of lr and weight decay divided by it."""
    if cfg.norm_bias_lr_scale == 1:
        return model.parameters()
    norm_biases = [m.bias for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None]
    chosen = {id(p) for p in norm_biases}
    scale = cfg.norm_bias_lr_scale
    return [{"params": [p for p in model.parameters() if id(p) not in chosen]},
            {"params": norm_biases, "lr": cfg.lr * scale,
             "weight_decay": cfg.weight_decay / scale}]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule, stepped after every batch; None keeps lr constant."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # Each group peaks at its own lr (the BatchNorm biases' group at its multiple).
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total, pct_start=cfg.warmup_epochs / cfg.epochs)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "none" and warmup == 0:
        return None
    start = 1 / 25  # OneCycleLR's default div_factor: warmup starts at lr/25

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_with_warmup(decay: float) -> Callable[[list, list, Any], None]:
    """AveragedModel's update with the usual warmup: the decay used at update n is
    min(decay, (1 + n) / (10 + n)), so the average does not drag the random initial weights
    through the first epochs (with 0.999 they would still weigh half after 700 steps)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # batch-norm's step counters
            torch._foreach_copy_(averaged, current)
            return
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


WHITENING_IMAGES = 5000  # airbench's sample for the patch covariance
WHITENING_EPS = 5e-4


def whitening_filters(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """airbench's patch whitening for images (N, C, H, W) as the model sees them: the
    eigenvectors of the covariance of their kernel x kernel patches, largest eigenvalue first,
    each divided by sqrt(eigenvalue + eps), each followed by its negative:
    (2 * C * kernel * kernel, C, kernel, kernel)."""
    c = images.shape[1]
    patches = F.unfold(images, kernel).transpose(1, 2).reshape(-1, c * kernel * kernel)
    cov = (patches.T.double() @ patches.double()) / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    filters = eigenvectors.flip(1).T / torch.sqrt(eigenvalues.flip(0) + WHITENING_EPS)[:, None]
    pairs = torch.stack([filters, -filters], dim=1).reshape(-1, c, kernel, kernel)
    return pairs.float()


@torch.no_grad()
def whiten_first_conv(model: CRNN, images: torch.Tensor) -> None:
    """Set the first conv block's first filters to ``whitening_filters`` of ``images`` (uint8
    (N, H, W), the first WHITENING_IMAGES used), normalised as the model's forward does; as
    many as it has channels, the rest keep their random initialisation."""
    conv = model.blocks[0][0]
    x = model.normalise(data.to_float(images[:WHITENING_IMAGES]).to(conv.weight.device))
    filters = whitening_filters(x, conv.kernel_size[0])[: conv.out_channels]
    conv.weight[: len(filters)] = filters.to(conv.weight.device, conv.weight.dtype)


@torch.no_grad()
def identity_init(model: CRNN) -> None:
    """airbench's identity initialisation: in every conv block, the first min(in, out)
    filters pass their own input channel through unchanged (``torch.nn.init.dirac_``)."""
    for block in model.blocks:
        weight = block[0].weight
        torch.nn.init.dirac_(weight[: weight.shape[1]])


class Lookahead:
    """airbench's lookahead (``train.lookahead_steps``): a slow copy of the parameters; every
    ``every`` optimizer steps it moves toward the weights, slow += (1 - rho)(fast - slow), and
    the weights are set to it. rho = 0.95^every * (step / total)^3 grows from 0 (the slow copy
    follows the weights, nothing changes early) to 0.95^every at the end of training. The
    BatchNorm statistics are not parameters and are left alone."""

    def __init__(self, model: torch.nn.Module, every: int, total_steps: int) -> None:
        self.slow = [p.detach().clone() for p in model.parameters()]
        self.every, self.total_steps, self.step = every, total_steps, 0

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module) -> None:
        self.step += 1
        if self.step % self.every:
            return
        rho = 0.95 ** self.every * (self.step / self.total_steps) ** 3
        fast = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.slow, fast, 1 - rho)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.slow, state["slow"])
        self.step = state["step"]


@dataclass
class TrainState:
    """Everything training carries from one epoch to the next, and so everything a checkpoint
    holds: one type with ``state_dict()`` / ``load_state_dict()``, so that what is saved and
    what is restored cannot drift apart."""

    model: CRNN
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: AveragedModel | None
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    lookahead: Lookahead | None = None
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_val_acc: float = -1.0
    best_epoch: int = 0

    @property
    def evaluated(self) -> torch.nn.Module:
        """What validation sees and what is kept: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def end_epoch(self, record: dict[str, float]) -> None:
        self.epoch = int(record["epoch"])
        self.history.append(record)
        # Without a validation split (split.val_fraction 0) the last epoch is kept.
        val_acc = record.get("val_acc")
        if val_acc is None or val_acc > self.best_val_acc:
            self.best_epoch = self.epoch
            self.best_val_acc = self.best_val_acc if val_acc is None else val_acc
            self.best_state = copy.deepcopy(self.evaluated.state_dict())

    def state_dict(self) -> dict[str, Any]:
        cuda = next(self.model.parameters()).is_cuda
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "history": self.history,
            "best_state": self.best_state,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.best_state = state["best_state"]
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]


def new_state(model_cfg: ModelConfig, cfg: TrainConfig, steps_per_epoch: int,
              device: torch.device, memory_format: torch.memory_format,
              train_images: torch.Tensor | None = None) -> TrainState:
    """A fresh model and optimizer (in this order: they draw from the seeded RNG).
    ``train_images`` (uint8) whiten the first convolution with ``train.whiten_first_conv``."""
    model = CRNN(model_cfg).to(device, memory_format=memory_format)
    if cfg.identity_init:
        identity_init(model)
    if cfg.whiten_first_conv:
        if train_images is None:
            raise ValueError("train.whiten_first_conv needs the training images")
        whiten_first_conv(model, train_images)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    # The average's batch-norm statistics are averaged too (use_buffers).
    ema = (AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay else None)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    generator = torch.Generator().manual_seed(cfg.seed)
    lookahead = (Lookahead(model, cfg.lookahead_steps, cfg.epochs * steps_per_epoch)
                 if cfg.lookahead_steps else None)
    return TrainState(model, optimizer, scheduler, ema, scaler, generator, lookahead,
                      best_state=copy.deepcopy(model.state_dict()))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """What ``train.amp`` computes the forward pass in: float16 on CUDA (with a GradScaler),
    bfloat16 on the CPU (float32's exponent range, so no scaler; 0.6-0.8x the epoch time of
    float32 on a CPU with AVX-512 BF16, docs/accuracy.md). Weights and optimizer stay
    float32; the per-epoch validation too unless ``train.amp_validation``."""
    if not cfg.amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def train_one_epoch(state: TrainState, trained: torch.nn.Module, cfg: TrainConfig,
                    augment: AugmentConfig | None,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device, memory_format: torch.memory_format,
                    ctx: distributed.Context) -> tuple[float, float]:
    """One pass over this process's batches; returns the (all-process) loss and accuracy."""
    amp_dtype = autocast_dtype(cfg, device)
    state.model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (x, y) in enumerate(batches):
        mix = None
        if augment is not None:
            x = data.augment_batch(x, augment, state.generator)
            if augment.cutmix:
                x, mix = data.cutmix(x, augment.cutmix, state.generator)
            elif augment.mixup:
                x, mix = data.mixup(x, augment.mixup, state.generator)
        x = x.to(device, memory_format=memory_format, non_blocking=True)
        y = y.to(device, non_blocking=True)
        state.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = trained(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if mix is not None:  # each label weighed by its share of the image
                partners, own = mix
                loss = own * loss + (1 - own) * F.cross_entropy(
                    logits, y[partners.to(device)], label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {state.epoch + 1}, batch {step + 1}; "
                f"training stopped. The last good state (epoch {state.epoch}) is kept in the "
                f"checkpoint. Lower train.lr (now {cfg.lr}) and run again.")
        state.scaler.scale(loss).backward()
        if cfg.grad_clip_norm is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip_norm)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if state.scheduler is not None:
            state.scheduler.step()
        if state.lookahead is not None:
            state.lookahead.after_step(state.model)
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if step % 20 == 0 and hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device, ctx)
    distributed.sync_buffers(state.model, ctx)
    return loss_sum / seen, correct / seen


def validate(model: torch.nn.Module, val_data: Dataset, batch_size: int,
             device: torch.device, amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on the whole validation split, the forward passes in
    ``amp_dtype`` under autocast when given (the logits are float32 either way)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = predict_logits(model, val_data[0], batch_size, device)
    return F.cross_entropy(logits, val_data[1]).item(), accuracy(logits, val_data[1])


def fit(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_data: Dataset,
    val_data: Dataset,
    augment: AugmentConfig | None = None,
    *,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    fingerprint: str = "",
    run_id: str | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    ctx: distributed.Context | None = None,
) -> FitResult:
    """Train for ``cfg.epochs`` epochs, keeping the best-validation weights.

    After every epoch the full state (``TrainState`` plus the fingerprint and the MLflow run
    id) is written atomically to ``checkpoint_path``; ``resume`` continues from such a state
    and ends with the same numbers as an uninterrupted run.

    Under torchrun (``ctx``), every process trains on its own shard of each epoch's seeded
    order through DistributedDataParallel, so all hold the same weights; each validates on the
    whole split; only the main process writes the checkpoint and calls ``on_epoch``.
    """
    ctx = ctx or distributed.Context()
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = distributed.setup(ctx, select_device(cfg.device))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    shard = (lambda order: distributed.shard(order, ctx)) if ctx.enabled else None
    shard_size = len(shard(torch.arange(len(train_data[1])))) if shard else len(train_data[1])
    steps = data.num_batches(shard_size, cfg.batch_size)
    state = new_state(model_cfg, cfg, steps, device, memory_format, train_data[0])
    trained = distributed.wrap(state.model, ctx, device)  # what the training steps call
    if resume is not None:
        state.load_state_dict(resume)
    start_epoch = state.epoch
    val_dtype = autocast_dtype(cfg, device) if cfg.amp_validation else None
    show = progress and ctx.is_main
    epochs = tqdm(range(start_epoch + 1, cfg.epochs + 1), desc="Epochs", unit="epoch",
                  initial=start_epoch, total=cfg.epochs, disable=not show, dynamic_ncols=True)
    odd_flips = (data.alternating_flips(len(train_data[1]), cfg.seed)
                 if augment is not None and augment.alternate_flips else None)
    for epoch in epochs:
        started = time.perf_counter()
        images = (train_data[0] if odd_flips is None
                  else data.epoch_images(train_data[0], odd_flips, epoch))
        bar = tqdm(data.batches(images, train_data[1], cfg.batch_size, state.generator,
                                select=shard),
                   total=steps, desc=f"Epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not show, dynamic_ncols=True, mininterval=1.0)
        train_loss, train_acc = train_one_epoch(
            state, trained, cfg, augment and augment.for_epoch(epoch, cfg.epochs), bar, device,
            memory_format, ctx)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        if len(val_data[1]):
            record["val_loss"], record["val_acc"] = validate(state.evaluated, val_data,
                                                             cfg.batch_size, device, val_dtype)
        record.update(lr=state.optimizer.param_groups[0]["lr"],
                      epoch_seconds=time.perf_counter() - started)
        state.end_epoch(record)
        epochs.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_loss", "val_acc")
                            if k in record})
        # Log before checkpointing: a crash in between repeats this epoch (same numbers, same
        # step) instead of losing its metrics.
        if on_epoch is not None:
            on_epoch(record)
        if checkpoint_path is not None and ctx.is_main:
            atomic_torch_save({"fingerprint": fingerprint, "epochs": cfg.epochs,
                               "run_id": run_id, **state.state_dict()}, checkpoint_path)
        signal_after_epoch(epoch)
        hold_after_epoch(epoch)

    distributed.check_same_weights(state.model, ctx)
    last_raw = copy.deepcopy(state.model) if state.ema is not None else None
    state.model.load_state_dict(state.best_state)
    return FitResult(state.model, state.history, state.best_epoch, state.best_val_acc,
                     start_epoch, str(device), last_raw)


SIGNAL_AFTER_EPOCH = "FMNIST_CRNN_SIGNAL_AFTER_EPOCH"


def signal_after_epoch(epoch: int) -> None:
    """Fault injection for resume tests: ``FMNIST_CRNN_SIGNAL_AFTER_EPOCH=2:INT`` sends this
    process SIGINT (or KILL, TERM) once epoch 2's checkpoint is written, so a test stops a
    run at a known point on any machine instead of racing a signal against the training."""
    setting = os.environ.get(SIGNAL_AFTER_EPOCH)
    if not setting:
        return
    at, _, name = setting.partition(":")
    if epoch != int(at) or not distributed.from_env().is_main:
        return  # under torchrun: the main process only; torchrun then stops the others
    if name in ("", "INT"):
        # What Python turns Ctrl-C into; raised directly, because a process started in the
        # background inherits an ignored SIGINT and would never see the signal.
        raise KeyboardInterrupt
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


HOLD_DIR = "FMNIST_CRNN_HOLD_DIR"


def hold_after_epoch(epoch: int) -> None:
    """Fault injection for tests that act between two epochs (stop the tracking server, kill
    a worker): with ``FMNIST_CRNN_HOLD_DIR=D``, a file ``D/hold-<run>-<epoch>`` (``<run>``:
    DVC_EXP_NAME, else ``run``) makes the run write ``D/at-<run>-<epoch>`` (its pid) once that
    epoch is logged and checkpointed, then wait until the hold file is removed."""
    folder = os.environ.get(HOLD_DIR)
    if not folder or not distributed.from_env().is_main:
        return
    name = f"{os.environ.get('DVC_EXP_NAME') or 'run'}-{epoch}"
    hold = Path(folder) / f"hold-{name}"
    if not hold.exists():
        return
    atomic_write_bytes(Path(folder) / f"at-{name}", str(os.getpid()).encode())
    while hold.exists():
        time.sleep(0.2)


