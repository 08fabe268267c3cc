"""Which test-time views help a trained model, measured on the validation split.

Each view is a shift of the image by (dy, dx) pixels (uncovered pixels black, as the training
crop pads) and optionally its mirror. The script computes every view's logits once per model,
then scores fixed sets of views (the mean of their logits), per model and averaged over the
models. It reads the validation split only, unless ``--split-name test`` is asked for: choose
the views on validation, then look at test.

    PYTHONPATH=src python benchmarks/tta_views.py --model a/model.pt --model b/model.pt
    PYTHONPATH=src python benchmarks/tta_views.py --exp NAME --exp NAME2 --out views.json

``--exp``: an experiment's model (name or commit), from its commit through DVC's cache; its
validation split must be the one in ``--split``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fmnist_crnn import data
from fmnist_crnn.distributed import select_device
from fmnist_crnn.environment import cpu_model
from fmnist_crnn.evaluate import accuracy, tta_views
from fmnist_crnn.model import load_model
from fmnist_crnn.study.rescore import MODEL, file_at_rev

# name -> (mirrors, shift, moves) as the evaluate stage takes them (evaluate.tta_views)
VIEW_SETS = {
    "plain": (False, 0, "cross"),
    "flip": (True, 0, "cross"),
    "shift-cross": (False, 1, "cross"),
    "flip+shift-cross": (True, 1, "cross"),
    "flip+shift-square": (True, 1, "square"),
    "flip+shift2-diamond": (True, 2, "diamond"),
    "flip+shift2-square": (True, 2, "square"),
    "flip+shift3-diamond": (True, 3, "diamond"),
}


def exp_commit(exp: str) -> str:
    """The commit of a DVC experiment named ``exp`` (its ref refs/exps/../../NAME), or ``exp``
    itself when it is one."""
    found = subprocess.run(["git", "for-each-ref", "--format=%(objectname)",
                            f"refs/exps/*/*/{exp}"], capture_output=True, text=True,
                           check=True).stdout.split()
    if len(found) > 1:
        raise SystemExit(f"experiment name {exp!r} is ambiguous: commits {', '.join(found)}")
    return found[0] if found else exp


@torch.no_grad()
def view_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                device: torch.device, views: list[tuple[int, int, bool]],
                ) -> dict[tuple[int, int, bool], torch.Tensor]:
    model.eval()
    out: dict[tuple[int, int, bool], list[torch.Tensor]] = {v: [] for v in views}
    for x, _ in data.batches(images, torch.zeros(len(images), dtype=torch.long), batch_size):
        x = x.to(device)
        for dy, dx, flip in views:
            v = data.shift(x, dy, dx)
            out[(dy, dx, flip)].append(model(v.flip(-1) if flip else v).float().cpu())
    return {v: torch.cat(chunks) for v, chunks in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a trained model.pt")
    parser.add_argument("--exp", action="append", default=[],
                        help="a DVC experiment (name or commit) whose model to score")
    parser.add_argument("--split", default="data/split", help="the split stage's output")
    parser.add_argument("--split-name", default="val", choices=("val", "test"))
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default="reports/bench/tta/views-val.json")
    args = parser.parse_args(argv)

    device = select_device("cpu")
    images, labels = data.load_split(Path(args.split), args.split_name)
    if not len(labels):
        raise SystemExit(f"{args.split}/{args.split_name}.pt is empty: nothing to score")
    views = sorted({view for hflip, shift, moves in VIEW_SETS.values()
                    for view in tta_views(hflip, shift, moves)})
    tmp = tempfile.TemporaryDirectory()
    models = [(path, path) for path in args.model]  # (label, file)
    for i, exp in enumerate(args.exp):
        models.append((exp, file_at_rev(MODEL, exp_commit(exp), Path(tmp.name) / f"{i}.pt")))
    if not models:
        raise SystemExit("nothing to score: give --model or --exp")
    per_model = []
    for label, path in models:
        started = time.perf_counter()
        logits = view_logits(load_model(path, device), images, 500, device, views)
        scores = {}
        for name, (hflip, shift, moves) in VIEW_SETS.items():
            chosen = tta_views(hflip, shift, moves)
            mean = torch.stack([logits[v] for v in chosen]).mean(0)
            scores[name] = {"correct": round(accuracy(mean, labels) * len(labels)),
                            "accuracy": accuracy(mean, labels), "views": len(chosen)}
        seconds = time.perf_counter() - started
        per_model.append({"model": label, "seconds": seconds, "scores": scores})
        print(f"{label} ({seconds:.0f} s, {len(views)} views of {len(labels)} images)")
        for name, s in scores.items():
            print(f"  {name:>18}: {s['correct']} correct ({s['accuracy']:.4%}), "
                  f"{s['views']} views", flush=True)
    means = {name: sum(m["scores"][name]["accuracy"] for m in per_model) / len(per_model)
             for name in VIEW_SETS}
    print(f"mean over {len(per_model)} models:")
    for name, acc in means.items():
        print(f"  {name:>18}: {acc:.4%}")
    result = {"split": args.split_name, "images": len(labels), "cpu": cpu_model(),
              "view_sets": {k: {"tta_hflip": v[0], "tta_shift": v[1], "tta_moves": v[2]}
                            for k, v in VIEW_SETS.items()},
              "models": per_model, "mean_accuracy": means}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
