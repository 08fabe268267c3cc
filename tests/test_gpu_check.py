"""benchmarks/gpu_check.sh: refuses clearly without CUDA; its checks run (on the CPU) here."""

import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_at_once_saying_so(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: no CUDA device: torch.cuda.is_available() is False")
    assert not out.exists()


@pytest.mark.e2e
def test_every_check_but_nccl_runs_on_the_cpu(tmp_path):
    pytest.importorskip("fmnist_crnn.data")
    from .repos import require_data

    require_data()
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--limit", "1000", "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    # Two runs with one seed on one CPU: bit for bit.
    assert report["default_twice"]["weights_identical"] is True
    assert report["default_twice"]["metrics_identical"] is True
    assert len(report["recipe_amp"]["val_acc"]) == 1
    assert report["nccl"] == {"skipped": "device cpu"}
    assert report["images_per_s"]["cpu"] > 0
