"""The train stage's run: resume or start the tracked run, fit, summarize, write the outputs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fmnist_crnn import data, distributed, plots, tracking
from fmnist_crnn.config import Params, to_dict, to_flat_dict
from fmnist_crnn.distributed import select_device
from fmnist_crnn.environment import environment_info
from fmnist_crnn.evaluate import (
    accuracy,
    classification_metrics,
    confusion,
    predict_logits,
    predict_logits_and_tta,
)
from fmnist_crnn.files import atomic_write_json
from fmnist_crnn.history import (
    MILESTONE_KEYS,
    MILESTONES,
    LiveHistory,
    seconds_to_accuracy,
    write_history,
)
from fmnist_crnn.model import CRNN, count_parameters, save_model
from fmnist_crnn.train import Dataset, FitResult, fit


def fingerprint(params: Params, data_digest: str) -> str:
    """Identifies what a checkpoint was trained on and with, so only a matching run resumes.
    The data digest stands for the split's parameters."""
    relevant = {k: v for k, v in to_dict(params).items() if k in ("model", "train", "augment")}
    payload = json.dumps({"params": relevant, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_resume_state(path: Path | None, expected_fingerprint: str) -> dict[str, Any] | None:
    """The last checkpoint when it belongs to this exact configuration, else None."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint we cannot read is no reason to stop: start over
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        print(f"{path} was written for other parameters or data; training starts over")
        return None
    if state.get("epoch", 0) >= state.get("epochs", float("inf")):
        return None  # a finished run: a new `dvc repro` of this stage trains afresh
    if state.get("run_id") and not tracking.run_exists(state["run_id"]):
        print(f"warning: {path} names MLflow run {state['run_id']}, which is not in the "
              "tracking store; training starts over in a new run")
        return None
    return state


def _resume_of_main(checkpoint_path: Path, ctx: distributed.Context) -> dict[str, Any] | None:
    """The checkpoint the main process resumes from, or None when it starts afresh."""
    resumed = distributed.broadcast_object(None, ctx)
    return torch.load(checkpoint_path, map_location="cpu", weights_only=True) if resumed else None


def run_training(
    params: Params,
    split_dir: Path,
    model_path: Path,
    checkpoint_path: Path,
    metrics_path: Path,
    history_path: Path,
    run_path: Path,
    environment_path: Path | None = None,
    record: Mapping[str, Any] | None = None,
    live_path: Path | None = None,
) -> FitResult:
    """The train stage: fit, track in MLflow, and write the stage's outputs.

    Under torchrun the other processes only train: the main one (rank 0) alone decides
    whether to resume, talks to MLflow and writes every output. ``record``: the run's logged
    params (default: ``params``'s); ``live_path``: DVCLive's folder (LiveHistory).
    """
    ctx = distributed.from_env()
    distributed.setup(ctx, select_device(params.train.device))
    train_data = data.load_split(split_dir, "train")
    val_data = data.load_split(split_dir, "val")
    digests = {name: data.split_digest(split_dir, (name,)) for name in ("train", "val")}
    fp = fingerprint(params, digests["train"] + digests["val"])
    CRNN(params.model)  # an architecture that cannot build fails here, before any tracking
    if not ctx.is_main:
        resume = _resume_of_main(checkpoint_path, ctx)
        result = fit(params.model, params.train, train_data, val_data, params.augment,
                     resume=resume, ctx=ctx, progress=False)
        distributed.teardown(ctx)
        return result
    tracking.configure(params.tracking.experiment_name)
    resume = load_resume_state(checkpoint_path, fp)
    distributed.broadcast_object(resume is not None, ctx)

    study_tags = {k: v for k, v in (("study", params.tracking.study),
                                    ("variant", params.tracking.variant)) if v}
    with tracking.start_run(params.tracking.experiment_name,
                            run_id=resume["run_id"] if resume else None,
                            tags=study_tags) as run:
        if resume is None:
            tracking.log_params(to_flat_dict(params) if record is None else record)
            for name, context in (("train", "training"), ("val", "validation")):
                tracking.log_dataset(f"fashion-mnist-{name}", digests[name],
                                     str(split_dir / f"{name}.pt"), context)
        else:
            print(f"Resuming from epoch {resume['epoch']} of {params.train.epochs} "
                  f"(MLflow run {run.info.run_id})")
        live = LiveHistory(live_path, resume["history"] if resume else []) if live_path else None
        result = fit(
            params.model, params.train, train_data, val_data, params.augment,
            checkpoint_path=checkpoint_path, resume=resume, fingerprint=fp,
            run_id=run.info.run_id, ctx=ctx, on_epoch=lambda record: _log_epoch(record, live),
        )
        if live:
            live.end()
        environment = environment_info(result.device)
        tracking.log_environment(environment)
        tracking.set_tags({f"data.{name}_sha256": digest for name, digest in digests.items()})

        summary = summarize(result, val_data, params.train.batch_size)
        tracking.log_metrics({k: v for k, v in summary.items()
                              if k != "epochs" and v is not None})

        save_model(result.model, model_path)
        model_uri = None
        if params.tracking.log_model:
            example = data.to_float((val_data if len(val_data[1]) else train_data)[0][:4]).numpy()
            model_uri = tracking.log_model(result.model, model_path, example)
            result.model.to(result.device)

        atomic_write_json(metrics_path, summary)
        write_history(history_path, result.history)
        if environment_path is not None:
            atomic_write_json(environment_path, environment)
        atomic_write_json(run_path, {"run_id": run.info.run_id,
                                     "experiment_id": run.info.experiment_id,
                                     "model_uri": model_uri})
    distributed.teardown(ctx)
    return result


def _log_epoch(record: dict[str, float], live: LiveHistory | None) -> None:
    """One epoch's metrics to the MLflow run (step = epoch) and to DVCLive."""
    tracking.log_metrics({k: v for k, v in record.items() if k != "epoch"},
                         step=int(record["epoch"]))
    if live:
        live.log(record)


def summarize(result: FitResult, val_data: Dataset, batch_size: int) -> dict[str, Any]:
    """The train stage's metrics (metrics/train.json), and the validation confusion matrix
    logged to the active run. What test-time flips and the weight average add is measured on
    validation, so that choices never need the test set."""
    device = torch.device(result.device)
    common = {
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "train_seconds": sum(r["epoch_seconds"] for r in result.history),
        **{key: seconds_to_accuracy(result.history, t)
           for t, key in zip(MILESTONES, MILESTONE_KEYS, strict=True)},
        "params_count": count_parameters(result.model),
    }
    if not len(val_data[1]):  # split.val_fraction 0: nothing to validate on
        return {**common, "best_val_acc": None, "best_val_loss": None,
                "best_val_macro_f1": None, "val_acc_hflip_tta": None}
    val_logits, val_tta = predict_logits_and_tta(result.model, val_data[0], batch_size, device)
    val_metrics = classification_metrics(val_logits, val_data[1])
    extra = {"val_acc_hflip_tta": accuracy(val_tta, val_data[1])}
    if result.last_raw is not None:
        raw_logits = predict_logits(result.last_raw, val_data[0], batch_size, device)
        extra["val_acc_last_without_ema"] = accuracy(raw_logits, val_data[1])
    val_cm = confusion(val_logits, val_data[1])
    tracking.log_confusion_matrix(
        plots.confusion_figure(val_cm, list(data.CLASS_NAMES), title="val confusion matrix"),
        val_cm, list(data.CLASS_NAMES), "val")
    return {
        **common,
        "best_val_acc": result.best_val_acc,
        # The best weights' validation scores, under names of their own: the per-epoch curves
        # own `val_loss`, and a summary logged there would add a false point.
        "best_val_loss": val_metrics["loss"],
        "best_val_macro_f1": val_metrics["macro_f1"],
        **extra,
    }
