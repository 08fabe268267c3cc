"""Git + DVC repositories with the project's pipeline, for the scenarios that run it.

The slice repository is built once per test run: this checkout's pipeline on the first
``SLICE_LIMIT`` images, committed, with `dvc repro split` done (validate, download, split, their
outputs in DVC's cache) and MLflow's SQLite store created. Each scenario gets a copy of it
(``make_repo``), with its own params committed on top, so no scenario pays for the data
stages again unless it changes their params. Under pytest-xdist the workers share one build
(a file lock in the run's base folder). ``fresh=True`` builds from nothing instead, for the
scenarios about a fresh repository.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from fmnist_crnn.data import DEBIAN_DIR, ENV_DIR
from fmnist_crnn.testing.repository import init_like_a_clone
from fmnist_crnn.tracking import default_tracking_uri

from .conftest import DVC, REPO, stranger_env

# Every scenario's slice unless it needs another: 3,000 training and 3,000 test images.
SLICE_LIMIT = 3000
PROJECT_FILES = ("dvc.yaml", "stages", "src", "MLproject", "python_env.yaml", ".gitignore")


def data_available() -> bool:
    return bool(os.environ.get(ENV_DIR)) or (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()


def require_data() -> None:
    if not data_available():
        message = f"no Fashion-MNIST: install dataset-fashion-mnist or set {ENV_DIR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def update_params(repo: Path, params_update: dict | None) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in (params_update or {}).items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _init(repo: Path, params_update: dict | None) -> dict[str, str]:
    """The project's files in ``repo`` (which must not exist), git and DVC initialised and
    the params committed; returns the environment of a stranger's shell there."""
    repo.mkdir(parents=True)
    for item in PROJECT_FILES:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    update_params(repo, params_update)
    # Not activated: `python` on PATH is the system's, without torch. The stages must find
    # the project's interpreter themselves (stages/run.sh), as in a stranger's fresh shell.
    env = stranger_env(repo)
    init_like_a_clone(repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)
    return env


def _shared_base(tmp_path_factory) -> Path:
    """The folder all xdist workers of this run share (the run's own base without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``base/name``, made by ``build(path)`` on first use: once per test run, whichever
    worker asks first, the others waiting for it. Read it; change only a ``copy``."""
    base = _shared_base(tmp_path_factory)
    target, built = base / name, base / f"{name}.built"
    with FileLock(str(base / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            built.touch()
    return target


def copy(repo: Path, to: Path) -> Path:
    """A copy of a shared repository that a scenario may change: git, DVC's cache and
    outputs, the MLflow store and its journals. The store and the journals name the
    repository by absolute path (artifact locations, the tracking URI): the copy's name its
    own folder, so nothing done in the copy reaches the original."""
    shutil.copytree(repo, to, symlinks=True)
    old, new = f"{repo}/", f"{to}/"
    store = to / "mlflow.db"
    if store.exists():
        with sqlite3.connect(store) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")]
            for table in tables:
                for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                        # Names from the store's own schema, values bound.
                        db.execute(f'UPDATE "{table}" SET "{column[1]}" = '  # noqa: S608
                                   f'replace("{column[1]}", ?, ?) WHERE instr("{column[1]}", ?)',
                                   (old, new, old))
    for path in (to / ".mlflow-journal").rglob("*.json*"):
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
    return to


def _build_slice(template: Path) -> None:
    env = _init(template, {"split": {"limit": SLICE_LIMIT}})
    run([*DVC, "repro", "split"], template, env)
    # MLflow's store with its tables, as a repository's first tracked run leaves it: creating
    # them runs MLflow's schema migrations (about 2.3 s of CPU), once here instead of in every
    # scenario's first run. The store is git-ignored; `copy` renames its paths.
    run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1])"
         ".search_experiments()", default_tracking_uri(template)], template, env)
    run(["git", "add", "-A"], template, env)
    run(["git", "commit", "-qm", "data stages"], template, env)


def make_repo_at(repo: Path, tmp_path_factory, params_update=None, extra_env=None,
                 fresh=False):
    """A git + DVC repository at ``repo`` with the project's pipeline and ``params_update``
    committed. By default a copy of the slice repository (data stages done); ``fresh``: a new
    repository, nothing run."""
    require_data()
    if fresh:
        env = _init(repo, {"split": {"limit": SLICE_LIMIT}})
        update_params(repo, params_update)
        run(["git", "commit", "-qam", "params", "--allow-empty"], repo, env)
    else:
        copy(shared(tmp_path_factory, "slice-template", _build_slice), repo)
        env = stranger_env(repo)
        update_params(repo, params_update)
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "params", "--allow-empty"], repo, env)
    return repo, {**env, **(extra_env or {})}


def make_repo(tmp_path_factory, params_update=None, extra_env=None, name="pipeline",
              fresh=False):
    """``make_repo_at`` in a new folder of the run."""
    return make_repo_at(tmp_path_factory.mktemp(name) / "repo", tmp_path_factory,
                        params_update, extra_env, fresh)
