"""Classify images with a trained model: ``python -m fmnist_crnn.predict FILE ...``.

PNG/JPEG files of any size, colour or grey, are converted like Fashion-MNIST: grey, light
object on a dark background (a light background is inverted), fitted into 28x28. IDX files
give one answer per image. The model comes from a checkpoint (models/model.pt) or any MLflow
model URI (``models:/fashion-mnist-crnn@champion``, ``models:/<name>/<version>``,
``runs:/<run_id>/model``). A file that cannot be read gets an error line; the others still get
their answer; the exit status is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_crnn import data
from fmnist_crnn.errors import ProjectError

SIZE = 28


def load_image(path: Path) -> np.ndarray:
    """One picture -> uint8 (28, 28), Fashion-MNIST style."""
    with Image.open(path) as image:
        grey = ImageOps.exif_transpose(image).convert("L")
    pixels = np.asarray(grey)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:  # dark object on a light background: Fashion-MNIST is the reverse
        grey = ImageOps.invert(grey)
    grey.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIZE, SIZE), 0)
    canvas.paste(grey, ((SIZE - grey.width) // 2, (SIZE - grey.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def load_inputs(path: Path) -> list[tuple[str, np.ndarray]]:
    """(label, uint8 28x28 image) pairs from one file: a picture or an IDX file of images."""
    if not path.is_file():
        raise ValueError("no such file")
    try:
        return [(str(path), load_image(path))]
    except UnidentifiedImageError:
        pass
    try:
        images = data.read_idx(path, expected_ndim=3)
    except data.DataError:
        raise ValueError("neither an image (PNG/JPEG/...) nor an IDX file of images") from None
    if tuple(images.shape[1:]) != (SIZE, SIZE):
        raise ValueError(f"IDX images are {list(images.shape[1:])}, expected [28, 28]")
    return [(f"{path}[{i}]", image.numpy()) for i, image in enumerate(images)]


def model_predictor(checkpoint: str | None, model_uri: str | None
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A function from float images (N, 1, 28, 28) in [0, 1] to class probabilities."""
    if model_uri:
        from fmnist_crnn import tracking

        model = tracking.load_pyfunc(model_uri)
        return lambda x: torch.softmax(torch.as_tensor(np.asarray(model.predict(x))),
                                       dim=1).numpy()
    from fmnist_crnn.model import load_model

    net = load_model(checkpoint or "models/model.pt").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmnist_crnn.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="model file (default: models/model.pt)")
    source.add_argument("--model-uri", help="MLflow model URI, e.g. models:/NAME@champion")
    args = parser.parse_args(argv)

    inputs: list[tuple[str, np.ndarray]] = []
    failed = 0
    for path in args.files:
        try:
            inputs += load_inputs(path)
        except (OSError, ValueError) as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed += 1
    if inputs:
        try:
            predict = model_predictor(args.checkpoint, args.model_uri)
        except ProjectError as exc:  # no usable model: one line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        batch = np.stack([image for _, image in inputs])[:, None].astype(np.float32) / 255.0
        probabilities = predict(batch)
        try:
            for (label, _), p in zip(inputs, probabilities, strict=True):
                k = int(p.argmax())
                print(f"{label}: {data.CLASS_NAMES[k]} ({p[k]:.1%})")
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader stopped early (`| head -3`): not an error. Point stdout at devnull so
            # that the interpreter's final flush does not raise again (Python's signal docs).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
