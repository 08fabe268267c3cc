"""A tracked run's fixed cost: one slice `dvc exp run`, stage by stage, and what it spends
outside training.

For each tree (this working tree, and ``--against REV`` when given: the same benchmark on that
commit, in the same invocation) it builds a fresh git + DVC repository with the pipeline on a
slice (``--limit`` images, ``--epochs`` epochs), runs `dvc repro split` untimed (a study's runs
find the data stages done), then times ``--runs`` slice runs, each
`dvc exp run -S train.seed=N` as the study runs a variant: validate, train, evaluate, report
with the MLflow run, the logged model and its registration in the repository's SQLite store.

Per stage it prints the wall seconds as DVC ran it and, where the tree has the stages' timing
hook (FMNIST_CRNN_TIMINGS, fmnist_crnn.timings), their shares: the interpreter and imports,
MLflow's import, opening the MLflow run, the training loop (train_seconds), the wait for the
journal at the end, and the rest of the stage's own work (model logging and registration, sent
by the journal's thread beside that work, are shown apart: the part the stage waited for is in
the wait at the end); DVC's own time (starting, hashing and caching outputs, the lock) is the
stage's wall less its process. The total outside training is the run's wall less
train_seconds. A benchmark, not a test.

    PYTHONPATH=src python benchmarks/overhead.py --against HEAD~1 --out reports/bench/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fmnist_crnn.environment import cpu_model
from fmnist_crnn.testing.repository import init_like_a_clone, sh

REPO = Path(__file__).resolve().parents[1]
COPIED = (".dvc/config", "dvc.yaml", "params.yaml", "stages", "src", ".gitignore", ".dvcignore",
          "MLproject", "python_env.yaml")
STAGE_LINE = re.compile(r"Running stage '(\w+)'")
SHARES = ("startup_s", "mlflow_import", "mlflow_open", "model_logging", "registration",
          "mlflow_wait_at_end")


def project_tree(rev: str | None, into: Path) -> Path:
    """This working tree's files, or commit ``rev``'s (git archive), under ``into``."""
    into.mkdir(parents=True)
    if rev is None:
        for item in COPIED:
            src = REPO / item
            if src.exists():
                (into / item).parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy)(src, into / item)
        return into
    archive = subprocess.run(["git", "archive", rev, *COPIED], cwd=REPO, capture_output=True,
                             check=True).stdout
    # The tar program unpacks it: Python's own needs its "data" filter, which Debian 12's
    # Python 3.11.2 lacks (3.11.4+).
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def make_repo(tree: Path, repo: Path, env: dict[str, str], limit: int, epochs: int) -> None:
    shutil.copytree(tree, repo, ignore=shutil.ignore_patterns(".dvc"))  # `dvc init` makes it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["limit"] = limit
    params["train"]["epochs"] = epochs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    dvc = [sys.executable, "-m", "dvc"]
    init_like_a_clone(repo, env, project=tree)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "benchmark"], repo, env)
    sh([*dvc, "repro", "split"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "data"], repo, env)


def timed_run(repo: Path, env: dict[str, str], seed: int, log: Path) -> dict:
    """One `dvc exp run -S train.seed=SEED`: each stage's wall from DVC's own lines."""
    timings_file = log.with_suffix(".jsonl")
    timings_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "-n", f"bench-s{seed}", "-S",
           f"train.seed={seed}"]
    started = time.monotonic()
    marks: list[tuple[str, float]] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env={**env, "FMNIST_CRNN_TIMINGS":
                                                    str(timings_file)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            if match := STAGE_LINE.search(line):
                marks.append((match.group(1), time.monotonic() - started))
        status = proc.wait()
    total = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status}); see {log}")
    ends = [t for _, t in marks[1:]] + [total]
    walls = {name: end - start for (name, start), end in zip(marks, ends, strict=True)}
    stages = {name: {"wall_s": round(wall, 3)} for name, wall in walls.items()}
    if timings_file.exists():
        for line in timings_file.read_text().splitlines():
            measured = json.loads(line)
            stage = stages.get(measured.pop("stage"))
            if stage is not None:
                measured.pop("pid", None)
                stage.update(measured)
    train = json.loads((repo / "metrics/train.json").read_text())
    return {"total_s": round(total, 3), "dvc_start_s": round(marks[0][1] if marks else total, 3),
            "train_seconds": train["train_seconds"],
            "outside_training_s": round(total - train["train_seconds"], 3), "stages": stages}


def shares(stage: dict, train_seconds: float | None) -> dict[str, float]:
    """The stage's wall split into named shares; ``other`` is its own remaining work."""
    if "main_s" not in stage:
        return {}
    out = {k: stage.get(k, 0.0) for k in SHARES}
    out["training"] = train_seconds or 0.0
    process = stage["startup_s"] + stage["main_s"]
    # Model logging and registration run in the journal's sender thread, beside the stage's
    # own work; what of them the stage waited for is in mlflow_wait_at_end.
    on_main = ("mlflow_import", "mlflow_open", "mlflow_wait_at_end", "training")
    out["other"] = stage["main_s"] - sum(out[k] for k in on_main)
    out["dvc"] = stage["wall_s"] - process
    return {k: round(v, 2) for k, v in out.items()}


