"""The study's ablations as queued DVC experiments, and their comparison.

``python -m fmnist_crnn.study run`` queues every variant of shared/docs/study.md (optionally
several seeds each) with ``dvc exp run --queue``, runs the queue, waits, then writes the
comparison. ``python -m fmnist_crnn.study compare --study ID`` rebuilds the comparison from
``dvc exp show --json`` and the MLflow runs tagged ``study=ID``: nothing is kept by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fmnist_crnn.files import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Variant:
    name: str
    change: str
    overrides: dict[str, Any]
    reported: str  # what the course report says about it


TWO_BLOCKS = {
    "model.channels": [32, 64],
    "model.kernel_sizes": [3, 3],
    "model.strides": [2, 1],
    "model.pool": [True, True],
    "model.dropout": [0.25, 0.25],
}
VARIANTS = {v.name: v for v in (
    Variant("baseline", "the study's baseline", {}, "89.6%"),
    Variant("conv2", "2 convolution blocks instead of 3", TWO_BLOCKS, "worse"),
    Variant("pool2", "max-pool in 2 blocks instead of 3", {"model.pool": [True, True, False]},
            "lower accuracy"),
    Variant("kernels222", "all kernels 2", {"model.kernel_sizes": [2, 2, 2]},
            "worse than 3,3,2"),
    Variant("kernels333", "all kernels 3", {"model.kernel_sizes": [3, 3, 3]},
            "88.13%, loss 0.3283"),
    Variant("kernels555", "all kernels 5 (padding kernel//2)", {"model.kernel_sizes": [5, 5, 5]},
            "worse than 3,3,2"),
    Variant("hidden256", "LSTM hidden_dim 256", {"model.hidden_dim": 256},
            "90.06%, loss 0.2808"),
    Variant("dropout01", "dropout 0.1 in all three blocks", {"model.dropout": [0.1, 0.1, 0.1]},
            "best of the dropout variants"),
    Variant("dropout01x1", "dropout 0.1 in the first block only",
            {"model.dropout": [0.1, 0.25, 0.25]}, "loss 0.3319 (worse)"),
    Variant("final", "hidden_dim 256 + dropout 0.1",
            {"model.hidden_dim": 256, "model.dropout": [0.1, 0.1, 0.1]}, "best configuration"),
)}


# The accuracy recipe (README "Accuracy and speed") as a ladder of cumulative ingredients: each
# step adds one ingredient to the step before, so a study of the steps is the table of what each
# ingredient adds. The last step, "best", is the recipe itself (`make best`).
RECIPE_EPOCHS = 20
RECIPE_STEPS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("rows-crnn", "CRNN keeping 7x7 resolution (4 conv blocks, stride 1), LSTM reads the 7 rows, "
     "bidirectional, 1 layer; Adam 1e-3, batch 128", {
        "model.channels": [32, 64, 64, 128],
        "model.kernel_sizes": [3, 3, 3, 3],
        "model.strides": [1, 1, 1, 1],
        "model.pool": [True, False, True, False],
        "model.dropout": [0.0, 0.0, 0.1, 0.2],
        "model.sequence": "rows",
        "model.bidirectional": True,
        "model.num_layers": 1,
        "model.head_dims": [],
        "train.batch_size": 128,
        "train.channels_last": True,
    }),
    ("onecycle", "+ AdamW (weight decay 0.05), one-cycle schedule to lr 0.003 "
     "(rising for 20% of the epochs)", {
        "train.optimizer": "adamw",
        "train.lr": 0.003,
        "train.weight_decay": 0.05,
        "train.schedule": "onecycle",
        "train.warmup_epochs": 4,
    }),
    ("smoothing", "+ label smoothing 0.1", {"train.label_smoothing": 0.1}),
    ("cropflip", "+ random crop (padding 2) and horizontal flip",
     {"augment.crop_padding": 2, "augment.hflip": True}),
    ("erasing", "+ random erasing (p 0.25)", {"augment.erasing": 0.25}),
    ("best", "+ EMA of weights (0.999), gradient clipping (norm 5); flip TTA at test",
     {"train.ema_decay": 0.999, "train.grad_clip_norm": 5.0, "evaluate.tta_hflip": True}),
)


def scale_to_epochs(overrides: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """The recipe's warmup is 20% of its epochs: keep that share when epochs are overridden."""
    if not epochs or "train.warmup_epochs" not in overrides:
        return overrides
    share = overrides["train.warmup_epochs"] / RECIPE_EPOCHS
    return {**overrides, "train.warmup_epochs": round(share * epochs, 3)}


