"""The study: variants and recipes as YAML data (catalog), the DVC queue driver (queue), one
committed record per finished run (records), and the comparison built from them (compare).
``python -m fmnist_crnn.study --help`` is the command line."""

from fmnist_crnn.study.catalog import (
    ALL_VARIANTS,
    RECIPE,
    RECIPE_EPOCHS,
    RECIPE_VARIANTS,
    RECIPES,
    VARIANTS,
    Variant,
    experiment_name,
    override_args,
    run_overrides,
    scale_to_epochs,
    variant_command,
)
from fmnist_crnn.study.comparison import compare, comparison_table, holm, missing_runs
from fmnist_crnn.study.records import collect_experiments, read_records

__all__ = [
    "ALL_VARIANTS", "RECIPE", "RECIPE_EPOCHS", "RECIPE_VARIANTS", "RECIPES", "VARIANTS",
    "Variant", "collect_experiments", "compare", "comparison_table", "holm",
    "experiment_name", "missing_runs", "override_args", "read_records", "run_overrides",
    "scale_to_epochs", "variant_command",
]
