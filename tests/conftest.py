"""Shared fixtures: synthetic IDX files in tmp_path, the repository root."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from fmnist_crnn.data import RawFile

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