def median_run(runs: list[dict]) -> dict:
    """The run with the median time outside training (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["outside_training_s"])[len(runs) // 2]


def print_table(label: str, run: dict) -> None:
    columns = ("startup_s", "mlflow_import", "mlflow_open", "training", "model_logging",
               "registration", "mlflow_wait_at_end", "other", "dvc")
    print(f"\n{label}: {run['total_s']:.1f} s in all, {run['train_seconds']:.1f} s training, "
          f"{run['outside_training_s']:.1f} s outside training "
          f"(DVC's start {run['dvc_start_s']:.1f} s)")
    print(f"| stage | wall | {' | '.join(c.removesuffix('_s') for c in columns)} |")
    print("|---" * (len(columns) + 2) + "|")
    for name, stage in run["stages"].items():
        split = shares(stage, run["train_seconds"] if name == "train" else None)
        cells = [f"{split[c]:.2f}" if c in split else "" for c in columns]
        print(f"| {name} | {stage['wall_s']:.2f} | {' | '.join(cells)} |")


def prepare(label: str, rev: str | None, root: Path, args, env: dict[str, str]) -> Path:
    tree = project_tree(rev, root / f"tree-{label}")
    repo = root / f"repo-{label}"
    make_repo(tree, repo, env, args.limit, args.epochs)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="also time this commit (e.g. HEAD~1), same invocation")
    parser.add_argument("--limit", type=int, default=6000, help="images of the slice")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tree (median)")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/overhead.json")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", GIT_AUTHOR_NAME="bench",
               GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@localhost")
    trees = {"current": None}
    if args.against:
        trees = {"against": args.against, **trees}
    with tempfile.TemporaryDirectory(prefix="fmnist-overhead-") as tmp:
        root = Path(tmp)
        repos = {key: prepare(key, rev, root, args, env) for key, rev in trees.items()}
        runs: dict[str, list[dict]] = {key: [] for key in trees}
        # Alternating, so that neither tree gets the machine's cold or warm moments alone.
        for i in range(args.runs):
            for key, repo in repos.items():
                runs[key].append(timed_run(repo, env, 43 + i, root / f"{key}-{i}.log"))
    results = {key: {"rev": rev or "working tree", "runs": runs[key],
                     "median": median_run(runs[key])} for key, rev in trees.items()}
    for key, result in results.items():
        print_table(f"{key} ({result['rev']}), median of {len(result['runs'])}",
                    result["median"])
    if "against" in results:
        before = results["against"]["median"]["outside_training_s"]
        after = results["current"]["median"]["outside_training_s"]
        print(f"\noutside training: {before:.1f} s -> {after:.1f} s ({before / after:.2f}x less)")
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_model(),
                          "cores": os.cpu_count()},
              "limit": args.limit, "epochs": args.epochs, **results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
