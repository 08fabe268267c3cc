"""Variants and recipes, read from the YAML files beside this module, and the `dvc exp run`
arguments that run them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    name: str
    change: str
    overrides: dict[str, Any]
    reported: str = ""  # what the course report says about it


def _load(name: str) -> Any:
    return yaml.safe_load((HERE / name).read_text())


def load_variants() -> dict[str, Variant]:
    return {name: Variant(name, entry["change"], dict(entry.get("overrides") or {}),
                          str(entry.get("reported", "")))
            for name, entry in _load("variants.yaml").items()}


def load_ladder() -> tuple[int, dict[str, Variant]]:
    """The recipe's epoch count and its cumulative steps, in order."""
    spec = _load("recipes.yaml")
    steps, overrides = {}, {}
    for step in spec["steps"]:
        overrides = {**overrides, **step["overrides"]}
        steps[step["name"]] = Variant(step["name"], step["change"], overrides)
    return spec["epochs"], steps


VARIANTS = load_variants()
RECIPE_EPOCHS, RECIPE_VARIANTS = load_ladder()
RECIPE = RECIPE_VARIANTS["ema-clip"].overrides  # the ladder's last step


def scale_to_epochs(overrides: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """The recipe's warmup is a share of its epochs: keep that share when epochs change."""
    if not epochs or "train.warmup_epochs" not in overrides:
        return overrides
    share = overrides["train.warmup_epochs"] / overrides.get("train.epochs", RECIPE_EPOCHS)
    return {**overrides, "train.warmup_epochs": round(share * epochs, 3)}


def _recipes(section: str, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Named recipes: a ladder step or another named recipe (``recipe:``, defined above it or
    in ``known``), optionally on another epoch count, plus overrides."""
    recipes: dict[str, dict[str, Any]] = {}
    for name, spec in _load("recipes.yaml")[section].items():
        if "recipe" in spec:
            overrides = {**known, **recipes}[spec["recipe"]]
        else:
            overrides = RECIPE_VARIANTS[spec["step"]].overrides
        if spec.get("epochs"):
            overrides = {**scale_to_epochs(overrides, spec["epochs"]),
                         "train.epochs": spec["epochs"]}
        recipes[name] = {**overrides, **(spec.get("overrides") or {})}
    return recipes


# The current recipes (best, fast, fast-60k, best-60k-42ep), then the archive of earlier
# steps: both run as `recipe NAME` and as study variants (`make seeds RECIPE=NAME`).
CURRENT_RECIPES = _recipes("recipes", {})
RECIPES = {**CURRENT_RECIPES, **_recipes("archive", CURRENT_RECIPES)}
# Everything a study can run: the ablations, the ladder's steps and the named recipes; a study
# of the ladder sets one epoch count for all its steps (`make ingredients EPOCHS=...`).
ALL_VARIANTS = {**VARIANTS, **RECIPE_VARIANTS,
                **{name: Variant(name, f"recipe `{name}`", overrides)
                   for name, overrides in RECIPES.items()}}
assert len(ALL_VARIANTS) == len(VARIANTS) + len(RECIPE_VARIANTS) + len(RECIPES), \
    "a recipe, a ladder step and an ablation variant must not share a name"


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


def run_overrides(variant: Variant, seed: int, study: str,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """Everything one queued run of a study sets: the variant, the study's extras, the seed
    and the tags that find it again."""
    return {**scale_to_epochs(variant.overrides, extra.get("train.epochs")), **extra,
            "train.seed": seed, "tracking.study": study, "tracking.variant": variant.name}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden_dim": 128}}`` -> ``{"model.hidden_dim": 128}``, as runs log them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def baseline_resets(committed: dict[str, Any], workspace: dict[str, Any]) -> dict[str, Any]:
    """The ``-S`` overrides that put ``workspace`` params back to ``committed`` ones: every key
    whose value differs (a recipe run in the workspace leaves its values in params.yaml), so a
    variant or recipe is built on the committed baseline, whatever the last command left."""
    old, new = flatten(committed), flatten(workspace)
    return {key: value for key, value in old.items() if new.get(key, object()) != value}


def committed_resets(repo: Path) -> dict[str, Any]:
    """``baseline_resets`` of ``repo``'s params.yaml against its HEAD commit ({} outside git)."""
    import subprocess

    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        return {}
    return baseline_resets(yaml.safe_load(shown.stdout),
                           yaml.safe_load((repo / "params.yaml").read_text()))
