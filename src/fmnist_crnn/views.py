"""What the report draws that needs the model or the images: the inspection trace, the shape
table and the misclassified test images, most confident first. The evaluate stage, which has
the model and the data loaded, writes them to one NumPy file; the report stage reads it and so
imports neither torch nor the data (about 2 s of every tracked run). Only ``trace`` uses
torch, imported when it is called."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist_crnn.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch


@dataclass
class Trace:
    """The network stage by stage on a few images (the study's forward1..forward5)."""

    images: np.ndarray  # (N, 28, 28) uint8
    labels: list[int]
    blocks: list[np.ndarray]  # each (N, C, H, W)
    sequence: np.ndarray  # (N, T, hidden)
    probabilities: np.ndarray  # (N, classes)


def trace(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Trace:
    """The study's forward1..forward5 with the CRNN's own parts (``features``, ``sequence``,
    ``head``) on uint8 ``images``: nothing of the forward pass is copied, so the inspection
    cannot drift from the model."""
    import torch

    from fmnist_crnn import data

    model = model.cpu().eval()
    with torch.no_grad():
        blocks = model.features(data.to_float(images))
        sequence = model.sequence(blocks[-1])
        probabilities = torch.softmax(model.head(sequence), dim=1)
    return Trace(images.numpy(), labels.tolist(), [b.numpy() for b in blocks],
                 sequence.numpy(), probabilities.numpy())


@dataclass
class ReportViews:
    classes: list[str]
    trace: Trace  # on training images report.inspect_indices
    shapes: list[tuple[str, list[int]]]  # each stage's output shape for a batch of 64
    # Every misclassified test image, most confident first (the report shows report.mistakes
    # of them, so that setting re-runs the report alone): (wrong, 28, 28) uint8.
    mistake_images: np.ndarray
    mistake_titles: list[str]  # "actual -> predicted (confidence)"


def save_views(views: ReportViews, path: str | Path) -> None:
    """Write ``views`` atomically as one .npz (no pickles: it loads without torch)."""
    t = views.trace
    arrays = {
        "classes": np.array(views.classes),
        "images": t.images, "labels": np.array(t.labels, dtype=np.int64),
        "sequence": t.sequence, "probabilities": t.probabilities,
        **{f"block{i}": b for i, b in enumerate(t.blocks)},
        "shape_names": np.array([name for name, _ in views.shapes]),
        # Shapes differ in length (input is 4-d, the head 2-d): padded with -1.
        "shape_dims": np.array([dims + [-1] * (4 - len(dims)) for _, dims in views.shapes],
                               dtype=np.int64),
        "mistake_images": views.mistake_images, "mistake_titles": np.array(views.mistake_titles),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_views(path: str | Path) -> ReportViews:
    """Read what ``save_views`` wrote, or raise ValueError naming the file and what to run."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            a = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; run the evaluate stage (dvc repro evaluate)") \
            from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable views file ({exc}); run the evaluate stage "
                         "again") from None
    try:
        blocks = [a[f"block{i}"] for i in range(sum(k.startswith("block") for k in a))]
        trace = Trace(a["images"], a["labels"].tolist(), blocks, a["sequence"],
                      a["probabilities"])
        shapes = [(str(name), [int(d) for d in dims if d >= 0])
                  for name, dims in zip(a["shape_names"], a["shape_dims"], strict=True)]
        return ReportViews([str(c) for c in a["classes"]], trace, shapes, a["mistake_images"],
                           [str(t) for t in a["mistake_titles"]])
    except KeyError as exc:
        raise ValueError(f"{path}: lacks {exc.args[0]!r}; run the evaluate stage again") \
            from None
