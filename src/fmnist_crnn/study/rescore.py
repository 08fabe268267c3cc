"""``python -m fmnist_crnn.study rescore``: a finished study's models scored again on the test
set with other test-time views (``evaluate.*``), without training them again.

The evaluate keys do not touch the weights, so the runs of a recipe that differs from another
only in them are the other's runs scored again: ``dvc repro`` re-runs only the evaluate stage
when one changes. Runs recorded before the code changed cannot take that path (their train
stage's code hashes differ), and training them again would reproduce the same weights at hours
of CPU. Here each record's model and test images come from its own experiment commit
(``rev``) through DVC's cache, so the experiment refs and the cache must be on this machine.

The new record keeps the training's fields (``train_seconds``, its reference times, the
per-epoch history, ``rev``) and names its source in ``rescored_from``; the source's score of
the image alone is computed again and must match its record to the digit, or the model fetched
is not the one recorded and nothing is written.
"""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fmnist_crnn import data
from fmnist_crnn.errors import ProjectError
from fmnist_crnn.files import atomic_write_json
from fmnist_crnn.study import records

MODEL = "models/model.pt"
TEST_SPLIT = "data/split/test.pt"


def rescored_name(name: str, source: str, study: str) -> str:
    """``best-60k-s42`` of study ``best-60k`` becomes ``best-60k-tta-s42`` of study
    ``best-60k-tta``; a name that does not start with its study's is prefixed."""
    return f"{study}{name.removeprefix(source)}" if name.startswith(source) else f"{study}-{name}"


def evaluate_section(record: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The record's evaluate section with ``overrides`` (``evaluate.KEY``: value), checked as
    in params.yaml; any other key is an error: it would need new training runs."""
    from fmnist_crnn.config import section_from_dict

    others = sorted(k for k in overrides if not k.startswith("evaluate."))
    if others:
        raise ProjectError(f"rescore changes evaluate.* keys only, got {', '.join(others)}: "
                           "a change to the data or the training needs new runs (`run`, "
                           "`make seeds`)")
    if not overrides:
        raise ProjectError("rescore needs at least one --set evaluate.KEY=VALUE")
    raw = {**(record.get("params") or {}).get("evaluate", {}),
           **{k.removeprefix("evaluate."): v for k, v in overrides.items()}}
    return section_from_dict("evaluate", raw)


def file_at_rev(path: str, rev: str, to: Path) -> Path:
    """A DVC-tracked file as it was in commit ``rev`` (an experiment's), from the cache,
    copied to ``to``."""
    import dvc.api

    try:
        with dvc.api.open(path, rev=rev, mode="rb") as f:
            to.write_bytes(f.read())
        return to
    except Exception as exc:  # dvc raises several kinds; the message names what is missing
        raise ProjectError(f"{path} at {rev[:12]}: not readable from this repository's DVC "
                           f"cache ({type(exc).__name__}: {exc}); rescore needs the "
                           "experiment's commit and outputs on this machine") from None


def rescore_record(record: dict[str, Any], evaluate: Any, source: str, study: str,
                   device: Any) -> dict[str, Any]:
    """The new record of one run: its model scored with the ``evaluate`` section."""
    from fmnist_crnn.evaluate import test_metrics
    from fmnist_crnn.model import load_model

    rev, name = record.get("rev"), record["name"]
    if not rev:
        raise ProjectError(f"{name}: its record names no experiment commit ('rev'), so its "
                           "model cannot be found")
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(file_at_rev(MODEL, rev, Path(tmp) / "model.pt"), device)
        file_at_rev(TEST_SPLIT, rev, Path(tmp) / "test.pt")
        images, labels = data.load_split(Path(tmp), "test")
    batch_size = (record["params"].get("train") or {}).get("batch_size", 128)
    metrics, _ = test_metrics(model, images, labels, batch_size, device, f"Rescoring {name}",
                              evaluate.tta_hflip, evaluate.tta_shift, evaluate.tta_moves)
    alone = metrics.get("accuracy_without_tta", metrics["accuracy"])
    recorded = record.get("test_accuracy_without_tta")
    if recorded is not None and round(alone, 4) != round(recorded, 4):
        raise ProjectError(f"{name}: the model at {rev[:12]} scores {alone:.4f} on the image "
                           f"alone, its record {recorded:.4f}: not the recorded model")
    variant = study if record.get("variant") == source else record.get("variant")
    params = {**record["params"], "evaluate": dataclasses.asdict(evaluate),
              "tracking": {**(record["params"].get("tracking") or {}),
                           "study": study, "variant": variant}}
    return {
        **record,
        "name": rescored_name(name, source, study), "study": study, "variant": variant,
        "params": params, "test_accuracy": metrics["accuracy"],
        "test_accuracy_without_tta": metrics.get("accuracy_without_tta"),
        "test_loss": metrics["loss"], "test_macro_f1": metrics["macro_f1"],
        "rescored_from": name, "mlflow_run_id": None,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def rescore(out_dir: Path, source: str, study: str, overrides: dict[str, Any],
            device_name: str = "auto") -> list[Path]:
    """Write a rescored record for each record of ``source`` that has none in ``study``."""
    from fmnist_crnn.distributed import select_device

    if study == source:
        raise ProjectError(f"--study must differ from --from ({source}): the records of "
                           "a study are never rewritten")
    sources = records.read_records(out_dir, source)
    if not sources:
        raise ProjectError(f"{records.runs_dir(out_dir, source)}: no records of study "
                           f"'{source}' to rescore")
    device = select_device(device_name)
    written = []
    for record in sources:
        evaluate = evaluate_section(record, overrides)
        path = records.runs_dir(out_dir, study) / (
            rescored_name(record["name"], source, study) + ".json")
        if path.exists():
            continue
        new = rescore_record(record, evaluate, source, study, device)
        atomic_write_json(path, new)
        print(f"recorded {new['name']}: {new['test_accuracy']:.2%} (was "
              f"{record['test_accuracy']:.2%})", flush=True)
        written.append(path)
    return written
