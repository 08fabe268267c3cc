"""The environment fingerprint of a run or a benchmark: what decides whether two runs can be
bit-identical (CPU and vector ISA, threads, package versions, the GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist_crnn import distributed


def environment_info(device: str) -> dict[str, Any]:
    """What decides whether two runs can be bit-identical: CPU and its vector ISA as torch
    uses it, threads, package versions, the GPU."""
    from importlib import metadata

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mlflow": metadata.version("mlflow"),
        "dvc": metadata.version("dvc"),
        "numpy": np.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if cuda else "none",
        "cuda_device": torch.cuda.get_device_name(0) if cuda else "none",
        "device": device,
        "processes": distributed.from_env().world_size,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
