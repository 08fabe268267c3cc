"""A study's head repository for the benchmarks: this checkout's pipeline in a fresh git + DVC
repository with a bare git remote and a local-folder DVC remote, as a team sets it up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CHECKOUT = Path(__file__).resolve().parents[3]  # src/fmnist_crnn/testing -> the checkout
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", ".gitignore", ".dvcignore",
                 "MLproject", "python_env.yaml")


def sh(cmd: list[Any], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; its stdout, or exit naming it with the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-2000:]}")
    return proc.stdout


def init_like_a_clone(repo: Path, env: dict[str, str], project: Path = CHECKOUT) -> None:
    """git and DVC initialised in ``repo`` with the DVC settings ``project`` commits
    (``project``/.dvc/config), as a clone of the project has them: `dvc init` alone would
    turn DVC's usage report after every command back on (about 1 s of CPU each,
    docs/decisions.md)."""
    sh(["git", "init", "-q"], repo, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    shutil.copy(project / ".dvc" / "config", repo / ".dvc" / "config")


def head_repository(root: Path, env: dict[str, str], params: dict[str, Any] | None = None,
                    data_stages: bool = False) -> Path:
    """``root/head``: the pipeline with ``params`` (dotted keys) set, the remotes
    ``root/remote.git`` (origin) and ``root/dvc-store`` (the default DVC remote), committed
    and pushed; ``data_stages``: `dvc repro split` first and its outputs pushed, so workers
    pull the data instead of making it."""
    head = root / "head"
    head.mkdir()
    for item in PROJECT_FILES:
        src = CHECKOUT / item
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, head / item)
    if params:
        values = yaml.safe_load((head / "params.yaml").read_text())
        for key, value in params.items():
            section, name = key.split(".")
            values[section][name] = value
        (head / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    (head / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    dvc = [sys.executable, "-m", "dvc"]
    init_like_a_clone(head, env)
    sh(["git", "init", "-q", "--bare", str(root / "remote.git")], root, env)
    sh(["git", "remote", "add", "origin", str(root / "remote.git")], head, env)
    sh([*dvc, "remote", "add", "-d", "store", str(root / "dvc-store")], head, env)
    if data_stages:
        sh([*dvc, "repro", "split"], head, env)
        sh([*dvc, "push", "-q"], head, env)
    sh(["git", "add", "-A"], head, env)
    sh(["git", "commit", "-qm", "head"], head, env)
    sh(["git", "push", "-q", "origin", "HEAD"], head, env)
    return head
