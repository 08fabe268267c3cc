"""The stages' timing hook for `make bench-overhead`: one JSON line per stage when asked for,
nothing otherwise."""

import json
import subprocess
import time
from pathlib import Path

from fmnist_crnn import timings

REPO = Path(__file__).resolve().parents[1]


def test_a_stage_appends_its_spans_only_when_the_variable_names_a_file(tmp_path, monkeypatch):
    out = tmp_path / "timings.jsonl"
    monkeypatch.delenv(timings.ENV, raising=False)
    timings.write("train", 1.0, 2.0)
    assert not timings.enabled() and not out.exists()

    monkeypatch.setenv(timings.ENV, str(out))
    monkeypatch.setattr(timings, "_spans", {})
    with timings.span("mlflow_open"):
        time.sleep(0.01)
    with timings.span("mlflow_open"):  # spans of one name add up
        time.sleep(0.01)
    timings.write("train", timings.since_process_start(), 3.5)
    timings.write("evaluate", 0.5, 1.0)
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["stage"] == "train" and first["main_s"] == 3.5
    assert first["mlflow_open"] >= 0.02 and first["startup_s"] > 0
    assert second["stage"] == "evaluate"


def test_the_overhead_benchmark_unpacks_a_commit_as_git_stores_it(tmp_path, monkeypatch):
    """`make bench-overhead AGAINST=<commit>` times an older tree: its files, from git."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import overhead

    tree = overhead.project_tree("HEAD", tmp_path / "tree")
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, check=True,
                               capture_output=True).stdout
    assert (tree / "params.yaml").read_bytes() == committed
    assert (tree / "stages" / "train.py").is_file()
