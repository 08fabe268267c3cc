"""``make verify``: this checkout's metrics against the committed ones.

Each committed metric of the default run is compared with the workspace's (after `dvc repro`):
``identical`` when equal to the last bit, ``pass`` when within the tolerance, ``FAIL``
otherwise (exit 1). The tolerance is measured, not typed in: three standard deviations over the
seeds of the study's baseline (the committed run records of ``reports/study/runs/<study>/``,
at least three seeds), because that is how far two correct runs of this pipeline can differ
when anything in their arithmetic differs (another CPU or vector ISA, thread count, package
version). The environments of both runs are printed beside, so a difference can be explained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from fmnist_crnn.study.records import read_records

# (file, key in the file, key in a study record)
METRICS = (
    ("metrics/test.json", "accuracy", "test_accuracy"),
    ("metrics/test.json", "loss", "test_loss"),
    ("metrics/test.json", "macro_f1", "test_macro_f1"),
    ("metrics/train.json", "best_val_acc", "best_val_acc"),
)
EXACT = (("metrics/train.json", "params_count"),)  # the architecture: never varies
ENVIRONMENT = "models/environment.json"
SIGMAS = 3
MIN_SEEDS = 3


def committed(path: str, rev: str) -> dict[str, Any]:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} is not committed at {rev}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def tolerances(study_dir: Path, study: str, variant: str) -> tuple[dict[str, float], int]:
    runs = [r for r in read_records(study_dir, study) if r["variant"] == variant]
    if len(runs) < MIN_SEEDS:
        raise RuntimeError(f"the tolerance needs {MIN_SEEDS} or more recorded seeds of "
                           f"'{variant}' in {study_dir / 'runs' / study}; found {len(runs)}")
    return {key: SIGMAS * statistics.stdev(r[key] for r in runs)
            for _, _, key in METRICS}, len(runs)


def compare(rev: str, study_dir: Path, study: str, variant: str) -> tuple[list[list[str]], bool]:
    tol, seeds = tolerances(study_dir, study, variant)
    rows, ok = [], True
    files: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for path in {m[0] for m in METRICS} | {m[0] for m in EXACT}:
        files[path] = (committed(path, rev), json.loads(Path(path).read_text()))
    for path, key, record_key in METRICS:
        ref, now = files[path][0][key], files[path][1][key]
        diff = abs(now - ref)
        verdict = "identical" if now == ref else ("pass" if diff <= tol[record_key] else "FAIL")
        ok &= verdict != "FAIL"
        rows.append([f"{path}:{key}", f"{ref:.6f}", f"{now:.6f}", f"{diff:.6f}",
                     f"{tol[record_key]:.6f}", verdict])
    for path, key in EXACT:
        ref, now = files[path][0][key], files[path][1][key]
        verdict = "identical" if now == ref else "FAIL"
        ok &= verdict != "FAIL"
        rows.append([f"{path}:{key}", str(ref), str(now), str(abs(now - ref)), "0", verdict])
    print(f"Tolerance: {SIGMAS} standard deviations over {seeds} seeds of '{variant}' "
          f"(reports/study/runs/{study}/).")
    return rows, ok


def environment_diff(rev: str) -> list[str]:
    try:
        ref = committed(ENVIRONMENT, rev)
        now = json.loads(Path(ENVIRONMENT).read_text())
    except (RuntimeError, OSError, json.JSONDecodeError) as exc:
        return [f"environment not compared: {exc}"]
    keys = sorted(set(ref) | set(now))
    return [f"  {k}: committed {ref.get(k)!r}, this run {now.get(k)!r}"
            for k in keys if ref.get(k) != now.get(k)]


def table(rows: list[list[str]]) -> str:
    header = ["metric", "committed", "this run", "|difference|", "tolerance", "verdict"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [header, *rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fmnist_crnn.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="the commit whose metrics are the reference")
    p.add_argument("--study-dir", type=Path, default=Path("reports/study"))
    p.add_argument("--study", default="ablation")
    p.add_argument("--variant", default="baseline")
    args = p.parse_args(argv)
    try:
        rows, ok = compare(args.rev, args.study_dir, args.study, args.variant)
    except (RuntimeError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(table(rows))
    diff = environment_diff(args.rev)
    print("Environment: " + ("the same as the committed run's." if not diff
                             else "differs from the committed run's:\n" + "\n".join(diff)))
    print("verify: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
