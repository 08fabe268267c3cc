"""The comparison of a study: mean ± std over seeds, the difference to the baseline with
Welch's t-test (and Holm's correction for testing many variants against one baseline), the
course report's number beside ours; Markdown, JSON and two figures, built
from the committed run records alone."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_crnn.files import atomic_write_json, atomic_write_text
from fmnist_crnn.study.catalog import ALL_VARIANTS, RECIPE_VARIANTS
from fmnist_crnn.study.records import read_plan, read_records, reference_ratio


@dataclass
class Row:
    variant: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs if r.get(key) is not None]


def welch_p(base: list[float], other: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None with fewer than two seeds on a side."""
    if len(base) < 2 or len(other) < 2:
        return None
    if statistics.pstdev(base) == 0 and statistics.pstdev(other) == 0:
        return 1.0 if statistics.mean(base) == statistics.mean(other) else 0.0
    from scipy.stats import ttest_ind

    return float(ttest_ind(base, other, equal_var=False).pvalue)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: with m variants each tested against the baseline,
    an adjusted p below 5% keeps the chance of any false "yes" in the table under 5%."""
    adjusted, running = {}, 0.0
    ranked = sorted(p_values.items(), key=lambda item: item[1])
    for i, (name, p) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - i) * p))
        adjusted[name] = running
    return adjusted


def verdict(p: float | None) -> str:
    """"yes" below 5%; a test needs two or more seeds on both sides."""
    if p is None:
        return "n/a (1 seed)"
    return f"{'yes' if p < 0.05 else 'no'} (p={p:.2f})"


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def tta_change(record: dict[str, Any]) -> str:
    """What the run's evaluate stage averaged, from its recorded parameters."""
    evaluate = (record.get("params") or {}).get("evaluate") or {}
    shift, hflip = evaluate.get("tta_shift", 0), evaluate.get("tta_hflip", True)
    if not shift:
        return "flip TTA at test"
    moves = evaluate.get("tta_moves", "cross")
    pixels = f"{shift} pixel{'s' if shift > 1 else ''}"
    moved, places = {
        "cross": (f"its moves by {pixels} up, down, left and right", 5),
        "diamond": (f"its moves of up to {pixels} in all", 2 * shift * (shift + 1) + 1),
        "square": (f"its moves of up to {pixels} each way", (2 * shift + 1) ** 2),
    }[moves]
    every = "five" if places == 5 else f"{places}"
    return (f"TTA at test: the image, {moved}"
            + (f", and the mirrors of all {every} ({2 * places} views)"
               if hflip else f" ({places} views)"))


