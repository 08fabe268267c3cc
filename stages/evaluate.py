"""DVC stage `evaluate`: the test set, once; metrics and confusion matrix, and the report's
views (the inspection trace, the shape table, the misclassified images)."""

from pathlib import Path

from fmnist_crnn import cli
from fmnist_crnn.config import to_flat_dict
from fmnist_crnn.runs.evaluation import run_evaluation

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
PARAMS = ("train.batch_size", "train.device", "evaluate", "tracking.registered_model_name",
          "tracking.champion_alias", "report.inspect_indices")


def main(args, params) -> None:
    run_evaluation(
        Path(args.model), Path(args.split), Path(args.run), metrics_path=Path(args.metrics),
        per_class_path=Path(args.per_class),
        predictions_path=Path(args.predictions), confusion_path=Path(args.confusion),
        views_path=Path(args.views), batch_size=params.train.batch_size,
        registered_model_name=params.tracking.registered_model_name,
        champion_alias=params.tracking.champion_alias, device_name=params.train.device,
        tta_hflip=params.evaluate.tta_hflip,
        tta_shift=params.evaluate.tta_shift,
        tta_moves=params.evaluate.tta_moves,
        inspect_indices=params.report.inspect_indices, record=to_flat_dict(params),
    )


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True, help="folder with train.pt and test.pt")
    p.add_argument("--run", required=True, help="the training's MLflow run id (JSON)")
    p.add_argument("--metrics", required=True, help="output: test metrics (JSON)")
    p.add_argument("--per-class", required=True,
                   help="output: per-class precision/recall/F1 (JSON)")
    p.add_argument("--predictions", required=True, help="output: actual,predicted (CSV)")
    p.add_argument("--confusion", required=True, help="output: confusion matrix (JSON)")
    p.add_argument("--views", required=True,
                   help="output: what the report draws from the model and the images (.npz)")
    cli.run(main, p, PARAMS)
