"""DVC stage `download`: obtain and verify the four Fashion-MNIST files."""

from pathlib import Path

from fmnist_crnn import cli, data

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
PARAMS = ("data",)


def main(args, params) -> None:
    used = data.fetch_raw(params.data, Path(args.out))
    for name, source in used.items():
        print(f"{name}: verified, from {source}")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the decompressed IDX files")
    cli.run(main, p, PARAMS)
