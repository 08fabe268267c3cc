"""Typed, frozen parameters: one dataclass per section of ``params.yaml``.

Loading validates everything up front so that a typo or an impossible value fails before any
work starts, with a message that names the key, the value and what was expected.
No torch here: every stage (and the tests) can load parameters cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fmnist_crnn.errors import ConfigError

IMAGE_SIDE = 28  # Fashion-MNIST's images are 28 x 28 pixels
TRAIN_IMAGES = 60_000  # in its training file (the download checks its SHA-256)


@dataclass(frozen=True)
class DataConfig:
    """Where the raw Fashion-MNIST files come from (see ``fmnist_crnn.data``)."""

    # A folder holding the four files (.gz or decompressed). FASHION_MNIST_DIR overrides it.
    source_dir: str | None = None
    # Tried after the user's folder and the Debian/Ubuntu package folder.
    mirror: str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "data.timeout_s", self.timeout_s, "a number > 0")


@dataclass(frozen=True)
class SplitConfig:
    """The train/validation split of the 60,000 training images."""

    val_fraction: float = 0.3
    stratify: bool = False
    seed: int = 42
    # Use only the first N images of the training file and of the test file (quick runs).
    limit: int | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.val_fraction < 1, "split.val_fraction", self.val_fraction,
               "a fraction in [0, 1) (0: train on every image, no validation)")
        _check(self.limit is None or self.limit >= 20, "split.limit", self.limit,
               "null or an integer >= 20")


@dataclass(frozen=True)
class ModelConfig:
    """The CRNN: conv blocks -> reshape + LSTM -> linear head. One list entry per conv block."""

    channels: tuple[int, ...] = (32, 64, 128)
    kernel_sizes: tuple[int, ...] = (3, 3, 2)
    strides: tuple[int, ...] = (2, 1, 1)
    # "auto" means kernel_size // 2 for every block; otherwise one integer per block.
    padding: Literal["auto"] | tuple[int, ...] = "auto"
    pool: tuple[bool, ...] = (True, True, True)
    dropout: tuple[float, ...] = (0.25, 0.25, 0.25)
    # How the last feature map (C, H, W) becomes the LSTM's sequence. "chunk" is the study's:
    # flatten C*H*W and cut it into steps of embedding_dim. "rows" reads the H rows (steps of
    # C*W features), "columns" the W columns (steps of C*H); embedding_dim is unused by both.
    sequence: Literal["chunk", "rows", "columns"] = "chunk"
    embedding_dim: int = 64
    # 0: the LSTM reads each step's features as they are. N: a linear layer maps each step to
    # N features first (the LSTM's input size becomes N): a factorised input weight, cheaper
    # where the step is wide (7 rows of 128 channels x 7 columns are 896 features a step).
    projection_dim: int = 0
    hidden_dim: int = 128
    num_layers: int = 3
    bidirectional: bool = False
    head_dims: tuple[int, ...] = (128, 64)
    # The study's Dropout before the last linear layer was commented out: 0 keeps it off.
    head_dropout: float = 0.0
    # Properties of the data, not tuning knobs; kept here so a checkpoint can rebuild the model.
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    # Per-pixel normalisation of inputs scaled to [0, 1] (Fashion-MNIST's mean and std).
    input_mean: float = 0.2860
    input_std: float = 0.3530

    def __post_init__(self) -> None:
        n = len(self.channels)
        _check(n >= 1, "model.channels", list(self.channels), "at least one conv block")
        for key in ("kernel_sizes", "strides", "pool", "dropout"):
            value = getattr(self, key)
            _check(len(value) == n, f"model.{key}", list(value),
                   f"one entry per conv block ({n}, like model.channels)")
        if self.padding != "auto":
            _check(len(self.padding) == n, "model.padding", list(self.padding),
                   f'"auto" or one integer per conv block ({n})')
            _check(all(p >= 0 for p in self.padding), "model.padding", list(self.padding),
                   "integers >= 0")
        for key in ("channels", "kernel_sizes", "strides", "head_dims"):
            value = getattr(self, key)
            _check(all(v >= 1 for v in value), f"model.{key}", list(value), "integers >= 1")
        for key in ("embedding_dim", "hidden_dim", "num_layers", "in_channels", "image_size",
                    "num_classes"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        _check(self.projection_dim >= 0, "model.projection_dim", self.projection_dim,
               "0 (no projection) or an integer >= 1")
        _check(all(0 <= p < 1 for p in self.dropout), "model.dropout", list(self.dropout),
               "probabilities in [0, 1)")
        _check(0 <= self.head_dropout < 1, "model.head_dropout", self.head_dropout,
               "a probability in [0, 1)")
        _check(self.input_std > 0, "model.input_std", self.input_std, "a number > 0")

    @property
    def paddings(self) -> tuple[int, ...]:
        if self.padding == "auto":
            return tuple(k // 2 for k in self.kernel_sizes)
        return tuple(self.padding)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    epochs: int = 20
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 0.001  # the peak learning rate when a schedule is set
    weight_decay: float = 0.0
    # Learning-rate schedule, stepped every batch: "none" keeps lr, "cosine" decays it to 0,
    # "onecycle" is torch's OneCycleLR (it rises for warmup_epochs, then anneals).
    schedule: Literal["none", "cosine", "onecycle"] = "none"
    warmup_epochs: float = 0.0  # linear warmup from lr/25 (none, cosine), or one-cycle's rise
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None  # clip the global gradient norm (the LSTM's guard)
    # Exponential moving average of the weights (e.g. 0.999): validation, the kept weights and
    # the logged model all use the average; null trains without one.
    ema_decay: float | None = None
    # The BatchNorm layers' biases train at this multiple of lr, with weight_decay divided by
    # it (the decay per step unchanged): airbench's faster BatchNorm biases. 1: one group.
    norm_bias_lr_scale: float = 1.0
    # airbench's lookahead: every N optimizer steps the weights are pulled to a slow copy that
    # moves toward them, slow += (1 - rho)(fast - slow), fast = slow, with rho = 0.95^N times
    # (the share of training done)^3: nothing early, strongest at the end. 0: off.
    lookahead_steps: int = 0
    # airbench's whitened first convolution, as an initialisation: the first conv block's first
    # 2 x k x k filters (k its kernel size) start as the eigenvectors of the covariance of k x k
    # patches of 5,000 training images, scaled by 1/sqrt(eigenvalue), with their negatives;
    # they train like the rest. false: the usual random initialisation.
    whiten_first_conv: bool = False
    # airbench's identity initialisation, an implicit residual: each conv block's first
    # min(in, out) filters start as the identity (a 1 at the kernel's centre for their own input
    # channel: torch.nn.init.dirac_), the rest keep their random initialisation.
    identity_init: bool = False
    amp: bool = False  # mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU
    # The per-epoch validation under amp's autocast too (else float32): faster on the CPU
    # (2.8 s vs 4.9-6.7 s for 18,000 images), a few predictions differ (docs/accuracy.md).
    amp_validation: bool = False
    channels_last: bool = False  # NHWC memory layout for the convolutions (faster on CPU)
    # "auto" picks CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Torch intra-op threads; 0 leaves torch's default (one per core).
    num_threads: int = 0
    # Training processes on this machine (torchrun + DistributedDataParallel: gloo on CPU,
    # nccl on CUDA); each trains on its own shard with batch_size images per step. A stage
    # already started by torchrun (several machines) uses torchrun's setting instead.
    processes: int = 1

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(self.processes >= 1, "train.processes", self.processes, "an integer >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.num_threads >= 0, "train.num_threads", self.num_threads, "an integer >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs", self.warmup_epochs,
               f"a number of epochs in [0, train.epochs={self.epochs}]")
        _check(self.schedule != "onecycle" or 0 < self.warmup_epochs < self.epochs,
               "train.warmup_epochs", self.warmup_epochs,
               f"a number in (0, train.epochs={self.epochs}) with train.schedule onecycle "
               "(the epochs its learning rate rises)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing,
               "a number in [0, 1)")
        _check(self.grad_clip_norm is None or self.grad_clip_norm > 0, "train.grad_clip_norm",
               self.grad_clip_norm, "null or a number > 0")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "train.ema_decay",
               self.ema_decay, "null or a number in (0, 1)")
        _check(self.lookahead_steps >= 0, "train.lookahead_steps", self.lookahead_steps,
               "0 (off) or an integer >= 1")
        _check(self.norm_bias_lr_scale > 0, "train.norm_bias_lr_scale",
               self.norm_bias_lr_scale, "a number > 0")
        _check(self.amp or not self.amp_validation, "train.amp_validation",
               self.amp_validation, "false while train.amp is false (it validates under amp)")


# AugmentConfig's counts of final epochs with less augmentation: each >= 0, < train.epochs.
LAST_EPOCHS_KEYS = ("plain_last_epochs", "unerased_last_epochs", "unmixed_last_epochs")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, applied to whole batches of tensors with the run's seed."""

    crop_padding: int = 0  # random crop of the image padded by this many (black) pixels
    hflip: bool = False  # mirror half the images left-right (never upside down)
    # With hflip: half the images (drawn once from train.seed) mirrored in odd epochs, the
    # other half in even ones, so each image is seen both ways every two epochs (airbench's
    # alternating flip) instead of at random.
    alternate_flips: bool = False
    erasing: float = 0.0  # probability of erasing a random rectangle (RandomErasing's ranges)
    # The last this many epochs without crop and erasing (mirroring kept): the end of the
    # schedule fits the images as the test shows them, as YOLOX stops its mosaic.
    plain_last_epochs: int = 0
    # The last this many epochs without erasing alone (crop and mirroring kept).
    unerased_last_epochs: int = 0
    # The last this many epochs without CutMix and mixup alone (crop, erasing and mirroring
    # kept): the end of the schedule on whole images and single labels, as timm's
    # mixup_off_epoch, without giving up the crop the shifted test views rely on.
    unmixed_last_epochs: int = 0
    # CutMix (Yun et al., 2019) with this probability per batch: each image gets a rectangle
    # of another image of the batch (a random pairing), of area share 1 - lambda with lambda
    # uniform in [0, 1] (the paper's alpha 1), and the loss weighs both labels by their
    # pasted areas. Off in augment.plain_last_epochs and augment.unmixed_last_epochs. 0: off.
    cutmix: float = 0.0
    # mixup (Zhang et al., 2018) with this probability per batch: each image blended with its
    # partner in a random pairing of the batch, lambda * own + (1 - lambda) * partner, lambda
    # uniform in [0, 1] (the paper's alpha 1, its CIFAR setting), both labels weighed by lambda
    # and 1 - lambda. Off in augment.plain_last_epochs and augment.unmixed_last_epochs; not
    # with augment.cutmix. 0: off.
    mixup: float = 0.0

    def __post_init__(self) -> None:
        _check(self.hflip or not self.alternate_flips, "augment.alternate_flips",
               self.alternate_flips, "false while augment.hflip is false (it alternates the "
               "mirrored images)")
        _check(0 <= self.crop_padding < IMAGE_SIDE, "augment.crop_padding", self.crop_padding,
               f"an integer from 0 to {IMAGE_SIDE - 1} (a crop padded by the whole "
               f"{IMAGE_SIDE}-pixel image can be all padding)")
        for key in ("erasing", "cutmix", "mixup"):
            _check(0 <= getattr(self, key) <= 1, f"augment.{key}", getattr(self, key),
                   "a probability in [0, 1]")
        _check(not (self.cutmix and self.mixup), "augment.mixup", self.mixup,
               f"0 while augment.cutmix is set ({self.cutmix}): a batch gets one or the other")
        for key in LAST_EPOCHS_KEYS:
            _check(getattr(self, key) >= 0, f"augment.{key}", getattr(self, key),
                   "an integer >= 0")

    def for_epoch(self, epoch: int, epochs: int) -> AugmentConfig:
        """What epoch ``epoch`` (from 1) of ``epochs`` applies: without crop, erasing,
        CutMix and mixup in the last ``plain_last_epochs``, without erasing in the last
        ``unerased_last_epochs``, without CutMix and mixup in the last
        ``unmixed_last_epochs``."""
        changes: dict[str, Any] = {}
        if epoch > epochs - max(self.plain_last_epochs, self.unerased_last_epochs):
            changes["erasing"] = 0.0
        if epoch > epochs - max(self.plain_last_epochs, self.unmixed_last_epochs):
            changes.update(cutmix=0.0, mixup=0.0)
        if epoch > epochs - self.plain_last_epochs:
            changes["crop_padding"] = 0
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-time augmentation: the logits of each test image averaged over several views."""

    tta_hflip: bool = False  # the image and its mirror image
    tta_shift: int = 0  # also the image moved this many pixels up, down, left, right
    # Which moves of up to tta_shift pixels: "cross" the four above; "diamond" every move of
    # at most tta_shift pixels in all (2: 13 places); "square" at most tta_shift each way.
    tta_moves: Literal["cross", "diamond", "square"] = "cross"

    def __post_init__(self) -> None:
        _check(0 <= self.tta_shift < IMAGE_SIDE, "evaluate.tta_shift", self.tta_shift,
               f"an integer from 0 to {IMAGE_SIDE - 1} (a view moved by the whole "
               f"{IMAGE_SIDE}-pixel image is blank)")
        _check(self.tta_moves == "cross" or self.tta_shift > 0, "evaluate.tta_moves",
               self.tta_moves, "cross while evaluate.tta_shift is 0 (no moves)")


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = "fashion-mnist-crnn"
    log_model: bool = True
    # Set by the study runner (`make study`): tags that let the MLflow UI filter one study.
    study: str | None = None
    variant: str | None = None
    # Each evaluated model is registered under this name (null: no registry); the alias moves
    # to a new version only when its test accuracy beats the current holder's.
    registered_model_name: str | None = "fashion-mnist-crnn"
    champion_alias: str = "champion"

    def __post_init__(self) -> None:
        _check(bool(self.experiment_name.strip()), "tracking.experiment_name",
               self.experiment_name, "a non-empty name")
        # What MLflow's registry refuses, refused here before anything runs
        # (tests/test_config.py checks these rules against MLflow's own).
        name = self.registered_model_name
        if name is not None:
            _check(bool(name.strip()) and not any(c in name for c in "/:")
                   and posixpath.normpath(name) == name and name != "."
                   and not name.startswith(("..", "/")),
                   "tracking.registered_model_name", name,
                   "null or a non-empty name without '/' or ':' that is not a relative path")
            alias = self.champion_alias
            _check(bool(re.fullmatch(r"[\w\-]{1,255}", alias)) and alias.lower() != "latest"
                   and not re.fullmatch(r"[vV]\d+", alias), "tracking.champion_alias", alias,
                   "1-255 letters, digits, '_' or '-', not 'latest' nor a version "
                   "such as 'v3'")


@dataclass(frozen=True)
class ReportConfig:
    # Training images shown stage by stage in the report ("inside the network").
    inspect_indices: tuple[int, ...] = (0, 1)
    # How many of the most confident test mistakes to show.
    mistakes: int = 16

    def __post_init__(self) -> None:
        _check(len(self.inspect_indices) >= 1 and all(i >= 0 for i in self.inspect_indices),
               "report.inspect_indices", list(self.inspect_indices),
               "a non-empty list of image indices >= 0")
        _check(self.mistakes >= 1, "report.mistakes", self.mistakes, "an integer >= 1")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        # The report shows training images by index: one past the split's training images
        # would fail the report stage after the whole training.
        n = min(self.split.limit or TRAIN_IMAGES, TRAIN_IMAGES)
        n_train = n - math.ceil(self.split.val_fraction * n)  # scikit-learn's rounding
        _check(max(self.report.inspect_indices) < n_train, "report.inspect_indices",
               list(self.report.inspect_indices),
               f"indices below {n_train:,}, the training images of this split (split.limit, "
               "split.val_fraction)")
        for key in LAST_EPOCHS_KEYS:
            _check(getattr(self.augment, key) < self.train.epochs, f"augment.{key}",
                   getattr(self.augment, key),
                   f"fewer than train.epochs={self.train.epochs} (some epochs must augment)")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "augment": AugmentConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
    "report": ReportConfig,
}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; every section must be present."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def params_from_dict(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections {sorted(SECTIONS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known sections: {sorted(SECTIONS)}")
    missing = sorted(set(SECTIONS) - set(raw))
    if missing:
        raise ConfigError(f"missing section(s) {missing}")
    return Params(**{name: section_from_dict(name, raw[name]) for name in SECTIONS})


def section_from_dict(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key '{name}.{key}'; known keys: {sorted(known)}")
    raw = dict(raw)
    if cls is ModelConfig:
        # Per-block pool/dropout may be one scalar that applies to every block.
        channels = raw.get("channels", ModelConfig.channels)
        n = len(channels) if isinstance(channels, (list, tuple)) else 1
        for key in ("pool", "dropout"):
            if key in raw and not isinstance(raw[key], list):
                raw[key] = [raw[key]] * n
    values = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    return cls(**values)


def to_dict(params: Params | DeclaredParams) -> dict[str, dict[str, Any]]:
    """Sections as plain dicts (lists for tuples); a stage's DeclaredParams gives only the
    keys it declared."""
    out = {}
    for name in SECTIONS:
        try:
            section = getattr(params, name)
        except AttributeError:  # not declared by this stage
            continue
        out[name] = section_dict(section)
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings, as ``dvc exp run -S`` takes them, as dotted keys and YAML values."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.lr=0.005")
        overrides[key] = yaml.safe_load(value)
    return overrides


def with_overrides(params: Params, overrides: Mapping[str, Any]) -> Params:
    """``params`` with the dotted keys of ``overrides`` set (``train.lr``), each value checked
    as in params.yaml."""
    raw = to_dict(params)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in raw or not name:
            raise ConfigError(f"override '{key}': expected section.key with a section of "
                              f"{sorted(SECTIONS)}")
        raw[section][name] = value
    return params_from_dict(raw)


def section_dict(section: Any) -> dict[str, Any]:
    """One section as a plain dict, as params.yaml writes it (lists, not tuples)."""
    values = section.as_dict() if isinstance(section, DeclaredSection) else \
        dataclasses.asdict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def to_flat_dict(params: Params | DeclaredParams) -> dict[str, Any]:
    """Dotted keys as in params.yaml (``model.hidden_dim``), the names MLflow and DVC show."""
    return {f"{section}.{key}": value
            for section, values in to_dict(params).items() for key, value in values.items()}


class DeclaredParams:
    """The params.yaml keys a stage declared, whole sections (``model``) or single keys
    (``tracking.champion_alias``); reading any other key is an error.

    dvc.yaml must list every key a stage reads, or changing it would not re-run the stage; a
    key listed but not read re-runs the stage for nothing. Each stage declares its keys, this
    view enforces them at run time, and a test checks the declarations against dvc.yaml.
    """

    def __init__(self, params: Params, declared: tuple[str, ...]) -> None:
        self._params = params
        self._keys: dict[str, tuple[str, ...] | None] = {}  # None: the whole section
        for entry in declared:
            section, _, key = entry.partition(".")
            if section not in SECTIONS:
                raise ConfigError(f"declared params key '{entry}': no section '{section}'")
            known = [f.name for f in dataclasses.fields(SECTIONS[section])]
            if key and key not in known:
                raise ConfigError(f"declared params key '{entry}': known keys of '{section}' "
                                  f"are {known}")
            earlier = self._keys.get(section, ())
            whole = not key or earlier is None
            self._keys[section] = None if whole else (*earlier, key)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._keys:
            raise AttributeError(f"this stage reads params section '{name}' but declares only "
                                 f"{self.declared()}; declare it and list it in dvc.yaml")
        section = getattr(self._params, name)
        keys = self._keys[name]
        return section if keys is None else DeclaredSection(name, section, keys)

    def declared(self) -> list[str]:
        return [s if keys is None else f"{s}.{k}"
                for s, keys in self._keys.items() for k in (keys or (None,))]


class DeclaredSection:
    """The declared keys of one section (see DeclaredParams)."""

    def __init__(self, name: str, section: Any, keys: tuple[str, ...]) -> None:
        self._name, self._section, self._keys = name, section, keys

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if key not in self._keys:
            raise AttributeError(
                f"this stage reads params key '{self._name}.{key}' but declares only "
                f"{[f'{self._name}.{k}' for k in self._keys]} of that section; declare it and "
                "list it in dvc.yaml")
        return getattr(self._section, key)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self._section, f.name)
                for f in dataclasses.fields(self._section) if f.name in self._keys}


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    return section_from_dict("model", raw)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{key}': {value!r}; expected {expected}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, turning YAML lists into tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"invalid value for '{key}': {value!r}; expected {_describe(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"invalid value for '{key}': {value!r}; expected one of {list(args)}")
    if origin is tuple:
        item = args[0]
        if isinstance(value, list):
            return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
        raise ConfigError(f"invalid value for '{key}': {value!r}; expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # An integer stays one (`warmup_epochs: 4`), so the value prints as params.yaml has
        # it in MLflow and in `dvc exp show`; Python's arithmetic treats both alike.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"invalid value for '{key}': {value!r}; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        hint, str(hint))
