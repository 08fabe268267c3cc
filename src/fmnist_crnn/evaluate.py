"""Predictions, scikit-learn metrics and the confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from fmnist_crnn import data, plots, tracking
from fmnist_crnn.config import TrackingConfig
from fmnist_crnn.files import atomic_write_json, atomic_write_text
from fmnist_crnn.model import load_model, select_device


def tta_views(hflip: bool, shift: int = 0) -> list[tuple[int, int, bool]]:
    """The test-time views as (rows down, columns right, mirrored): the image itself first,
    then its moves by ``shift`` pixels up, down, left and right; each with its mirror when
    ``hflip``."""
    moves = [(0, 0)] + ([(-shift, 0), (shift, 0), (0, -shift), (0, shift)] if shift else [])
    return [(dy, dx, mirrored) for dy, dx in moves
            for mirrored in ((False, True) if hflip else (False,))]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                   device: torch.device, desc: str | None = None,
                   tta_hflip: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, 28, 28), in order.

    ``tta_hflip``, ``tta_shift``: test-time augmentation, the mean of the logits of each
    image's views (``tta_views``).
    """
    return predict_logits_and_tta(model, images, batch_size, device, desc,
                                  tta_hflip, tta_shift)[1]


@torch.no_grad()
def predict_logits_and_tta(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                           device: torch.device, desc: str | None = None,
                           tta_hflip: bool = True, tta_shift: int = 0,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain logits and the TTA logits (the mean over each image's views, the plain one
    included), from one pass over the images: the one implementation of test-time views."""
    views = tta_views(tta_hflip, tta_shift)
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


def _view(x: torch.Tensor, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    x = data.shift(x, dy, dx)
    return x.flip(-1) if mirrored else x


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images whose highest logit is their label: the one accuracy."""
    return (logits.argmax(dim=1) == labels).sum().item() / max(len(labels), 1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, macro-F1 and per-class precision/recall/F1."""
    y_true = labels.numpy()
    y_pred = logits.argmax(dim=1).numpy()
    classes = list(range(len(data.CLASS_NAMES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(data.CLASS_NAMES, precision, recall, f1, support,
                                    strict=True)
    }
    return {
        "accuracy": accuracy(logits, labels),
        "loss": float(F.cross_entropy(logits, labels).item()),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro",
                                   zero_division=0)),
        "per_class": per_class,
    }


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(),
                            labels=list(range(len(data.CLASS_NAMES))))


def run_evaluation(
    model_path: Path,
    split_dir: Path,
    run_path: Path,
    metrics_path: Path,
    per_class_path: Path,
    predictions_path: Path,
    confusion_path: Path,
    batch_size: int,
    tracking_cfg: TrackingConfig,
    device_name: str = "auto",
    tta_hflip: bool = False,
    tta_shift: int = 0,
) -> dict[str, Any]:
    """The evaluate stage: the test set, once; metrics to files and to the training's run.

    With ``tta_hflip`` or ``tta_shift`` the headline metrics average test-time views;
    ``accuracy_without_tta`` (same model, same pass over the test set) shows what they add.
    """
    device = select_device(device_name)
    model = load_model(model_path, device)
    images, labels = data.load_split(split_dir, "test")
    plain, logits = predict_logits_and_tta(model, images, batch_size, device, "Inference",
                                           tta_hflip, tta_shift)
    metrics = classification_metrics(logits, labels)
    if len(tta_views(tta_hflip, tta_shift)) > 1:
        metrics["accuracy_without_tta"] = accuracy(plain, labels)
    print(f"Accuracy: {metrics['accuracy']:.2%} / Loss: {metrics['loss']:.4f}")
    cm = confusion(logits, labels)

    run_info = json.loads(Path(run_path).read_text())
    with tracking.start_run(tracking_cfg.experiment_name, run_id=run_info["run_id"]):
        tracking.log_metrics({f"test_{k}": v for k, v in metrics.items() if k != "per_class"})
        tracking.log_metrics({
            f"test_{metric}_{_slug(name)}": values[metric]
            for name, values in metrics["per_class"].items()
            for metric in ("precision", "recall", "f1")
        })
        tracking.log_dataset("fashion-mnist-test", data.split_digest(split_dir, ("test",)),
                             str(Path(split_dir) / "test.pt"), "test")
        tracking.log_confusion_matrix(
            plots.confusion_figure(cm, list(data.CLASS_NAMES), title="test confusion matrix"),
            cm, list(data.CLASS_NAMES), "test")
        if tracking_cfg.registered_model_name and run_info.get("model_uri"):
            tracking.register_and_promote(
                run_info["model_uri"], tracking_cfg.registered_model_name,
                tracking_cfg.champion_alias, metrics["accuracy"])

    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    # One row per test image, in order; DVC's confusion plot reads actual/predicted, the
    # report's most-confident-mistakes figure the confidence.
    rows = ["actual,predicted,confidence"] + [
        f"{data.CLASS_NAMES[a]},{data.CLASS_NAMES[p]},{c:.6f}"
        for a, p, c in zip(labels.tolist(), predicted.tolist(), confidence.tolist(), strict=True)]
    atomic_write_text(predictions_path, "\n".join(rows) + "\n")
    atomic_write_json(confusion_path, {"classes": list(data.CLASS_NAMES),
                                       "matrix": cm.tolist()})
    # Headline numbers are DVC metrics (columns in `dvc exp show`); per-class ones go apart.
    atomic_write_json(per_class_path, metrics["per_class"])
    atomic_write_json(metrics_path, {k: v for k, v in metrics.items() if k != "per_class"})
    return metrics


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
