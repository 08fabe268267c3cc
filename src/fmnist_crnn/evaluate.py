"""Predictions, the classification metrics and the confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from fmnist_crnn import data


def tta_views(hflip: bool, shift: int = 0, moves: str = "cross"
              ) -> list[tuple[int, int, bool]]:
    """The test-time views as (rows down, columns right, mirrored), each with its mirror when
    ``hflip``: the image itself first, then its moves of up to ``shift`` pixels. ``moves``:
    "cross" by ``shift`` up, down, left and right; "diamond" every move of at most ``shift``
    pixels in all; "square" at most ``shift`` pixels each way (nearest first)."""
    places = [(0, 0)] + ([(-shift, 0), (shift, 0), (0, -shift), (0, shift)] if shift else [])
    if moves != "cross":
        reach = range(-shift, shift + 1)
        around = [(dy, dx) for dy in reach for dx in reach
                  if (dy, dx) not in places and (moves == "square" or abs(dy) + abs(dx) <= shift)]
        places += sorted(around, key=lambda m: (abs(m[0]) + abs(m[1]), m))
    return [(dy, dx, mirrored) for dy, dx in places
            for mirrored in ((False, True) if hflip else (False,))]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                   device: torch.device, desc: str | None = None,
                   tta_hflip: bool = False, tta_shift: int = 0, tta_moves: str = "cross",
                   ) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, 28, 28), in order.

    ``tta_hflip``, ``tta_shift``, ``tta_moves``: test-time augmentation, the mean of the
    logits of each image's views (``tta_views``).
    """
    return predict_logits_and_tta(model, images, batch_size, device, desc,
                                  tta_hflip, tta_shift, tta_moves)[1]


@torch.no_grad()
def predict_logits_and_tta(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                           device: torch.device, desc: str | None = None,
                           tta_hflip: bool = True, tta_shift: int = 0,
                           tta_moves: str = "cross") -> tuple[torch.Tensor, torch.Tensor]:
    """The plain logits and the TTA logits (the mean over each image's views, the plain one
    included), from one pass over the images: the one implementation of test-time views."""
    views = tta_views(tta_hflip, tta_shift, tta_moves)
    model.eval()
    plain, averaged = [], []
    stream = data.batches(images, torch.zeros(len(images), dtype=torch.long), batch_size)
    if desc is not None:
        stream = tqdm(stream, desc=desc, total=data.num_batches(len(images), batch_size),
                      unit="batch", dynamic_ncols=True)
    for x, _ in stream:
        x = x.to(device, non_blocking=True)
        logits = [model(_view(x, *view)).float().cpu() for view in views]
        plain.append(logits[0])
        averaged.append(torch.stack(logits).mean(0) if len(logits) > 1 else logits[0])
    if not plain:
        empty = torch.empty(0, model.cfg.num_classes)
        return empty, empty
    return torch.cat(plain), torch.cat(averaged)


def test_metrics(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, device: torch.device, desc: str | None = None,
                 tta_hflip: bool = False, tta_shift: int = 0, tta_moves: str = "cross",
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """``classification_metrics`` of the views' mean logits, plus ``accuracy_without_tta``
    (the image alone, same pass) when there are several views; and those logits."""
    plain, logits = predict_logits_and_tta(model, images, batch_size, device, desc,
                                           tta_hflip, tta_shift, tta_moves)
    metrics = classification_metrics(logits, labels)
    if len(tta_views(tta_hflip, tta_shift, tta_moves)) > 1:
        metrics["accuracy_without_tta"] = accuracy(plain, labels)
    return metrics, logits


def _view(x: torch.Tensor, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    x = data.shift(x, dy, dx)
    return x.flip(-1) if mirrored else x


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images whose highest logit is their label: the one accuracy."""
    return (logits.argmax(dim=1) == labels).sum().item() / max(len(labels), 1)


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Counts (classes x classes): actual classes in rows, predicted in columns."""
    n = len(data.CLASS_NAMES)
    pairs = labels.numpy().astype(np.int64) * n + logits.argmax(dim=1).numpy()
    return np.bincount(pairs, minlength=n * n).reshape(n, n)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator in float64, 0 where the denominator is 0."""
    numerator, denominator = numerator.astype(np.float64), denominator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator != 0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, macro-F1 and per-class precision/recall/F1.

    From the confusion matrix, with scikit-learn's definitions and arithmetic (F1 as
    2 tp / (actual + predicted), 0 where a class is never actual nor predicted), to the last
    bit (tests/test_evaluate.py checks it against sklearn.metrics); computed here because
    importing sklearn.metrics costs the train and evaluate stages about 1.9 s each.
    """
    cm = confusion(logits, labels)
    tp, actual, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _divide(tp, predicted), _divide(tp, actual)
    f1 = _divide(2 * tp, actual + predicted)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(data.CLASS_NAMES, precision, recall, f1, actual,
                                    strict=True)
    }
    return {
        "accuracy": accuracy(logits, labels),
        "loss": float(F.cross_entropy(logits, labels).item()),
        "macro_f1": float(np.mean(f1)),
        "per_class": per_class,
    }