def _ladder() -> list[Variant]:
    variants, overrides = [], {}
    for name, change, step in RECIPE_STEPS:
        overrides = {**overrides, **step}
        variants.append(Variant(name, change, overrides, ""))
    return variants


RECIPE_VARIANTS = {v.name: v for v in _ladder()}
RECIPE = RECIPE_VARIANTS["best"].overrides
# Time to accuracy: the steps up to label smoothing on a 5-epoch schedule. No augmentation:
# in 6-epoch runs it cost accuracy (it pays off only with a longer schedule).
FAST_EPOCHS = 5
RECIPES = {"best": RECIPE, "fast": {**scale_to_epochs(RECIPE_VARIANTS["smoothing"].overrides,
                                                          FAST_EPOCHS),
                                    "train.epochs": FAST_EPOCHS}}
ALL_VARIANTS = {**VARIANTS, **RECIPE_VARIANTS}


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments in the override syntax `dvc exp run -S` parses."""
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={_literal(value)}"]
    return args


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return str(value)


def experiment_name(study: str, variant: str, seed: int) -> str:
    if study == variant:  # `--study best --variants best`: best-s42, not best-best-s42
        return f"{variant}-s{seed}"
    return f"{study}-{variant}-s{seed}"


def variant_command(variant: Variant, extra: dict[str, Any] | None = None) -> str:
    """The one command that runs this variant on its own (for the README)."""
    words = ["dvc", "exp", "run", "-n", variant.name]
    words += override_args({**variant.overrides, **(extra or {})})
    return " ".join(f"'{w}'" if any(c in w for c in "[]") else w for w in words)


# ---------------------------------------------------------------------------------------------
# Running


def _dvc(*args: str, capture: bool = True) -> str:
    # The dvc of this interpreter's environment, whatever PATH says; `dvc queue start` spawns
    # its workers as `dvc` from PATH, so put this environment's bin/ first there too.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=capture,
                          text=True, env=env)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:] if capture else ""
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}): {detail}")
    return proc.stdout if capture else ""


def queue_study(study: str, variants: list[Variant], seeds: list[int],
                extra: dict[str, Any]) -> list[str]:
    names = []
    # Seed-major order: if the queue is stopped early, every variant has the same seeds done.
    for seed in seeds:
        for variant in variants:
            name = experiment_name(study, variant.name, seed)
            overrides = {**scale_to_epochs(variant.overrides, extra.get("train.epochs")),
                         **extra, "train.seed": seed,
                         "tracking.study": study, "tracking.variant": variant.name}
            _dvc("exp", "run", "--queue", "-n", name, *override_args(overrides))
            names.append(name)
            print(f"queued {name}")
    return names


def wait_for_queue(jobs: int, poll_s: float = 15.0) -> None:
    """Block until no queued or running experiment is left.

    Workers can exit with tasks still queued (a `dvc queue stop` issued earlier reaches the
    next workers too): then start them again.
    """
    while True:
        status = _dvc("queue", "status")
        active = [line for line in status.splitlines() if re.search(r"\b(Queued|Running)\b", line)]
        if not active:
            return
        workers = re.search(r"Worker status: (\d+) active, (\d+) idle", status)
        if workers and workers.groups() == ("0", "0"):
            print("no queue worker is left; starting them again")
            _dvc("queue", "start", "-j", str(jobs))
        print(f"{time.strftime('%H:%M:%S')} {len(active)} experiment(s) queued or running")
        time.sleep(poll_s)


def run_study(args: argparse.Namespace) -> Path:
    from fmnist_crnn import tracking
    from fmnist_crnn.config import load_params

    study = args.study or datetime.now(UTC).strftime("study-%Y%m%d-%H%M")
    variants = [ALL_VARIANTS[name] for name in args.variants]
    base_seed = args.first_seed if args.first_seed is not None else load_params(
        "params.yaml").train.seed
    seeds = [base_seed + i for i in range(args.seeds)]
    extra: dict[str, Any] = {}
    if args.epochs:
        extra["train.epochs"] = args.epochs
    if args.limit:
        extra["split.limit"] = args.limit
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = yaml.safe_load(value)
    # Create the tracking store and experiment once, before parallel workers race to.
    tracking.configure(load_params("params.yaml").tracking.experiment_name)
    queue_study(study, variants, seeds, extra)
    _dvc("queue", "start", "-j", str(args.jobs))
    wait_for_queue(args.jobs)
    failed = [line.split()[1] for line in _dvc("queue", "status").splitlines()
              if re.search(r"\bFailed\b", line) and f" {study}-" in f" {line.split()[1]}"]
    path = compare(study, Path(args.out))
    if failed:
        raise RuntimeError(f"{len(failed)} experiment(s) failed: {', '.join(failed)}; see "
                           "`dvc queue logs <name>`. The comparison holds the others.")
    return path


# ---------------------------------------------------------------------------------------------
# Comparing


@dataclass
class Row:
    variant: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs if r.get(key) is not None]


def collect_experiments(study: str, exp_show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten ``dvc exp show --json`` into one record per experiment of ``study``."""
    records = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            # A failed experiment carries an error; a running one reports rev "workspace" with
            # whatever its temporary copy holds: neither has results of its own yet.
            finished = not node.get("error") and not (
                node.get("name") and isinstance(data, dict) and data.get("rev") == "workspace")
            if isinstance(data, dict) and "params" in data and finished:
                record = _record(node, data)
                if record and record["study"] == study:
                    records.append(record)
            for value in node.values():
                if isinstance(value, (dict, list)):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(exp_show)
    unique = {r["name"]: r for r in records}  # one experiment can appear under two baselines
    return sorted(unique.values(), key=lambda r: r["name"])


