"""DVC stage `report`: figures, inspection, and the Markdown + HTML report."""

import json
from pathlib import Path

from fmnist_crnn import cli, report, tracking
from fmnist_crnn.config import to_flat_dict

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
# The values its parameters table shows: what decided the results (not where the data came
# from nor how the run is tracked).
PARAMS = ("split", "model", "train", "augment", "evaluate", "report")


def main(args, params) -> None:
    out = Path(args.out)
    path, html_path = report.build_report(
        params, Path(args.history), Path(args.train_metrics), Path(args.test_metrics),
        Path(args.per_class), Path(args.confusion), Path(args.views), out)
    print(f"wrote {path} and {html_path}")
    # The report, its figures and the lock that records the hashes of every input of this
    # run go to the training's MLflow run, beside its metrics.
    run_id = json.loads(Path(args.run).read_text())["run_id"]
    files = [path, html_path, *sorted((out / "figures").rglob("*.png"))]
    lock = Path(args.lock)
    with tracking.start_run(None, run_id=run_id):
        tracking.log_missing_params(to_flat_dict(params))  # changed.<key> tags for new values
        for file in files:
            folder = file.parent.relative_to(out).as_posix()
            tracking.log_artifact(file, "report" if folder == "." else f"report/{folder}")
        # The test confusion heatmap beside the evaluate stage's table, where the validation
        # one is (val/): drawn once, here.
        tracking.log_artifact(out / "figures" / "confusion_matrix.png", "test")
        if lock.exists():
            tracking.log_artifact(lock, "dvc")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--history", required=True)
    p.add_argument("--train-metrics", required=True)
    p.add_argument("--test-metrics", required=True)
    p.add_argument("--per-class", required=True)
    p.add_argument("--confusion", required=True)
    p.add_argument("--views", required=True,
                   help="evaluate's inspection trace, shape table and mistakes (.npz)")
    p.add_argument("--run", required=True, help="the training's MLflow run id (JSON)")
    p.add_argument("--lock", default="dvc.lock",
                   help="DVC's lock file, logged with the run (DVC writes it: not a dependency)")
    p.add_argument("--out", required=True, help="output folder for report.md and figures/")
    cli.run(main, p, PARAMS)
