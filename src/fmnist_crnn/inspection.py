"""Look inside the network: the study's forward1..forward5, built on the model's named parts.

Runs ``CRNN.features`` (each conv block), ``CRNN.sequence`` (reshape + LSTM) and ``CRNN.head``
on a few images and turns each stage's output into a figure; nothing of the forward pass is
copied here, so the inspection cannot drift from the model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_crnn import data, plots
from fmnist_crnn.model import CRNN, load_model


@dataclass
class Trace:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: list[int]
    blocks: list[np.ndarray]  # each (N, C, H, W)
    sequence: np.ndarray  # (N, T, hidden)
    probabilities: np.ndarray  # (N, classes)


@torch.no_grad()
def trace(model: CRNN, images: torch.Tensor, labels: torch.Tensor) -> Trace:
    model = model.cpu().eval()
    x = data.to_float(images)
    blocks = model.features(x)
    sequence = model.sequence(blocks[-1])
    probabilities = torch.softmax(model.head(sequence), dim=1)
    return Trace(images.numpy(), labels.tolist(), [b.numpy() for b in blocks],
                 sequence.numpy(), probabilities.numpy())


def write_figures(t: Trace, out_dir: Path) -> list[tuple[str, Path]]:
    """One PNG per stage and image; returns (caption, path) in reading order."""
    names = data.CLASS_NAMES
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []

    def save(fig, name: str, caption: str) -> None:
        path = out_dir / name
        plots.save(fig, path)
        figures.append((caption, path))

    save(plots.images_figure(t.images, [names[y] for y in t.labels], size=2.0),
         "inputs.png", f"Input images {list(t.images.shape)}")
    for i in range(len(t.labels)):
        for b, fmap in enumerate(t.blocks):
            save(plots.feature_maps_figure(fmap[i], f"image {i}: block {b + 1} output "
                                                    f"{list(fmap.shape[1:])}"),
                 f"image{i}_block{b + 1}.png",
                 f"Image {i} ({names[t.labels[i]]}) after conv block {b + 1}: "
                 f"{list(fmap.shape)}")
        save(plots.sequence_heatmap_figure(t.sequence[i], f"image {i}: LSTM output "
                                                          f"{list(t.sequence.shape[1:])}"),
             f"image{i}_lstm.png",
             f"Image {i} after the reshape + LSTM (steps x hidden units): "
             f"{list(t.sequence.shape)}")
        predicted = int(t.probabilities[i].argmax())
        save(plots.probabilities_figure(
            t.probabilities[i], names,
            f"predicted {names[predicted]} ({t.probabilities[i, predicted]:.0%}), "
            f"true {names[t.labels[i]]}"),
             f"image{i}_probabilities.png",
             f"Image {i}: class probabilities from the head, {list(t.probabilities.shape)}")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist_crnn.inspection",
                                     description=__doc__)
    parser.add_argument("--checkpoint", default="models/model.pt")
    parser.add_argument("--split", default="data/split", help="folder with <split>.pt")
    parser.add_argument("--from", dest="split_name", default="train",
                        choices=["train", "val", "test"])
    parser.add_argument("--index", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="reports/inspection")
    args = parser.parse_args(argv)
    images, labels = data.load_split(Path(args.split), args.split_name)
    idx = torch.tensor(args.index)
    t = trace(load_model(args.checkpoint), images[idx], labels[idx])
    for caption, path in write_figures(t, Path(args.out)):
        print(f"{path}: {caption}")


if __name__ == "__main__":
    main()
