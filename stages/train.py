"""DVC stage `train`: fit the CRNN, track the run in MLflow, keep the best weights."""

import sys
from pathlib import Path

from fmnist_crnn import cli, distributed
from fmnist_crnn.config import load_params, to_flat_dict
from fmnist_crnn.runs.training import run_training

# The params.yaml keys (or whole sections) this stage reads; dvc.yaml lists the same, and
# reading any other key stops the stage (cli.run; tests check both).
PARAMS = ("model", "train", "augment", "tracking.experiment_name", "tracking.log_model",
          "tracking.study", "tracking.variant")


def main(args, params) -> None:
    status = distributed.torchrun(params.train.processes, sys.argv)
    if status is not None:  # train.processes > 1: the same stage as that many processes
        sys.exit(status)
    result = run_training(
        params, Path(args.split), model_path=Path(args.model),
        checkpoint_path=Path(args.checkpoint), metrics_path=Path(args.metrics),
        history_path=Path(args.history), run_path=Path(args.run),
        environment_path=Path(args.environment), live_path=Path(args.live),
        # The run's record: every value of params.yaml as training starts. Logged, not read:
        # a key this stage does not declare does not re-run it.
        record=to_flat_dict(load_params(args.params)),
    )
    if distributed.from_env().is_main and result.best_val_acc >= 0:
        print(f"best validation accuracy {result.best_val_acc:.2%} at epoch "
              f"{result.best_epoch}")
    elif distributed.from_env().is_main:
        print(f"no validation split: kept the weights of the last epoch ({result.best_epoch})")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--split", required=True, help="folder with train.pt and val.pt")
    p.add_argument("--model", required=True, help="output: best weights + model config")
    p.add_argument("--checkpoint", required=True, help="per-epoch state for resuming")
    p.add_argument("--metrics", required=True, help="output: training metrics (JSON)")
    p.add_argument("--history", required=True, help="output: per-epoch metrics (CSV)")
    p.add_argument("--run", required=True, help="output: the MLflow run id (JSON)")
    p.add_argument("--live", required=True,
                   help="output: DVCLive's folder, each epoch's metrics as the epoch ends")
    p.add_argument("--environment", required=True,
                   help="output: CPU, ISA, threads and versions the run used (JSON)")
    cli.run(main, p, PARAMS)
