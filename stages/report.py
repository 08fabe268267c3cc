"""DVC stage `report`: learning curves, confusion heatmap and the Markdown report."""

import json
from pathlib import Path

from fmnist_crnn import cli, report, tracking

# The params.yaml sections this stage reads; dvc.yaml lists the same (tests check it).
SECTIONS = ("data", "split", "model", "train", "tracking")


def main(args, params) -> None:
    out = Path(args.out)
    path = report.build_report(params, Path(args.history), Path(args.train_metrics),
                               Path(args.test_metrics), Path(args.per_class),
                               Path(args.confusion), out)
    print(f"wrote {path}")
    # The report, its figures and the lock that records the hashes of every input of this
    # run go to the training's MLflow run, beside its metrics.
    run_id = json.loads(Path(args.run).read_text())["run_id"]
    files = [path, *sorted((out / "figures").glob("*.png"))]
    lock = Path(args.lock)
    with tracking.start_run(params.tracking.experiment_name, run_id=run_id):
        for file in files:
            tracking.log_artifact(file, "report" if file == path else "report/figures")
        if lock.exists():
            tracking.log_artifact(lock, "dvc")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--history", required=True)
    p.add_argument("--train-metrics", required=True)
    p.add_argument("--test-metrics", required=True)
    p.add_argument("--per-class", required=True)
    p.add_argument("--confusion", required=True)
    p.add_argument("--run", required=True, help="the training's MLflow run id (JSON)")
    p.add_argument("--lock", default="dvc.lock",
                   help="DVC's lock file, logged with the run (DVC writes it: not a dependency)")
    p.add_argument("--out", required=True, help="output folder for report.md and figures/")
    cli.run(main, p, SECTIONS)
