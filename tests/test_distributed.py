"""Training as several processes: torchrun + DistributedDataParallel (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from fmnist_crnn import data, distributed
from fmnist_crnn.config import SplitConfig
from fmnist_crnn.testing.services import free_port

from .conftest import REPO, idx_bytes, synthetic_arrays
from .test_reliability import (
    TRAIN_ARGS,
    stage,
    training_dir,  # noqa: F401 (the fixture)
)


@pytest.mark.parametrize(("n", "world"), [(10, 2), (10, 3), (7, 4), (42000, 2)])
def test_shards_are_disjoint_cover_the_order_and_are_equal_in_size(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard(order, distributed.Context(rank=r, world_size=world))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every process takes the same number of steps
    seen = torch.cat(shards)
    assert set(seen.tolist()) == set(range(n))  # together they cover the split
    assert len(seen) - n < world  # only the padding repeats, fewer than one per process
    if n % world == 0:
        assert len(set(seen.tolist())) == len(seen)  # disjoint


def test_batches_follow_the_shard_of_this_process():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28)
    labels = torch.arange(10)
    ctx = distributed.Context(rank=1, world_size=2)
    generator = torch.Generator().manual_seed(1)
    got = torch.cat([y for _, y in data.batches(images, labels, 3, generator,
                                                 select=lambda o: distributed.shard(o, ctx))])
    expected = distributed.shard(torch.randperm(10, generator=torch.Generator().manual_seed(1)),
                                 ctx)
    assert got.tolist() == expected.tolist()


def test_one_process_needs_no_torchrun():
    assert distributed.torchrun(1, ["stages/train.py"]) is None


@pytest.mark.distributed
def test_two_processes_train_one_model_log_one_run_and_resume_after_a_kill(
        training_dir):  # noqa: F811
    from .test_reliability import write_params

    whole = training_dir("ddp-whole")
    write_params(whole, **{"train.epochs": 3, "train.batch_size": 32, "train.processes": 2,
                           "tracking.log_model": False})
    proc = stage("train", whole, *TRAIN_ARGS)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "weights identical on all 2 processes" in out
    mlflow.set_tracking_uri(f"sqlite:///{whole / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fashion-mnist-crnn"], output_format="list")
    assert len(runs) == 1  # rank 0 alone talks to MLflow
    [run] = runs
    assert run.data.tags["env.processes"] == "2" and run.data.params["train.processes"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    train_metrics = json.loads((whole / "train.json").read_text())
    assert train_metrics["epochs"] == 3

    # Killed without warning after epoch 1, then the same command again: it resumes.
    broken = training_dir("ddp-broken")
    write_params(broken, **{"train.epochs": 3, "train.batch_size": 32, "train.processes": 2,
                            "tracking.log_model": False})
    proc = stage("train", broken, *TRAIN_ARGS,
                 extra_env={"FMNIST_CRNN_SIGNAL_AFTER_EPOCH": "1:KILL"})
    proc.communicate(timeout=900)
    assert proc.returncode != 0
    assert torch.load(broken / "last.pt", weights_only=True)["epoch"] == 1
    assert not (broken / "model.pt").exists()
    proc = stage("train", broken, *TRAIN_ARGS)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "Resuming from epoch 1" in out
    mlflow.set_tracking_uri(f"sqlite:///{broken / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fashion-mnist-crnn"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(broken / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted


def documented_torchrun_command() -> str:
    """The multi-machine command of docs/team.md, as written there."""
    text = (REPO / "docs" / "team.md").read_text()
    block = text[text.index("torchrun --nnodes"):]
    block = block[:block.index("```")]
    return " ".join(line.rstrip("\\").strip() for line in block.splitlines() if line.strip())


@pytest.mark.distributed
def test_the_documented_multi_machine_torchrun_command_trains_on_two_nodes(tmp_path):
    from .test_reliability import write_params

    folder = tmp_path / "node"
    raw = folder / "data" / "raw"
    raw.mkdir(parents=True)
    (folder / ".dvc").mkdir()
    for file, array in synthetic_arrays(n_train=600, n_test=40).items():
        (raw / file).write_bytes(idx_bytes(array))
    data.make_split(raw, folder / "data" / "split", SplitConfig(val_fraction=0.2))
    write_params(folder, **{"train.epochs": 1, "train.batch_size": 32,
                            "tracking.log_model": False})
    (folder / "stages").symlink_to(REPO / "stages")
    command = documented_torchrun_command()
    assert "--nnodes 2" in command and "head-node:29400" in command
    # Two "machines" on loopback, one process each.
    command = command.replace("head-node:29400", f"127.0.0.1:{free_port()}").replace(
        "--nproc-per-node 4", "--nproc-per-node 1")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    nodes = [subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert json.loads((folder / "metrics/train.json").read_text())["epochs"] == 1
    assert "weights identical on all 2 processes" in "".join(outs)
