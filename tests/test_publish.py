"""The committed run records in MLflow: records in, FINISHED runs out, idempotent, runs made
here untouched; and the UI's pages of two imported runs, rendered by headless Chromium."""

import json
import shutil
import subprocess
import sys

import mlflow
import pytest

from fmnist_crnn import tracking
from fmnist_crnn.study import catalog, publish
from fmnist_crnn.testing import services

from . import browser
from .conftest import REPO

RECORDS = REPO / "reports" / "study" / "runs" / "ablation"
PICKED = ("ablation-baseline-s42.json", "ablation-hidden256-s42.json")
EXPERIMENT = "fashion-mnist-crnn"


@pytest.fixture
def store(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "reports" / "study"
    (out / "runs" / "ablation").mkdir(parents=True)
    for name in PICKED:
        shutil.copy(RECORDS / name, out / "runs" / "ablation" / name)
    yield out
    mlflow.end_run()


def imported(client, experiment_id):
    return {r.info.run_name: r for r in client.search_runs(
        [experiment_id], filter_string="tags.imported = 'true'")}


def test_records_become_finished_runs_equal_to_the_record(store):
    assert publish.publish(store, EXPERIMENT) == {"added": 2}
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = imported(client, experiment_id)
    assert set(runs) == {"ablation-baseline-s42", "ablation-hidden256-s42"}
    for name, run in runs.items():
        record = json.loads((RECORDS / f"{name}.json").read_text())
        assert run.info.status == "FINISHED"
        # Params under the same dotted keys and spelling as a run made here.
        assert run.data.params["model.hidden_dim"] == str(record["params"]["model"]["hidden_dim"])
        assert run.data.params["model.channels"] == "[32, 64, 128]"
        assert run.data.params["split.limit"] == "null"
        assert len(run.data.params) == len(catalog.flatten(record["params"]))
        for key, values in record["history"].items():
            points = sorted(client.get_metric_history(run.info.run_id, key),
                            key=lambda m: m.step)
            assert [m.step for m in points] == list(range(1, len(values) + 1))
            assert [m.value for m in points] == pytest.approx(values)
        assert run.data.metrics["test_accuracy"] == pytest.approx(record["test_accuracy"])
        assert run.data.metrics["best_val_acc"] == pytest.approx(record["best_val_acc"])
        tags = run.data.tags
        assert (tags["study"], tags["variant"]) == ("ablation", record["variant"])
        assert tags["imported.seed"] == "42" and tags["dvc_exp_name"] == name
        assert tags["imported.file"].endswith(f"ablation/{name}.json")
        assert tags["env.cpu_capability"] == record["environment"]["cpu_capability"]


def test_importing_again_adds_nothing_and_a_changed_record_replaces_its_run(store):
    with tracking.start_run(EXPERIMENT, tags={"study": "ablation"}) as local:
        tracking.log_metrics({"val_acc": 0.5}, step=1)
    publish.publish(store, EXPERIMENT)
    assert publish.publish(store, EXPERIMENT) == {"unchanged": 2}
    path = store / "runs" / "ablation" / PICKED[0]
    record = json.loads(path.read_text())
    record["test_accuracy"] = 0.5
    path.write_text(json.dumps(record))
    assert publish.publish(store, EXPERIMENT) == {"replaced": 1, "unchanged": 1}
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = imported(client, experiment_id)
    assert len(runs) == 2
    assert runs["ablation-baseline-s42"].data.metrics["test_accuracy"] == 0.5
    # The run made here is untouched, and the study's own collection never takes an import.
    kept = client.get_run(local.info.run_id)
    assert kept.info.status == "FINISHED" and "imported" not in kept.data.tags
    assert [m.value for m in client.get_metric_history(local.info.run_id, "val_acc")] == [0.5]
    assert publish.study_runs(EXPERIMENT, "ablation") == {}


def test_the_ui_links_open_the_runs_and_the_metric():
    url = publish.curves_url("http://h:5000/", "3", ["a", "b"])
    assert url.startswith("http://h:5000/#/metric?runs=%5B%22a%22%2C%20%22b%22%5D")
    assert "metric=%22val_acc%22" in url and "experiments=%5B%223%22%5D" in url


@pytest.mark.services
@pytest.mark.browser
def test_the_ui_compares_two_imported_runs_and_draws_their_val_acc(tmp_path):
    services.need("Chromium (Debian package chromium)", browser.chromium() is not None)
    server = services.PlainMlflowServer(tmp_path, services.stranger_base_env())
    server.start()
    try:
        work = tmp_path / "clone"
        (work / "reports/study/runs/ablation").mkdir(parents=True)
        shutil.copy(REPO / "params.yaml", work / "params.yaml")
        for name in PICKED:
            shutil.copy(RECORDS / name, work / "reports/study/runs/ablation" / name)
        env = {**services.stranger_base_env(), "MLFLOW_TRACKING_URI": server.url,
               "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.run([sys.executable, "-m", "fmnist_crnn.study", "publish", "--study",
                               "ablation", "--ui", server.url], cwd=work, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 added" in proc.stdout
        curves = proc.stdout.split("per epoch (`make ui`): ")[1].split()[0]
        client = mlflow.MlflowClient(server.url)
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        ids = [r.info.run_id for r in imported(client, experiment_id).values()]
        names = ("ablation-baseline-s42", "ablation-hidden256-s42")
        compare = browser.dom(publish.compare_url(server.url, experiment_id, ids), tmp_path)
        assert all(name in compare for name in names)
        assert "Comparing 2 Runs" in compare
        chart = browser.dom(curves, tmp_path)
        assert all(f"{name} (val_acc)" in chart for name in names)  # the chart's legend
        assert "Completed Runs" in chart
    finally:
        server.stop()
