"""Look inside the network: ``python -m fmnist_crnn.inspection`` draws the study's
forward1..forward5 (fmnist_crnn.views.trace: each conv block, the reshape + LSTM, the head) for
any images of a split, with the report's figures (``report.inspection_figures``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fmnist_crnn import data
from fmnist_crnn.model import load_model
from fmnist_crnn.report import inspection_figures
from fmnist_crnn.views import trace


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
    for caption, path in inspection_figures(t, data.CLASS_NAMES, Path(args.out)):
        print(f"{path}: {caption}")


if __name__ == "__main__":
    main()
