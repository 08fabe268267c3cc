"""Fashion-MNIST: sources and content digests, IDX reading, the split, in-memory batches and
batch augmentation."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_crnn.config import AugmentConfig, DataConfig, SplitConfig
from fmnist_crnn.errors import DataError
from fmnist_crnn.files import atomic_torch_save

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "FASHION_MNIST_DIR"


@dataclass(frozen=True)
class RawFile:
    name: str  # decompressed IDX file name, as written by the download stage
    sha256: str  # of the decompressed content: gzip headers differ between mirrors

    @property
    def gz_name(self) -> str:
        return self.name + ".gz"


RAW_FILES = (
    RawFile("train-images-idx3-ubyte",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    RawFile("train-labels-idx1-ubyte",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    RawFile("t10k-images-idx3-ubyte",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    RawFile("t10k-labels-idx1-ubyte",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
)
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Sources


def candidate_sources(cfg: DataConfig) -> list[str]:
    """Folders and URLs to try, in order: the user's folder, the Debian package, the mirror."""
    sources: list[str] = []
    user_dir = os.environ.get(ENV_DIR) or cfg.source_dir
    if user_dir:
        sources.append(str(Path(user_dir).expanduser()))
    sources.append(str(DEBIAN_DIR))
    if cfg.mirror:
        sources.append(cfg.mirror.rstrip("/") + "/")
    return sources


def fetch_raw(cfg: DataConfig, out_dir: Path, sources: list[str] | None = None,
              files: tuple[RawFile, ...] = RAW_FILES) -> dict[str, str]:
    """Write the four verified, decompressed IDX files into ``out_dir``; return file -> source.

    A source that lacks a file is skipped; a source whose file exists but is truncated or
    corrupted is an error (silently falling back would hide a damaged copy). Files are first
    written to a temporary folder beside ``out_dir``, which replaces it only when all four
    verify, so a failure leaves the previous ``out_dir`` untouched (dvc.yaml marks it
    ``persist``, so DVC does not delete it before the stage runs either).
    """
    sources = candidate_sources(cfg) if sources is None else sources
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    used: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        for raw in files:
            content, source = _fetch_one(raw, sources, cfg.timeout_s)
            (Path(tmp) / raw.name).write_bytes(content)
            used[raw.name] = source
        staged = Path(tmp) / "out"
        staged.mkdir()
        for raw in files:
            (Path(tmp) / raw.name).rename(staged / raw.name)
        old = Path(tmp) / "old"
        if out_dir.exists():
            out_dir.rename(old)  # removed with the temporary folder
        staged.rename(out_dir)
    return used


def _fetch_one(raw: RawFile, sources: list[str], timeout_s: float) -> tuple[bytes, str]:
    tried = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            url = source + raw.gz_name
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
                    data = response.read()
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                tried.append(f"{url}: {getattr(exc, 'reason', exc)}")
                continue
            return verify_content(raw, data, gzipped=True, origin=url), url
        folder = Path(source)
        for name, gzipped in ((raw.gz_name, True), (raw.name, False)):
            path = folder / name
            if path.is_file():
                return verify_content(raw, path.read_bytes(), gzipped, str(path)), str(path)
        tried.append(f"{folder}: no {raw.gz_name} or {raw.name}")
    raise DataError(
        f"cannot obtain {raw.gz_name} from any source. Tried:\n  " + "\n  ".join(tried)
        + f"\nFix: put the Fashion-MNIST files in a folder and set {ENV_DIR} (or data.source_dir "
        "in params.yaml), install Debian's package dataset-fashion-mnist, or check the network "
        "and data.mirror."
    )


def verify_content(raw: RawFile, data: bytes, gzipped: bool, origin: str) -> bytes:
    """Decompress if needed and compare the content's SHA-256 with the known digest."""
    if gzipped:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{origin}: not a complete gzip file ({exc}); expected decompressed content "
                f"with SHA-256 {raw.sha256}. Delete or replace the file."
            ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != raw.sha256:
        raise DataError(
            f"{origin}: content SHA-256 is {digest} ({len(data)} bytes), expected {raw.sha256} "
            f"for {raw.name}. The file is truncated or corrupted: delete or replace it."
        )
    return data


# ---------------------------------------------------------------------------------------------
# IDX reading and the split