def _rows(records: list[dict[str, Any]]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for record in records:
        rows.setdefault(record["variant"], Row(record["variant"])).runs.append(record)
        if record.get("test_accuracy_without_tta") is not None:
            # The same runs scored without test-time flips: the row above shows what TTA adds.
            plain = {**record, "test_accuracy": record["test_accuracy_without_tta"],
                     "test_loss": None}
            rows.setdefault(f"{record['variant']} (no TTA)",
                            Row(f"{record['variant']} (no TTA)")).runs.append(plain)
    return rows


def ratio_range(runs: list[dict[str, Any]]) -> str:
    """``1.02x-1.10x`` over the runs that carry a reference, ``–`` when none does."""
    ratios = sorted(r for r in map(reference_ratio, runs) if r is not None)
    if not ratios:
        return "–"
    low, high = f"{ratios[0]:.2f}x", f"{ratios[-1]:.2f}x"
    return low if low == high else f"{low}-{high}"


def comparison_table(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = _rows(records)
    known = [n for v in ALL_VARIANTS for n in (f"{v} (no TTA)", v)]
    order = [name for name in known if name in rows] + sorted(set(rows) - set(known))
    base = rows.get("baseline")
    base_acc = base.values("test_accuracy") if base else []
    # "Δ vs row above" reads a ladder of cumulative steps; between ablations it means nothing.
    ladder = all(n.removesuffix(" (no TTA)") in RECIPE_VARIANTS or n == "baseline"
                 for n in order)
    p_values = {name: welch_p(base_acc, rows[name].values("test_accuracy"))
                for name in order if name != "baseline" and base_acc}
    tested = {name: p for name, p in p_values.items() if p is not None}
    adjusted = holm(tested) if len(tested) > 1 else {}
    holm_header = f"after Holm ({len(tested)} tests)"
    # Each run's time over the shorter of the default run's times around it, when recorded.
    timed = any(reference_ratio(r) is not None for r in records)
    header = ["variant", "change", "seeds", "test accuracy (%)", "test loss",
              "best val acc (%)", "parameters", "train time (s)",
              *(["x the default run"] if timed else []),
              "Δ accuracy vs baseline (points)", "beyond seed noise",
              *([holm_header] if adjusted else []),
              *(["Δ vs row above (points)"] if ladder else []), "study reported"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in ("variant", "change", "beyond seed noise",
                                          holm_header, "study reported")
                            else "---:" for h in header) + "|"]
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
            change = f"+ {tta_change(row.runs[0])} (the models of the row above)"
        delta = (statistics.mean(acc) - statistics.mean(base_acc)) * 100 if base_acc else math.nan
        step = (statistics.mean(acc) - statistics.mean(previous)) * 100 if previous else math.nan
        is_base = name == "baseline" or not base_acc
        noise = "–" if is_base else verdict(p_values[name])
        holm_cell = "–" if is_base else verdict(adjusted.get(name))
        params = row.values("params_count")
        cells = [name, change, len(row.runs), mean_std(acc, 100),
                 mean_std(row.values("test_loss"), 1, 4),
                 mean_std(row.values("best_val_acc"), 100),
                 f"{int(params[0]):,}" if params else "?",
                 mean_std(row.values("train_seconds"), 1, 0),
                 *([ratio_range(row.runs)] if timed else []),
                 "–" if is_base or math.isnan(delta) else f"{delta:+.2f}", noise,
                 *([holm_cell] if adjusted else []),
                 *(["–" if math.isnan(step) else f"{step:+.2f}"] if ladder else []),
                 variant.reported if variant else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        summary.append({"variant": name, "runs": row.runs, "delta_points": delta,
                        "p_value": None if is_base else p_values[name],
                        "p_value_holm": adjusted.get(name), "beyond_noise": noise,
                        "beyond_noise_holm": None if is_base or not adjusted else holm_cell,
                        "delta_vs_row_above": step})
        previous = acc
    return lines, summary


def missing_runs(plan: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    done = {r["name"] for r in records}
    return sorted(name for name in plan.get("runs", {}) if name not in done)


def compare(study: str, out_dir: Path) -> Path:
    """Write ``<out>/<study>.md``, ``.json`` and two figures from the study's run records."""
    from fmnist_crnn import plots

    records = read_records(out_dir, study)
    if not records:
        raise RuntimeError(f"no run record of study '{study}' in {out_dir / 'runs' / study}; "
                           f"run `python -m fmnist_crnn.study collect --study {study}` after "
                           "its experiments finish")
    missing = missing_runs(read_plan(out_dir, study), records)
    lines, summary = comparison_table(records)
    settings = sorted({(r["epochs"], r["limit"]) for r in records}, key=str)
    histories: dict[str, list[list[float]]] = {}
    for record in records:
        curve = (record.get("history") or {}).get("val_acc")
        if curve:
            histories.setdefault(record["variant"], []).append(curve)
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
        f"Built by `python -m fmnist_crnn.study compare --study {study}` from the run records "
        f"in `runs/{study}/` (one JSON file per finished run: its params, metrics, per-epoch "
        f"history and environment). Settings (epochs, sample limit): "
        f"{', '.join(_setting(e, lim) for e, lim in settings)}. Mean ± standard "
        "deviation over seeds; 'beyond seed noise' is Welch's t-test against the baseline at 5%; "
        "'after Holm' adjusts those p-values for the number of variants tested (Holm's "
        "step-down method), so that all the table's 'yes' together are wrong with at most 5% "
        "probability.",
        "",
        f"Runs recorded: {len(records)}. "
        + (f"**Missing ({len(missing)}): {', '.join(missing)}.**" if missing
           else "Missing: none of the planned runs."),
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
    atomic_write_json(out_dir / f"{study}.json", {"study": study, "missing": missing,
                                                  "variants": summary})
    print("\n".join(lines))
    if missing:
        print(f"missing ({len(missing)}): {', '.join(missing)}")
    return path


def _setting(epochs: int, limit: int | None) -> str:
    return f"{epochs} epochs, " + ("all images" if limit is None else f"first {limit} images")
