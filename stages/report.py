"""DVC stage `report`: learning curves, confusion heatmap and the Markdown report."""

from pathlib import Path

from fmnist_crnn import cli, report

# The params.yaml sections this stage reads; dvc.yaml lists the same (tests check it).
SECTIONS = ("data", "split", "model", "train", "tracking")


def main(args, params) -> None:
    path = report.build_report(params, Path(args.history), Path(args.train_metrics),
                               Path(args.test_metrics), Path(args.confusion), Path(args.out))
    print(f"wrote {path}")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--history", required=True)
    p.add_argument("--train-metrics", required=True)
    p.add_argument("--test-metrics", required=True)
    p.add_argument("--confusion", required=True)
    p.add_argument("--out", required=True, help="output folder for report.md and figures/")
    cli.run(main, p, SECTIONS)