def read_idx(path: Path, expected_ndim: int) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, checking that it holds uint8 data."""
    try:
        # Imported here: torchvision's datasets package costs a second to import, and train,
        # evaluate and report (which only read the split) do not need it.
        from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

        tensor = read_sn3_pascalvincent_tensor(str(path), strict=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run the download stage first") from None
    except Exception as exc:  # torchvision raises bare errors on malformed headers
        raise DataError(f"{path}: not a valid IDX file ({type(exc).__name__}: {exc})") from None
    if tensor.dtype != torch.uint8 or tensor.ndim != expected_ndim:
        raise DataError(f"{path}: expected {expected_ndim}-d uint8 IDX data, got "
                        f"{tensor.ndim}-d {tensor.dtype} with shape {list(tensor.shape)}")
    return tensor


def load_raw(raw_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``prefix`` 'train' or 't10k'."""
    raw_dir = Path(raw_dir)
    images_path = raw_dir / f"{prefix}-images-idx3-ubyte"
    labels_path = raw_dir / f"{prefix}-labels-idx1-ubyte"
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1).long()
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected 28x28 images, got {list(images.shape[1:])}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{labels_path}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels


def _split_indices(labels: torch.Tensor, cfg: SplitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation indices; val_fraction 0 keeps every image for training and an
    empty validation split (the epoch count is then fixed beforehand)."""
    indices = np.arange(len(labels))
    if cfg.val_fraction == 0:
        return torch.from_numpy(indices), torch.from_numpy(indices[:0])
    try:
        from sklearn.model_selection import train_test_split  # only the split stage needs it

        train_idx, val_idx = train_test_split(
            indices, test_size=cfg.val_fraction, random_state=cfg.seed, shuffle=True,
            stratify=labels.numpy() if cfg.stratify else None,
        )
    except ValueError as exc:
        raise DataError(f"cannot split {len(labels)} images with split.val_fraction="
                        f"{cfg.val_fraction}, split.stratify={cfg.stratify}: {exc}") from None
    return torch.from_numpy(train_idx), torch.from_numpy(val_idx)


def make_split(raw_dir: Path, out_dir: Path, cfg: SplitConfig) -> dict[str, int]:
    """Write train/val/test tensors (uint8 images, int64 labels) to ``out_dir``/<split>.pt."""
    images, labels = load_raw(raw_dir, "train")
    test_images, test_labels = load_raw(raw_dir, "t10k")
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
        test_images, test_labels = test_images[: cfg.limit], test_labels[: cfg.limit]
    train_idx, val_idx = _split_indices(labels, cfg)
    tensors = {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
        "test": (test_images, test_labels),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in tensors.items():
        atomic_torch_save({"images": x.contiguous(), "labels": y.contiguous()},
                          out_dir / f"{name}.pt")
    return {name: len(y) for name, (_, y) in tensors.items()}


def load_split(split_dir: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(split_dir) / f"{name}.pt"
    try:
        blob = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the split stage first (dvc repro)") from None
    return blob["images"], blob["labels"]


def split_digest(split_dir: Path, names: tuple[str, ...] = SPLITS) -> str:
    """SHA-256 over the split files, for tracking which data a run saw."""
    h = hashlib.sha256()
    for name in names:
        with open(Path(split_dir) / f"{name}.pt", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Batches


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]; the model normalises."""
    return images.unsqueeze(1).float().div_(255.0)


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory mini-batches; shuffled with ``generator`` when one is given. ``select`` maps
    the epoch's order to the indices this process trains on (its shard, under torchrun)."""
    n = len(labels)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    if select is not None:
        order = select(order if order is not None else torch.arange(n))
        n = len(order)
    for start in range(0, n, batch_size):
        if order is None:
            idx = slice(start, start + batch_size)
        else:
            idx = order[start : start + batch_size]
        yield to_float(images[idx]), labels[idx]


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


# ---------------------------------------------------------------------------------------------
# Batch augmentation: every image of a batch gets its own random draw, all from ``generator``
# (so a seeded run is repeatable and resumable), on whole tensors rather than per-sample PIL.

ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing's defaults: area fraction ...
ERASE_RATIO = (0.3, 3.3)  # ... and aspect ratio of the erased rectangle


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip, random erasing on float (B, C, H, W)."""
    if cfg.crop_padding:
        x = random_crop(x, cfg.crop_padding, generator)
    if cfg.hflip and not cfg.alternate_flips:  # alternating: the epoch's images come mirrored
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.erasing:
        x = random_erasing(x, cfg.erasing, generator)
    return x


def alternating_flips(n: int, seed: int) -> torch.Tensor:
    """Which of ``n`` training images ``augment.alternate_flips`` mirrors in odd epochs (the
    rest in even ones): half of them at random, drawn from ``seed`` alone, so a resumed run
    and every process under torchrun draw the same half, and the batches' generator is
    untouched."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5


def epoch_images(images: torch.Tensor, odd_flips: torch.Tensor, epoch: int) -> torch.Tensor:
    """The (N, H, W) training images as epoch ``epoch`` (from 1) trains on them under
    alternating flips: the images of ``odd_flips`` mirrored in odd epochs, the others in even
    ones."""
    flip = odd_flips if epoch % 2 else ~odd_flips
    return torch.where(flip[:, None, None], images.flip(-1), images)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``padding`` pixels each way; uncovered pixels are 0 (black)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    # Advanced indexing puts the indexed dims first: (B, H, W, C) -> (B, C, H, W).
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move (B, C, H, W) images ``dy`` pixels down and ``dx`` right (negative: up, left);
    uncovered pixels are 0 (black), as in ``random_crop``."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    py, px = abs(dy), abs(dx)
    padded = torch.nn.functional.pad(x, (px, px, py, py))
    return padded[..., py - dy : py - dy + h, px - dx : px - dx + w]


def _mixing_draw(batch: int, p: float, generator: torch.Generator
                 ) -> tuple[float, torch.Tensor] | None:
    """CutMix's and mixup's draws, in this order: whether the batch mixes (probability
    ``p``), lambda uniform in [0, 1], and a random pairing of the ``batch`` images; None when
    the batch stays as it is."""
    if torch.rand(1, generator=generator).item() >= p:
        return None
    lam = torch.rand(1, generator=generator).item()
    return lam, torch.randperm(batch, generator=generator)


def cutmix(x: torch.Tensor, p: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, float] | None]:
    """With probability ``p`` for the batch, CutMix (Yun et al., 2019): one rectangle, the
    same for every image, taken from the image's partner in a random pairing of the batch.
    Its side is ``sqrt(1 - lambda)`` of the image's, lambda uniform in [0, 1] (the paper's
    alpha 1), its centre uniform, clipped at the border. Returns the images and, when mixed,
    the partners' indices and the share of each image left its own (1 - the pasted area), the
    weight of its own label in the loss."""
    drawn = _mixing_draw(len(x), p, generator)
    if drawn is None:
        return x, None
    lam, partners = drawn
    h, w = x.shape[-2:]
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    side = (1 - lam) ** 0.5
    half_h, half_w = int(h * side) // 2, int(w * side) // 2
    top, bottom = max(cy - half_h, 0), min(cy + half_h, h)
    left, right = max(cx - half_w, 0), min(cx + half_w, w)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[partners, :, top:bottom, left:right]
    own = 1 - (bottom - top) * (right - left) / (h * w)
    return mixed, (partners, own)