def _record(node: dict[str, Any], data: dict[str, Any]) -> dict[str, Any] | None:
    params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
    tracking_params = params.get("tracking") or {}
    metrics = data.get("metrics") or {}
    test = (metrics.get("metrics/test.json") or {}).get("data") or {}
    train = (metrics.get("metrics/train.json") or {}).get("data") or {}
    if not tracking_params.get("study") or "accuracy" not in test:
        return None
    return {
        "name": node.get("name") or data.get("name") or node.get("rev"),
        "study": tracking_params["study"],
        "variant": tracking_params.get("variant"),
        "seed": (params.get("train") or {}).get("seed"),
        "epochs": (params.get("train") or {}).get("epochs"),
        "limit": (params.get("split") or {}).get("limit"),
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_without_tta": test.get("accuracy_without_tta"),
        "test_loss": test.get("loss"),
        "best_val_acc": train.get("best_val_acc"),
        "params_count": train.get("params_count"),
        "train_seconds": train.get("train_seconds"),
    }


def val_histories(study: str, experiment_name: str,
                  names: set[str]) -> dict[str, list[list[float]]]:
    """Per variant, the validation accuracy per epoch of the MLflow run of each experiment in
    ``names`` (the latest run of that name: an aborted earlier attempt may share it)."""
    import mlflow

    from fmnist_crnn import tracking

    tracking.configure(experiment_name)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=[experiment_name], output_format="list",
                              filter_string=f"tags.study = '{study}'",
                              order_by=["attributes.start_time DESC"])
    histories: dict[str, list[list[float]]] = defaultdict(list)
    seen: set[str] = set()
    for run in runs:
        name = run.data.tags.get("dvc_exp_name")
        if name not in names or name in seen or run.info.status != "FINISHED":
            continue
        seen.add(name)
        points = sorted(client.get_metric_history(run.info.run_id, "val_acc"),
                        key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in points}  # a resumed epoch logged twice counts once
        histories[run.data.tags.get("variant", "?")].append([by_step[s] for s in sorted(by_step)])
    return histories


