"""stages/run.sh, the interpreter every DVC stage runs under: its malloc setting."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRINT_TUNABLES = "import os; print(os.environ.get('GLIBC_TUNABLES'))"


def stage_env(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(FMNIST_PYTHON=sys.executable, **extra)
    out = subprocess.run(["sh", "stages/run.sh", "-c", PRINT_TUNABLES], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_stages_run_with_large_blocks_kept_on_the_heap():
    tunables = stage_env().split(":")
    assert "glibc.malloc.mmap_threshold=33554432" in tunables
    assert "glibc.malloc.trim_threshold=4294967296" in tunables


def test_a_glibc_tunables_of_the_users_own_wins():
    assert stage_env(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
