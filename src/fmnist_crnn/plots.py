"""Matplotlib figures only: no MLflow, no DVC, no files read here."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fmnist_crnn.files import atomic_write_bytes  # noqa: E402


def learning_curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """Train/validation loss and accuracy per epoch, side by side."""
    epochs = [int(row["epoch"]) for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for split, style in (("train", "-o"), ("val", "-s")):
        if any(f"{split}_loss" not in row for row in history):
            continue  # no validation split (split.val_fraction 0)
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, label=split,
                     markersize=3)
        ax_acc.plot(epochs, [100 * row[f"{split}_acc"] for row in history], style, label=split,
                    markersize=3)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix",
                     normalize: bool = False) -> Figure:
    """Heatmap, actual classes as rows and predicted as columns, counts in the cells."""
    cm = np.asarray(cm)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(8, 7), constrained_layout=True)
    image = ax.imshow(shown, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            text = f"{shown[i, j]:.2f}" if normalize else str(int(cm[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > threshold else "black")
    return fig


def save(fig: Figure, path: str | Path) -> None:
    """Write the figure as PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def curves_by_group_figure(curves: Mapping[str, Sequence[Sequence[float]]], title: str,
                           ylabel: str) -> Figure:
    """One line per group (the mean over its curves, epochs from 1), a band for min..max."""
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for name, group in sorted(curves.items()):
        length = min(len(c) for c in group)
        values = np.array([c[:length] for c in group])
        epochs = np.arange(1, length + 1)
        (line,) = ax.plot(epochs, values.mean(axis=0), label=f"{name} (n={len(group)})")
        if len(group) > 1:
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def scatter_figure(points: Mapping[str, tuple[float, float]], xlabel: str, ylabel: str,
                   title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    for name, (x, y) in points.items():
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig


def images_figure(images: np.ndarray, titles: Sequence[str], cols: int = 8,
                  size: float = 1.4) -> Figure:
    """Grayscale images (N, H, W) in a grid, one title each, each image scaled to its own
    range (as one imshow per image would).

    One tiled image on one axes rather than an axes per image: a grid of 32 axes cost about
    0.45 s to draw and save on 2 cores, most of it making and measuring ticks that are never
    shown."""
    n, height_px, width_px = images.shape
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    title_px = round(height_px * 0.3 / size)  # 0.3 inch above each image for its title
    gap_px = max(1, round(width_px * 0.08))
    tiles = np.full((rows * (title_px + height_px), cols * (width_px + gap_px) - gap_px),
                    np.nan)
    low = images.min(axis=(1, 2), keepdims=True)
    span = images.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(images - low, span, out=np.zeros(images.shape), where=span > 0)
    height = rows * (size + 0.3) + 0.45
    fig = plt.figure(figsize=(cols * size, height))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.99 - 0.45 / height))
    ax.axis("off")
    for i, (image, title) in enumerate(zip(scaled, titles, strict=False)):
        top, left = (i // cols) * (title_px + height_px) + title_px, (i % cols) * (
            width_px + gap_px)
        tiles[top:top + height_px, left:left + width_px] = image
        ax.text(left + (width_px - 1) / 2, top - 1, title, fontsize=7, ha="center",
                va="bottom")
    cmap = plt.get_cmap("gray").with_extremes(bad="white")  # NaN: the space between images
    ax.imshow(tiles, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    return fig


def feature_maps_figure(maps: np.ndarray, title: str, max_maps: int = 32) -> Figure:
    """The first ``max_maps`` channels (C, H, W) of one image's feature maps."""
    maps = maps[:max_maps]
    fig = images_figure(maps, [f"ch {i}" for i in range(len(maps))], cols=8, size=1.0)
    fig.suptitle(title, fontsize=9)
    return fig


def sequence_heatmap_figure(sequence: np.ndarray, title: str) -> Figure:
    """The LSTM output (T, hidden) as a heatmap: steps down, hidden units across."""
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.25 * sequence.shape[0]), constrained_layout=True)
    image = ax.imshow(sequence, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel="hidden unit", ylabel="step")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def probabilities_figure(probabilities: np.ndarray, class_names: Sequence[str],
                         title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3), constrained_layout=True)
    ax.barh(list(class_names), probabilities, color="tab:blue")
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="probability", title=title)
    return fig
