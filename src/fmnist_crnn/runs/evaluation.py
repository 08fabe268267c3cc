"""The evaluate stage's run: the test set, once; metrics to files and to the training's run,
and what the report draws that needs the model or the images (fmnist_crnn.views)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fmnist_crnn import data, tracking
from fmnist_crnn.distributed import select_device
from fmnist_crnn.evaluate import confusion, test_metrics
from fmnist_crnn.files import atomic_write_json, atomic_write_text
from fmnist_crnn.model import CRNN, load_model, shape_table
from fmnist_crnn.views import ReportViews, save_views, trace


def run_evaluation(
    model_path: Path,
    split_dir: Path,
    run_path: Path,
    metrics_path: Path,
    per_class_path: Path,
    predictions_path: Path,
    confusion_path: Path,
    views_path: Path,
    batch_size: int,
    registered_model_name: str | None,
    inspect_indices: Sequence[int],
    champion_alias: str = "champion",
    device_name: str = "auto",
    tta_hflip: bool = False,
    tta_shift: int = 0,
    tta_moves: str = "cross",
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluate stage: the test set, once; metrics to files and to the training's run.

    With ``tta_hflip`` or ``tta_shift`` (and ``tta_moves``) the headline metrics average
    test-time views; ``accuracy_without_tta`` (same model, same pass over the test set) shows
    what they add.
    ``record``: the params this evaluation read; a value that differs from the training's
    becomes a ``changed.<key>`` tag of the run. ``views_path``: the report's views, with the
    trace of training images ``inspect_indices`` and the misclassified test images.
    """
    device = select_device(device_name)
    model = load_model(model_path, device)
    images, labels = data.load_split(split_dir, "test")
    metrics, logits = test_metrics(model, images, labels, batch_size, device, "Inference",
                                   tta_hflip, tta_shift, tta_moves)
    print(f"Accuracy: {metrics['accuracy']:.2%} / Loss: {metrics['loss']:.4f}")
    cm = confusion(logits, labels)

    run_info = json.loads(Path(run_path).read_text())
    with tracking.start_run(None, run_id=run_info["run_id"]):
        if record:
            tracking.log_missing_params(record)
        tracking.log_metrics({f"test_{k}": v for k, v in metrics.items() if k != "per_class"})
        tracking.log_metrics({
            f"test_{metric}_{_slug(name)}": values[metric]
            for name, values in metrics["per_class"].items()
            for metric in ("precision", "recall", "f1")
        })
        tracking.log_dataset("fashion-mnist-test", data.split_digest(split_dir, ("test",)),
                             str(Path(split_dir) / "test.pt"), "test")
        # The table only: the report stage draws the heatmap (reports/figures/) and logs it
        # as test/confusion_matrix.png, so it is drawn once and this stage needs no
        # matplotlib (1.3 s of a slice run's evaluate stage).
        tracking.log_confusion_table(cm, list(data.CLASS_NAMES), "test")
        if registered_model_name and run_info.get("model_uri"):
            tracking.register_and_promote(
                run_info["model_uri"], registered_model_name, champion_alias,
                metrics["accuracy"])

    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    actual, predicted = labels.tolist(), predicted.tolist()
    # The confidence as the file states it: the report ranks the mistakes by these values.
    stated = [float(f"{c:.6f}") for c in confidence.tolist()]
    # One row per test image, in order; DVC's confusion plot reads actual/predicted, the
    # report's most-confident-mistakes figure the confidence.
    rows = ["actual,predicted,confidence"] + [
        f"{data.CLASS_NAMES[a]},{data.CLASS_NAMES[p]},{c:.6f}"
        for a, p, c in zip(actual, predicted, stated, strict=True)]
    atomic_write_text(predictions_path, "\n".join(rows) + "\n")
    save_views(_report_views(model, split_dir, images, actual, predicted, stated,
                             inspect_indices), views_path)
    atomic_write_json(confusion_path, {"classes": list(data.CLASS_NAMES),
                                       "matrix": cm.tolist()})
    # Headline numbers are DVC metrics (columns in `dvc exp show`); per-class ones go apart.
    atomic_write_json(per_class_path, metrics["per_class"])
    atomic_write_json(metrics_path, {k: v for k, v in metrics.items() if k != "per_class"})
    return metrics


def _report_views(model: CRNN, split_dir: Path, test_images: torch.Tensor, actual: list[int],
                  predicted: list[int], confidence: list[float],
                  inspect_indices: Sequence[int]) -> ReportViews:
    """The trace of the training images ``inspect_indices``, the shape table, and every
    misclassified test image, most confident first."""
    images, labels = data.load_split(split_dir, "train")
    idx = torch.tensor(list(inspect_indices))
    names = data.CLASS_NAMES
    wrong = sorted((i for i, (a, p) in enumerate(zip(actual, predicted, strict=True)) if a != p),
                   key=lambda i: -confidence[i])
    titles = [f"{names[actual[i]]} -> {names[predicted[i]]} ({confidence[i]:.0%})"
              for i in wrong]
    return ReportViews(list(data.CLASS_NAMES), trace(model, images[idx], labels[idx]),
                       shape_table(model.cfg), test_images[wrong].numpy(), titles)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
