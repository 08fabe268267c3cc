"""Shared fixtures: synthetic IDX files in tmp_path, the repository root."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
from pathlib import Path

# One torch thread per process, set before anything imports torch, and inherited by every
# stage, worker and torchrun process the scenarios start. The suite runs two pytest-xdist
# workers on two cores, and scenarios start trainings side by side (queued experiments, Dask
# workers, torchrun): torch's OpenMP threads spin while they wait, so two processes with two
# threads each on two cores trained 3.7x slower than with one thread each (60 steps of the
# default CRNN: 10.6 s against 2.9 s, docs/results.md). A value of your own wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from fmnist_crnn.data import RawFile
from fmnist_crnn.testing.services import ServiceUnavailable

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x08 = unsigned byte)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_arrays(n_train: int = 32, n_test: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        # Class-dependent brightness so a model can learn something from 32 images.
        images = rng.integers(0, 60, size=(n, 28, 28)) + labels[:, None, None] * 19
        arrays[f"{prefix}-images-idx3-ubyte"] = images.astype(np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    return arrays


@pytest.fixture
def synthetic_source(tmp_path):
    """A folder with four gzipped synthetic IDX files, and their RawFile digests."""
    folder = tmp_path / "source"
    folder.mkdir()
    files = []
    for name, array in synthetic_arrays().items():
        content = idx_bytes(array)
        (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        files.append(RawFile(name, hashlib.sha256(content).hexdigest()))
    return folder, tuple(files)


@pytest.fixture
def raw_dir(tmp_path):
    """A folder with decompressed synthetic IDX files (64 train, 32 test), as download writes."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for name, array in synthetic_arrays(n_train=64).items():
        (folder / name).write_bytes(idx_bytes(array))
    return folder


# A stranger's shell: nothing activated, the system's PATH, no tracking or DVC variables.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
DVC = [sys.executable, "-m", "dvc"]  # the venv's dvc, called by path as `.venv/bin/dvc` is


def stranger_env(repo: Path) -> dict[str, str]:
    """The environment of a fresh shell in ``repo``, whose ``.venv`` is this test run's
    environment (as `make setup` would have made it). Stages find it themselves."""
    venv = repo / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=SYSTEM_PATH, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def activated(env: dict[str, str]) -> dict[str, str]:
    """``env`` after `source .venv/bin/activate`, as the README asks for bare commands."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            "VIRTUAL_ENV": sys.prefix}


# The tiers of the suite (pyproject.toml): a test marked by what it needs is `slow` as well, so
# `-m "not slow"` (make test-fast) is the inner loop and `-m e2e` etc. one tier of the rest.
TIERS = ("e2e", "services", "distributed", "browser")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """A service that is not installed here skips its scenarios, except in CI, where a missing
    service is a failure (fmnist_crnn.testing.services)."""
    try:
        return (yield)
    except ServiceUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
