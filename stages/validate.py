"""DVC stage `validate`: check every parameter before any stage touches an output.

DVC deletes a stage's outputs before it runs the stage's command, so a bad value caught by the
train stage itself would already have cost the previous model and metrics. This stage comes
first in the graph (download depends on its output) and reads every params section, so any
change to params.yaml runs it first; a bad value stops the pipeline here, with every other
output as it was. Its output never changes, so a valid change reruns only the stages that read
the changed section.
"""

from pathlib import Path

from fmnist_crnn import cli
from fmnist_crnn.architecture import plan
from fmnist_crnn.files import atomic_write_text

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
PARAMS = ("data", "split", "model", "train", "augment", "evaluate", "tracking", "report")
MARKER = "params.yaml passed validation\n"  # constant: downstream stages never rerun for it


def main(args, params) -> None:
    plan(params.model)  # an architecture that cannot build names its block and sizes here
    if params.train.device not in ("auto", "cpu"):  # torch (1.5 s) only when it has a say
        from fmnist_crnn.distributed import select_device

        select_device(params.train.device)  # train.device=cuda on a machine without CUDA
    atomic_write_text(Path(args.out), MARKER)


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output: a marker that later stages depend on")
    cli.run(main, p, PARAMS)
