"""The real pipeline on a slice of the real dataset, in a temporary git + DVC repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from fmnist_crnn.data import DEBIAN_DIR, ENV_DIR

from .conftest import DVC, activated, stranger_env
from .repos import copy, make_repo_at, run, shared

pytestmark = pytest.mark.e2e


# The recipe's code paths too: augmentation, EMA, a schedule and test-time flips. 6,000 images,
# not the shared slice's 3,000: with EMA and warmup, 2 epochs on 2,400 training images stay
# near chance (19.8% seen), too close to tell a broken pipeline from a working one.
E2E_LIMIT = 6000
SLICE = {"split": {"limit": E2E_LIMIT},
         "train": {"epochs": 2, "ema_decay": 0.9, "schedule": "cosine", "warmup_epochs": 0.5},
         "augment": {"crop_padding": 2, "hflip": True, "erasing": 0.25},
         "evaluate": {"tta_hflip": True}}


def make_pipeline(repo, tmp_path_factory, fresh=False):
    """The slice repository at ``repo`` with the recipe's params, after `dvc repro`
    (``fresh``: a new repository, every stage run in it); its output in ``repo.out``."""
    repo, env = make_repo_at(repo, tmp_path_factory, SLICE, fresh=fresh)
    out = run([*DVC, "repro"], repo, env)
    (repo.parent / f"{repo.name}.out").write_text(out)
    return repo, env, out


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The pipeline after one `dvc repro`, built once per test run: read only. A scenario
    that runs DVC, git or MLflow commands in it takes ``own_pipeline``."""
    repo = shared(tmp_path_factory, "pipeline",
                  lambda path: make_pipeline(path, tmp_path_factory))
    return repo, stranger_env(repo), (repo.parent / "pipeline.out").read_text()


@pytest.fixture
def own_pipeline(pipeline, tmp_path):
    """A copy of ``pipeline`` for this scenario alone."""
    repo, _, out = pipeline
    mine = copy(repo, tmp_path / "pipeline")
    return mine, stranger_env(mine), out


def test_repro_prints_the_study_inference_line(pipeline):
    _, _, out = pipeline
    assert "Inference: 100%" in out and "94/94" in out  # 6,000 test images at batch 64
    assert "Accuracy: " in out and "% / Loss: " in out