def beyond_noise(base: list[float], other: list[float]) -> str:
    """Welch's t-test at 5%; needs two or more seeds on both sides."""
    if len(base) < 2 or len(other) < 2:
        return "n/a (1 seed)"
    from scipy.stats import ttest_ind

    if statistics.pstdev(base) == 0 and statistics.pstdev(other) == 0:
        return "yes" if statistics.mean(base) != statistics.mean(other) else "no"
    p = ttest_ind(base, other, equal_var=False).pvalue
    return f"{'yes' if p < 0.05 else 'no'} (p={p:.2f})"


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def comparison_table(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    rows: dict[str, Row] = {}
    for record in records:
        rows.setdefault(record["variant"], Row(record["variant"])).runs.append(record)
        if record.get("test_accuracy_without_tta") is not None:
            # The same runs scored without test-time flips: the row above shows what TTA adds.
            plain = {**record, "test_accuracy": record["test_accuracy_without_tta"],
                     "test_loss": None}
            rows.setdefault(f"{record['variant']} (no TTA)",
                            Row(f"{record['variant']} (no TTA)")).runs.append(plain)
    known = [n for v in ALL_VARIANTS for n in (f"{v} (no TTA)", v)]
    order = [name for name in known if name in rows] + sorted(set(rows) - set(known))
    base = rows.get("baseline")
    base_acc = base.values("test_accuracy") if base else []
    lines = [
        "| variant | change | seeds | test accuracy (%) | test loss | best val acc (%) | "
        "parameters | train time (s) | Δ accuracy vs baseline (points) | beyond seed noise | "
        "Δ vs row above (points) | study reported |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    summary = []
    previous: list[float] = []
    for name in order:
        row = rows[name]
        acc = row.values("test_accuracy")
        variant = ALL_VARIANTS.get(name.removesuffix(" (no TTA)"))
        change = variant.change if variant else "?"
        if name.endswith(" (no TTA)"):
            change += "; scored without TTA"
        elif row.values("test_accuracy_without_tta"):
            change = "+ flip TTA at test (the models of the row above)"
        delta = (statistics.mean(acc) - statistics.mean(base_acc)) * 100 if base_acc else math.nan
        step = (statistics.mean(acc) - statistics.mean(previous)) * 100 if previous else math.nan
        noise = "–" if name == "baseline" or not base_acc else beyond_noise(base_acc, acc)
        params = row.values("params_count")
        lines.append(
            f"| {name} | {change} | {len(row.runs)} | "
            f"{_mean_std(acc, 100)} | {_mean_std(row.values('test_loss'), 1, 4)} | "
            f"{_mean_std(row.values('best_val_acc'), 100)} | "
            f"{int(params[0]):,} | {_mean_std(row.values('train_seconds'), 1, 0)} | "
            f"{'–' if name == 'baseline' or math.isnan(delta) else f'{delta:+.2f}'} | "
            f"{noise} | {'–' if math.isnan(step) else f'{step:+.2f}'} | "
            f"{variant.reported if variant else ''} |"
            if params else f"| {name} | incomplete runs |" + " |" * 10
        )
        summary.append({"variant": name, "runs": row.runs, "delta_points": delta,
                        "beyond_noise": noise, "delta_vs_row_above": step})
        previous = acc
    return lines, summary


def compare(study: str, out_dir: Path, experiment_name: str | None = None) -> Path:
    from fmnist_crnn import plots
    from fmnist_crnn.config import load_params

    experiment_name = experiment_name or load_params("params.yaml").tracking.experiment_name
    # --all-commits: a study queued on an earlier commit stays comparable after new commits.
    records = collect_experiments(study, json.loads(_dvc("exp", "show", "--json",
                                                         "--all-commits")))
    if not records:
        raise RuntimeError(f"no finished experiment of study '{study}' in `dvc exp show`")
    lines, summary = comparison_table(records)
    settings = sorted({(r["epochs"], r["limit"]) for r in records}, key=str)
    out_dir.mkdir(parents=True, exist_ok=True)
    histories = val_histories(study, experiment_name, {r["name"] for r in records})
    plots.save(plots.curves_by_group_figure(histories, "validation accuracy per epoch",
                                            "val accuracy"),
               out_dir / f"{study}_val_acc.png")
    points = {s["variant"]: (statistics.mean(r["params_count"] for r in s["runs"]),
                             statistics.mean(r["test_accuracy"] for r in s["runs"]))
              for s in summary}
    plots.save(plots.scatter_figure(points, "parameters", "test accuracy",
                                    "Test accuracy vs parameters"),
               out_dir / f"{study}_acc_vs_params.png")
    text = "\n".join([
        f"# Study `{study}`",
        "",
        f"Built by `python -m fmnist_crnn.study compare --study {study}` from `dvc exp show "
        f"--json` and the MLflow runs tagged `study={study}`. Settings (epochs, sample limit): "
        f"{', '.join(_setting(e, lim) for e, lim in settings)}. Mean ± standard "
        "deviation over seeds; 'beyond seed noise' is Welch's t-test against the baseline at 5%.",
        "",
        *lines,
        "",
        f"![validation accuracy]({study}_val_acc.png)",
        "",
        f"![accuracy vs parameters]({study}_acc_vs_params.png)",
        "",
    ])
    path = out_dir / f"{study}.md"
    atomic_write_text(path, text)
    atomic_write_json(out_dir / f"{study}.json", summary)
    print("\n".join(lines))
    return path


def _setting(epochs: int, limit: int | None) -> str:
    return f"{epochs} epochs, " + ("all images" if limit is None else f"first {limit} images")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fmnist_crnn.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="queue the variants, run the queue, then compare")
    run.add_argument("--variants", nargs="+", default=list(VARIANTS),
                     choices=list(ALL_VARIANTS),
                     help="default: the study's ablations; the recipe's steps are "
                     f"{', '.join(RECIPE_VARIANTS)}")
    run.add_argument("--seeds", type=int, default=1, help="seeds per variant (train.seed + i)")
    run.add_argument("--first-seed", type=int,
                     help="first seed (default train.seed); to add seeds to an existing study")
    run.add_argument("--epochs", type=int, help="override train.epochs (cheap mode)")
    run.add_argument("--limit", type=int, help="override split.limit (cheap mode)")
    run.add_argument("--jobs", type=int, default=1, help="parallel DVC queue workers")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra override for every run, e.g. train.num_threads=1")
    run.add_argument("--study", help="study id (default: study-<UTC time>)")
    run.add_argument("--out", default="reports/study")
    cmp_ = sub.add_parser("compare", help="rebuild the comparison of a finished study")
    cmp_.add_argument("--study", required=True)
    cmp_.add_argument("--out", default="reports/study")
    lst = sub.add_parser("commands", help="print the one-line command for each variant")
    lst.add_argument("--epochs", type=int)
    recipe = sub.add_parser("recipe", help="run a recipe as one named DVC experiment in the "
                            "workspace (`dvc exp run -n best -S ...`): best (accuracy) or fast "
                            "(time to accuracy)")
    recipe.add_argument("recipe", choices=list(RECIPES))
    recipe.add_argument("--seed", type=int, help="train.seed (default: params.yaml's)")
    recipe.add_argument("--name", help="experiment name (default: the recipe's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run_study(args)
        elif args.command == "compare":
            compare(args.study, Path(args.out))
        elif args.command == "recipe":
            extra = {"train.seed": args.seed} if args.seed is not None else {}
            words = ["exp", "run", "-n", args.name or args.recipe,
                     *override_args({**RECIPES[args.recipe], **extra})]
            print("dvc " + " ".join(words), flush=True)
            _dvc(*words, capture=False)
        else:
            extra = {"train.epochs": args.epochs} if args.epochs else {}
            for variant in ALL_VARIANTS.values():
                overrides = scale_to_epochs(variant.overrides, args.epochs)
                print(f"{variant.name:12s} "
                      f"{variant_command(Variant(variant.name, '', overrides, ''), extra)}")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
