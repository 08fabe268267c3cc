"""DVC stage `split`: seeded 70:30 train/validation split plus the untouched test set."""

from pathlib import Path

from fmnist_crnn import cli, data

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
PARAMS = ("split",)


def main(args, params) -> None:
    sizes = data.make_split(Path(args.raw), Path(args.out), params.split)
    print(", ".join(f"{name}: {n}" for name, n in sizes.items()))


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--raw", required=True, help="folder with the IDX files")
    p.add_argument("--out", required=True, help="folder for train.pt, val.pt, test.pt")
    cli.run(main, p, PARAMS)