def test_outputs_metrics_and_report(pipeline):
    repo, _, _ = pipeline
    train = json.loads((repo / "metrics/train.json").read_text())
    test = json.loads((repo / "metrics/test.json").read_text())
    assert train["epochs"] == 2 and 0 < train["best_val_acc"] <= 1
    assert 0.3 < test["accuracy"] <= 1  # 4,200 images, 2 epochs: well above chance (0.1)
    per_class = json.loads((repo / "metrics/test_per_class.json").read_text())
    assert set(per_class) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                              "Shirt", "Sneaker", "Bag", "Ankle boot"}
    # The columns of `dvc exp show`; with flip TTA also the accuracy without it.
    assert set(test) == {"accuracy", "loss", "macro_f1", "accuracy_without_tta"}
    assert 0.3 < test["accuracy_without_tta"] <= 1
    assert {"val_acc_hflip_tta", "val_acc_last_without_ema", "seconds_to_val_acc_90"} <= set(train)
    history = (repo / "plots/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 3
    predictions = (repo / "plots/test_predictions.csv").read_text().splitlines()
    assert predictions[0] == "actual,predicted,confidence" and len(predictions) == E2E_LIMIT + 1
    report = (repo / "reports/report.md").read_text()
    assert f"{test['accuracy']:.2%}" in report and "89.6%" in report
    assert f"test accuracy without TTA | {test['accuracy_without_tta']:.2%}" in report
    assert (repo / "reports/report.html").read_text().startswith("<!DOCTYPE html>")
    for png in ("learning_curves.png", "confusion_matrix.png"):
        assert (repo / "reports/figures" / png).read_bytes()[:4] == b"\x89PNG"


def test_mlflow_run_has_params_history_confusion_and_model(pipeline):
    repo, _, _ = pipeline
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden_dim"] == "128" and params["split.limit"] == str(E2E_LIMIT)
    assert params["model.kernel_sizes"] == "[3, 3, 2]"
    assert params["report.mistakes"] == "16"  # logged by the report stage
    assert {f"{s}.{k}" for s, sec in yaml.safe_load((repo / "params.yaml").read_text()).items()
            for k in sec} <= set(params)  # every value of params.yaml
    # Params read as params.yaml writes them: `2`, not `2.0`; `null`, not `None`.
    assert params["train.epochs"] == "2" and params["train.warmup_epochs"] == "0.5"
    assert params["train.grad_clip_norm"] == "null" and params["train.amp"] == "false"
    assert params["train.lr"] == "0.001" and params["train.weight_decay"] == "0.0"
    # Per-epoch keys hold one point per epoch; the summary has names of its own.
    for key in ("val_acc", "val_loss", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert "best_val_loss" in run.data.metrics and "best_val_acc" in run.data.metrics
    # The code ran as committed: DVC's outputs and dvc.lock do not make the tree dirty.
    assert run.data.tags["git_dirty"] == "false"
    environment = json.loads((repo / "models/environment.json").read_text())
    assert environment["cpu_capability"] == run.data.tags["env.cpu_capability"]
    assert {"cpu", "torch_threads", "torch", "mlflow", "dvc"} <= set(environment)
    test = json.loads((repo / "metrics/test.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    artifacts = {a.path for folder in ("val", "test")
                 for a in client.list_artifacts(run_id, folder)}
    assert {"val/confusion_matrix.png", "test/confusion_matrix.png",
            "test/confusion_matrix.json"} <= artifacts
    assert run.data.tags["mlflow.source.git.commit"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {
        "fashion-mnist-train", "fashion-mnist-val", "fashion-mnist-test"}
    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'",
                                           output_format="list")
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    import numpy as np
    out = model.predict(np.zeros((2, 1, 28, 28), dtype=np.float32))
    assert np.asarray(out).shape == (2, 10)
    assert str(repo / "mlartifacts") in logged.artifact_location


def lock_outs(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
            if not out["path"].endswith("mlflow_run.json")}


def test_two_fresh_repositories_reproduce_the_same_hashes_and_metrics(pipeline,
                                                                       tmp_path_factory):
    repo, _, _ = pipeline
    twin, _, _ = make_pipeline(tmp_path_factory.mktemp("twin") / "repo", tmp_path_factory,
                               fresh=True)
    first, second = lock_outs(repo), lock_outs(twin)
    # These hold wall-clock seconds (and the checkpoint its MLflow run id): compared below
    # without them, or through the model they produce.
    timing = {"metrics/train.json", "plots/history.csv", "reports/report.md",
              "reports/report.html", "reports/figures", "checkpoints/last.pt",
              "dvclive/metrics.json", "dvclive/plots"}
    assert {k: v for k, v in first.items() if k not in timing} == {
        k: v for k, v in second.items() if k not in timing}
    assert {"data/raw", "data/split", "models/model.pt", "metrics/test.json"} <= set(first)
    strip = lambda r: {k: v for k, v in json.loads(  # noqa: E731
        (r / "metrics/train.json").read_text()).items() if k != "train_seconds"}
    assert strip(repo) == strip(twin)
    # DVCLive's per-epoch files: the same but for the seconds each epoch took.
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        tsv = f"dvclive/plots/metrics/{name}.tsv"
        assert (repo / tsv).read_text() == (twin / tsv).read_text(), tsv


@pytest.mark.browser
def test_html_report_renders_in_a_browser_with_every_image(pipeline):
    from .browser import chromium, images_loaded

    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    repo, _, _ = pipeline
    loaded, total = images_loaded(repo / "reports/report.html")
    # curves, 2 confusion, mistakes, inputs + 2 images x (3 blocks + lstm + probabilities)
    assert total == 15 and loaded == total


def test_report_shows_inspection_and_mistakes(pipeline):
    repo, _, _ = pipeline
    report = (repo / "reports/report.md").read_text()
    assert "| block1 | [64, 32, 7, 7] |" in report and "| head | [64, 10] |" in report
    assert "figures/confident_mistakes.png" in report
    assert (repo / "reports/figures/inspection/image1_lstm.png").exists()


def test_model_is_registered_and_champion_set(pipeline):
    repo, _, out = pipeline
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("fashion-mnist-crnn",
                                                               "champion")
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    assert version.run_id == run_id
    assert "alias 'champion' moved to it" in out


def test_predict_from_the_registry_alias(pipeline):
    repo, env, _ = pipeline
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    out = run([sys.executable, "-m", "fmnist_crnn.predict", "--model-uri",
               "models:/fashion-mnist-crnn@champion", "data/raw/t10k-images-idx3-ubyte"],
              repo, env)
    lines = [x for x in out.splitlines() if x.startswith("data/raw/t10k-images-idx3-ubyte[")]
    assert len(lines) == 10000 and lines[0].endswith("%)")


@pytest.mark.services
def test_logged_model_serves_over_http(pipeline):
    import socket
    import time
    import urllib.request

    import numpy as np

    repo, env, _ = pipeline
    uri = json.loads((repo / "models/mlflow_run.json").read_text())["model_uri"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(activated(env), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the model server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        images = np.zeros((2, 1, 28, 28), dtype=np.float32).tolist()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert np.asarray(predictions).shape == (2, 10)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_second_repro_does_nothing(own_pipeline):
    repo, env, _ = own_pipeline
    out = run([*DVC, "repro"], repo, env)
    assert "Data and pipelines are up to date" in out
    assert "up to date" in run([*DVC, "status"], repo, env)


# A changed key and the stages whose params `dvc status` then reports changed. validate reads
# every key (to check it) and writes a constant marker, so it is in each row and re-runs
# nothing after it; the other stages are those that read the key (dvc.yaml lists per stage
# the keys it reads, and the stage refuses to read any other).
RERUNS = {
    "data.timeout_s": {"download"},
    "data.mirror": {"download"},
    "split.seed": {"split", "report"},
    "model.hidden_dim": {"train", "report"},
    "train.lr": {"train", "report"},
    "train.batch_size": {"train", "evaluate", "report"},
    "augment.erasing": {"train", "report"},
    "evaluate.tta_shift": {"evaluate", "report"},
    "tracking.experiment_name": {"train"},
    "tracking.study": {"train"},
    "tracking.champion_alias": {"evaluate"},
    "tracking.registered_model_name": {"evaluate"},
    "report.mistakes": {"report"},
    "report.inspect_indices": {"evaluate", "report"},  # traced where the model is loaded
}
NEW_VALUES = {"data.timeout_s": 60, "data.mirror": "http://mirror.invalid/", "split.seed": 7,
              "model.hidden_dim": 64, "train.lr": 0.002, "train.batch_size": 32,
              "augment.erasing": 0.5, "evaluate.tta_shift": 1,
              "tracking.experiment_name": "other", "tracking.study": "s1",
              "tracking.champion_alias": "best", "tracking.registered_model_name": "other",
              "report.mistakes": 8, "report.inspect_indices": [2, 3]}


def set_param(repo, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    section, name = key.split(".")
    params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_with_changed_params(repo):
    """The stages whose params changed, from `dvc status` (DVC's API in this process: the
    same answer as `dvc status --json`, without starting DVC 27 times)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        status = dvc_repo.status()
    # Keys name the stage as `dvc.yaml:STAGE` by its path from this process's folder.
    return {stage.rsplit(":", 1)[-1] for stage, changes in status.items() for change in changes
            if isinstance(change, dict) and "params.yaml" in change.get("changed deps", {})}


def test_a_changed_key_reruns_exactly_the_stages_that_read_it(own_pipeline):
    repo, env, _ = own_pipeline
    original = (repo / "params.yaml").read_text()
    assert stages_with_changed_params(repo) == set()
    seen = {}
    for key, value in NEW_VALUES.items():
        set_param(repo, key, value)
        changed = stages_with_changed_params(repo)
        assert "validate" in changed, key
        seen[key] = changed - {"validate"}
        (repo / "params.yaml").write_text(original)
    assert seen == RERUNS

    # Through `dvc repro`: a new network timeout re-runs the download, whose output is
    # identical, so nothing after it runs; a new report setting re-runs the report alone,
    # and its value reaches the training's MLflow run as a tag (params cannot change).
    set_param(repo, "data.timeout_s", 60)
    set_param(repo, "report.mistakes", 8)
    out = run([*DVC, "repro"], repo, env)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"validate", "download", "report"}, out
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    logged = mlflow.MlflowClient().get_run(run_id).data
    assert logged.params["report.mistakes"] == "16"
    assert logged.tags["changed.report.mistakes"] == "8"
    (repo / "params.yaml").write_text(original)
    run([*DVC, "repro"], repo, env)
    assert "up to date" in run([*DVC, "status"], repo, env)


def test_experiment_variant_is_one_command_and_comparable(own_pipeline):
    repo, env, _ = own_pipeline
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    run([*DVC, "exp", "run", "-n", "tiny-h32", "-S", "model.hidden_dim=32",
         "-S", "train.epochs=1"], repo, env)
    shown = json.loads(run([*DVC, "exp", "show", "--json"], repo, env))
    names = [e.get("name") for row in shown for e in [row] + [
        x for exp in row.get("experiments") or [] for x in exp.get("revs", [])]]
    assert "tiny-h32" in names
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fashion-mnist-crnn"], output_format="list",
                              filter_string="tags.dvc_exp_name = 'tiny-h32'")
    assert len(runs) == 1 and runs[0].data.params["model.hidden_dim"] == "32"
    assert runs[0].info.run_name == "tiny-h32"
    assert "test_accuracy" in runs[0].data.metrics


def test_training_on_every_image_without_a_validation_split(own_pipeline):
    """split.val_fraction=0: the split stage keeps all training images, training keeps the
    last epoch, evaluate and report still run; the test set is the same."""
    repo, env, _ = own_pipeline
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "before full-train", "--allow-empty"], repo, env)
    run([*DVC, "exp", "run", "--temp", "-n", "tiny-all", "-S", "split.val_fraction=0",
         "-S", "train.epochs=1"], repo, env)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    [logged] = mlflow.search_runs(experiment_names=["fashion-mnist-crnn"], output_format="list",
                                  filter_string="tags.dvc_exp_name = 'tiny-all'")
    metrics = logged.data.metrics
    assert "test_accuracy" in metrics and "train_acc" in metrics
    assert not {"val_acc", "val_loss", "best_val_acc"} & set(metrics)
    shown = json.loads(run([*DVC, "exp", "show", "--json"], repo, env))
    [train_json] = [e["data"]["metrics"]["metrics/train.json"]["data"] for row in shown
                    for exp in row.get("experiments") or [] for e in exp.get("revs", [])
                    if e.get("name") == "tiny-all"]
    # DVC shows numbers only: the null best_val_acc of a run without validation is absent.
    assert train_json["epochs"] == 1 and "best_val_acc" not in train_json


def test_mlproject_train_entry_logs_a_run(own_pipeline):
    repo, env, _ = own_pipeline
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "before mlflow run", "--allow-empty"], repo, env)
    env = dict(activated(env), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    out = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name",
               "fashion-mnist-crnn", "-e", "train", "-P", "hidden_dim=24", "-P", "epochs=1"],
              repo, env)
    match = re.search(r"Run \(ID '([0-9a-f]+)'\) succeeded", out)
    assert match, out[-2000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    logged = mlflow.get_run(match.group(1))
    assert logged.data.params["model.hidden_dim"] == "24"
    assert logged.data.params["train.epochs"] == "1"
    assert "test_accuracy" in logged.data.metrics


def test_a_second_clone_gets_the_exact_artifacts_through_a_dvc_remote(own_pipeline, tmp_path):
    """Push results from one clone; a second clone `dvc pull`s them, is up to date without
    training, and its pulled model scores the committed test accuracy. An experiment travels
    too, with `dvc exp push` / `dvc exp pull`."""
    import torch

    from fmnist_crnn import data, evaluate
    from fmnist_crnn.model import load_model

    repo, env, _ = own_pipeline
    origin, store = tmp_path / "origin.git", tmp_path / "dvc-store"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    run([*DVC, "remote", "add", "-d", "shared", str(store)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results", "--allow-empty"], repo, env)
    run(["git", "remote", "add", "origin", str(origin)], repo, env)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], repo, env)
    run([*DVC, "push"], repo, env)
    run([*DVC, "exp", "run", "-n", "remote-h16", "-S", "model.hidden_dim=16",
         "-S", "train.epochs=1"], repo, env)
    run([*DVC, "exp", "push", "origin", "remote-h16"], repo, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], tmp_path, env)
    clone_env = stranger_env(clone)
    run([*DVC, "pull"], clone, clone_env)
    assert "up to date" in run([*DVC, "status"], clone, clone_env)
    assert "Data and pipelines are up to date" in run([*DVC, "repro"], clone, clone_env)

    committed = json.loads((clone / "metrics/test.json").read_text())
    model = load_model(clone / "models/model.pt")
    images, labels = data.load_split(clone / "data/split", "test")
    logits = evaluate.predict_logits(model, images, 256, torch.device("cpu"),
                                     tta_hflip=True)  # as the slice's params.yaml says
    assert evaluate.accuracy(logits, labels) == committed["accuracy"]

    run([*DVC, "exp", "pull", "origin", "remote-h16"], clone, clone_env)
    shown = run([*DVC, "exp", "show", "--json"], clone, clone_env)
    assert "remote-h16" in shown


def test_a_bad_value_through_dvc_exp_run_changes_no_output(own_pipeline):
    """DVC deletes a stage's outputs before running it: the validate stage, first in the
    graph, must refuse the value before any stage with outputs runs."""
    repo, env, _ = own_pipeline
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "before the bad value", "--allow-empty"], repo, env)
    outputs = ["models/model.pt", "metrics/train.json", "metrics/test.json", "plots/history.csv",
               "models/mlflow_run.json", "checkpoints/last.pt", "reports/report.md"]
    before = {p: (repo / p).read_bytes() for p in outputs}

    # In the workspace, DVC writes the -S value into params.yaml before running: that one
    # line is the only change, and `git checkout params.yaml` undoes it.
    proc = subprocess.run([*DVC, "exp", "run", "-S", "train.batch_size=0"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "invalid value for 'train.batch_size': 0" in proc.stdout + proc.stderr
    assert {p: (repo / p).read_bytes() for p in outputs} == before
    changed = run(["git", "status", "--porcelain"], repo, env).split()
    assert changed == ["M", "params.yaml"]
    run(["git", "checkout", "params.yaml"], repo, env)
    assert "up to date" in run([*DVC, "status"], repo, env)

    # A device this machine does not have is a bad value too, refused before any output goes.
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([*DVC, "exp", "run", "-S", "train.device=cuda"], cwd=repo,
                              env=env, capture_output=True, text=True)
        assert proc.returncode != 0
        assert "train.device is 'cuda' but no CUDA device" in proc.stdout + proc.stderr
        assert {p: (repo / p).read_bytes() for p in outputs} == before
        # Written back from git, not with `git checkout`: "cuda" and "auto" have the same
        # length, and a change within the second of the last checkout can look unchanged to
        # git's index (racy git), which would leave DVC's value in place.
        (repo / "params.yaml").write_text(run(["git", "show", "HEAD:params.yaml"], repo, env))
        assert "up to date" in run([*DVC, "status"], repo, env)

    # In a temporary copy (--temp, as queued runs do), the workspace is not touched at all.
    proc = subprocess.run([*DVC, "exp", "run", "--temp", "-S", "model.hidden_dim=-3"],
                          cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "model.hidden_dim" in proc.stdout + proc.stderr
    assert run(["git", "status", "--porcelain"], repo, env) == ""
    assert "up to date" in run([*DVC, "status"], repo, env)
    assert {p: (repo / p).read_bytes() for p in outputs} == before


def test_a_failed_download_keeps_the_raw_data(own_pipeline, tmp_path):
    """DVC deletes a stage's outputs before running it unless they persist: data/raw does,
    and the stage replaces it only when all four files verify."""
    repo, env, _ = own_pipeline
    raw = {p.name: p.read_bytes() for p in (repo / "data/raw").iterdir()}
    bad = tmp_path / "bad"
    bad.mkdir()
    source = Path(os.environ.get(ENV_DIR) or DEBIAN_DIR)
    for file in source.iterdir():
        shutil.copy(file, bad / file.name)
    [labels] = bad.glob("t10k-labels-idx1-ubyte*")
    content = bytearray(labels.read_bytes())
    content[len(content) // 2] ^= 0xFF
    labels.write_bytes(bytes(content))
    proc = subprocess.run([*DVC, "repro", "-f", "download"], cwd=repo,
                          env={**env, ENV_DIR: str(bad)}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert str(labels) in proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in (repo / "data/raw").iterdir()} == raw
    assert "up to date" in run([*DVC, "status"], repo, env)
