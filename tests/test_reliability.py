"""Interrupted runs resume to the same result; bad input fails clearly and keeps old outputs."""

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
import yaml

from fmnist_crnn import data
from fmnist_crnn.config import SplitConfig
from fmnist_crnn.errors import CheckpointError
from fmnist_crnn.model import load_model

from .conftest import REPO, idx_bytes, synthetic_arrays

TRAIN_ARGS = ["--split", "split", "--model", "model.pt", "--checkpoint", "last.pt",
              "--metrics", "train.json", "--history", "history.csv", "--run", "run.json",
              "--environment", "environment.json", "--live", "live"]


def write_params(folder, **overrides):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def stage(name, folder, *args, extra_env=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_CRNN_"))}
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, str(REPO / "stages" / f"{name}.py"), *args],
                            cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def training_dir(tmp_path):
    """A small repository with a synthetic split, 4 epochs of a small CRNN (resuming is about
    the loop and its state, not the model's size)."""
    def make(name):
        folder = tmp_path / name
        (folder / ".dvc").mkdir(parents=True)  # the tracking store goes to this folder
        raw = folder / "raw"
        raw.mkdir()
        for file, array in synthetic_arrays(n_train=800, n_test=40).items():
            (raw / file).write_bytes(idx_bytes(array))
        data.make_split(raw, folder / "split", SplitConfig(val_fraction=0.2))
        write_params(folder, **{"train.epochs": 4, "train.batch_size": 32,
                                "model.hidden_dim": 32, "model.num_layers": 1,
                                "model.head_dims": [32], "tracking.log_model": False})
        return folder
    return make


def interrupt_after_epoch(folder, epoch, sig):
    """Train until ``epoch``'s checkpoint is written, then receive ``sig`` (the train stage's
    fault-injection hook sends it at that point, whatever the machine's speed)."""
    extra = {"FMNIST_CRNN_SIGNAL_AFTER_EPOCH": f"{epoch}:{sig.name.removeprefix('SIG')}"}
    proc = stage("train", folder, *TRAIN_ARGS, extra_env=extra)
    proc.communicate(timeout=600)
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == epoch
    return proc.returncode


@pytest.mark.e2e
def test_interrupted_training_resumes_to_the_uninterrupted_result(training_dir):
    whole = training_dir("whole")
    proc = stage("train", whole, *TRAIN_ARGS)
    assert proc.wait(timeout=600) == 0, proc.communicate()

    broken = training_dir("broken")
    assert interrupt_after_epoch(broken, 1, signal.SIGINT) == 130  # Ctrl-C: clean stop
    run_id = torch.load(broken / "last.pt", weights_only=True)["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{broken / 'mlflow.db'}")
    assert mlflow.get_run(run_id).info.status == "KILLED"
    # Resumed from epoch 1, killed without warning after epoch 2.
    assert interrupt_after_epoch(broken, 2, signal.SIGKILL) == -signal.SIGKILL
    assert not (broken / "model.pt").exists()

    proc = stage("train", broken, *TRAIN_ARGS)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Resuming from epoch" in out

    assert json.loads((broken / "run.json").read_text())["run_id"] == run_id  # same run
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_acc")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]

    a = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(broken / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # DVCLive's files hold every epoch once, the ones resumed from included, and the same
    # values as the uninterrupted run's.
    tsv = lambda p: (p / "live/plots/metrics/val_acc.tsv").read_text().splitlines()  # noqa: E731
    assert [row.split("\t")[0] for row in tsv(broken)] == ["step", "1", "2", "3", "4"]
    assert tsv(broken) == tsv(whole)
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items()  # noqa: E731
                       if k != "train_seconds"}
    assert strip(whole / "train.json") == strip(broken / "train.json")


def run_stage(name, folder, *args):
    proc = stage(name, folder, *args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize(("dotted", "value", "fragment"), [
    ("split.val_fraction", 1.5, "split.val_fraction"),
    ("split.limit", "all", "split.limit"),
])
def test_bad_params_exit_2_and_keep_earlier_outputs(raw_dir, tmp_path, dotted, value,
                                                     fragment):
    out = tmp_path / "split"
    data.make_split(raw_dir, out, SplitConfig())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_params(tmp_path, **{dotted: value})
    code, _, err = run_stage("split", tmp_path, "--raw", str(raw_dir), "--out", str(out))
    assert code == 2 and fragment in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unknown_key_exits_2_naming_it(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["hiden_dim"] = 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, _, err = run_stage("split", tmp_path, "--raw", "raw", "--out", "split")
    assert code == 2 and "model.hiden_dim" in err


def test_no_data_source_exits_2_and_keeps_earlier_raw(tmp_path, raw_dir, monkeypatch,
                                                      capsys):
    # In-process, so that Debian's package folder can be pointed elsewhere.
    import runpy

    before = {p.name: p.read_bytes() for p in raw_dir.iterdir()}
    write_params(tmp_path, **{"data.source_dir": str(tmp_path / "nowhere"),
                              "data.mirror": "http://127.0.0.1:9/", "data.timeout_s": 2})
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["download.py", "--out", str(raw_dir)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "stages" / "download.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "cannot obtain" in err and "http://127.0.0.1:9/" in err and "nowhere" in err
    assert {p.name: p.read_bytes() for p in raw_dir.iterdir()} == before


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from fmnist_crnn.config import ModelConfig, params_from_dict, to_dict
    from fmnist_crnn.model import CRNN

    params = params_from_dict(yaml.safe_load((REPO / "params.yaml").read_text()))
    other = CRNN(ModelConfig(hidden_dim=32))
    path = tmp_path / "model.pt"
    torch.save({"model_config": to_dict(params)["model"], "state_dict": other.state_dict()},
               path)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_model(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable model checkpoint"):
        load_model(path)


def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "model.pt"
    torch.save({"model_config": {}, "state_dict": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