def mixup(x: torch.Tensor, p: float, generator: torch.Generator
          ) -> tuple[torch.Tensor, tuple[torch.Tensor, float] | None]:
    """With probability ``p`` for the batch, mixup (Zhang et al., 2018): every image blended
    with its partner in a random pairing of the batch, ``lambda * x + (1 - lambda) * partner``,
    lambda uniform in [0, 1] (the paper's alpha 1) and the same for the batch. Returns the
    images and, when mixed, the partners' indices and lambda, the weight of each image's own
    label in the loss (the contract of :func:`cutmix`)."""
    drawn = _mixing_draw(len(x), p, generator)
    if drawn is None:
        return x, None
    lam, partners = drawn
    return torch.lerp(x[partners], x, lam), (partners, lam)


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability ``p`` per image, set a random rectangle to 0 (RandomErasing's ranges)."""
    b, _, h, w = x.shape
    apply = torch.rand(b, generator=generator) < p
    area = torch.empty(b).uniform_(*ERASE_SCALE, generator=generator) * (h * w)
    log_ratio = torch.empty(b).uniform_(*np.log(ERASE_RATIO), generator=generator)
    ratio = log_ratio.exp()
    eh = (area * ratio).sqrt().round().clamp(1, h).long()
    ew = (area / ratio).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    mask = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None])
            & (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None])
            & apply[:, None, None])
    return x.masked_fill(mask[:, None], 0.0)
