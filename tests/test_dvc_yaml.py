"""dvc.yaml must declare what each stage reads, or DVC would not re-run it on a change."""

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fmnist_crnn.config import SECTIONS, DeclaredParams, load_params, to_flat_dict
from fmnist_crnn.errors import ConfigError

from .conftest import REPO

PACKAGE = REPO / "src" / "fmnist_crnn"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def stage_module(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared(stage, key):
    entries = STAGES[stage].get(key, [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_pipeline_order():
    assert list(STAGES) == ["validate", "download", "split", "train", "evaluate", "report"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_match_what_the_stage_declares(stage):
    assert set(stage_module(stage).PARAMS) == declared(stage, "params")


def test_every_key_of_params_yaml_is_read_by_a_stage_after_validate():
    """A key no stage reads would change nothing; validate reads them all to check them."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    read = set()
    for stage in list(STAGES)[1:]:
        for entry in stage_module(stage).PARAMS:
            read |= {entry} if "." in entry else {f"{entry}.{key}" for key in written[entry]}
    assert {f"{section}.{key}" for section, values in written.items() for key in values} <= read
    assert set(stage_module("validate").PARAMS) == set(SECTIONS)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_path_argument_is_a_dependency_or_output(stage):
    words = shlex.split(STAGES[stage]["cmd"])
    assert words[:3] == ["sh", "stages/run.sh", f"stages/{stage}.py"]
    paths = [w for w in words[3:] if not w.startswith("--")]
    known = declared(stage, "deps") | declared(stage, "outs") | declared(stage, "metrics")
    reports_dir = {p.split("/")[0] for p in declared(stage, "outs")}
    # dvc.lock is DVC's own record, written by DVC itself: read, never a dependency.
    missing = [p for p in paths if p not in known | reports_dir | {"dvc.lock"}]
    assert not missing


def project_imports(path):
    """The package's modules that ``path`` imports, at module level or inside functions, as
    dotted names below the package (``data``, ``runs.training``; importing a submodule
    imports its package, ``runs``, too)."""
    found = set()

    def add(dotted):
        parts = dotted.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "fmnist_crnn":
                continue
            base = ".".join(parts[1:])
            for alias in node.names:  # `from fmnist_crnn.runs import training`: a module
                dotted = f"{base}.{alias.name}" if base else alias.name
                if module_file(dotted).is_file():
                    add(dotted)
                elif base:
                    add(base)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fmnist_crnn."):
                    add(a.name.split(".", 1)[1])
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"\w+\.py", node.value) and (PACKAGE / node.value).is_file()):
            # A module run by file name (tracking logs served_model.py as the model's code).
            found.add(Path(node.value).stem)
    return found


def module_file(dotted):
    """``runs.training`` -> src/fmnist_crnn/runs/training.py, ``runs`` -> runs/__init__.py."""
    path = PACKAGE.joinpath(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def transitive_imports(path):
    """Every module of the package that running ``path`` can import, directly or not."""
    seen, todo = set(), set(project_imports(path))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo |= project_imports(module_file(module)) - seen
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_every_module_it_imports_directly_or_not(stage):
    deps = declared(stage, "deps")
    assert {f"stages/{stage}.py", "stages/run.sh"} <= deps
    modules = transitive_imports(REPO / "stages" / f"{stage}.py")
    assert "cli" in modules and "errors" in modules
    files = {str(module_file(m).relative_to(REPO)) for m in modules}
    missing = sorted(files - deps)
    assert not missing, f"stage {stage} imports {missing} but dvc.yaml does not list them"
    extra = sorted(d for d in deps if d.startswith("src/") and d not in files)
    assert not extra, f"stage {stage} lists {extra} in dvc.yaml but never imports them"


def test_the_import_walk_sees_imports_inside_functions():
    # cli imports the errors module at the top; tracking imports plots inside a function.
    assert "errors" in project_imports(REPO / "src" / "fmnist_crnn" / "cli.py")
    assert transitive_imports(REPO / "stages" / "download.py") >= {"cli", "config", "data"}


def test_the_evaluate_stage_draws_no_figure():
    # The report stage draws the test confusion heatmap; evaluate logs only its table.
    assert "plots" not in transitive_imports(REPO / "stages" / "evaluate.py")


def test_the_report_stage_runs_without_torch():
    # What the report draws from the model and the images comes from the evaluate stage's
    # views file (fmnist_crnn.views); importing torch would cost every run about 2 s.
    code = ("import sys, runpy; sys.argv = ['report.py', '--help']\n"
            "try:\n    runpy.run_path('stages/report.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_the_import_walk_sees_the_model_code_that_training_logs():
    assert "served_model" in transitive_imports(REPO / "stages" / "train.py")


def test_a_stage_script_reports_errors_without_importing_the_library():
    # The error classes live in a module that imports nothing of the package.
    assert project_imports(REPO / "src" / "fmnist_crnn" / "errors.py") == set()


@pytest.mark.parametrize("stage", list(STAGES))
def test_metrics_are_small_json_files_outside_the_cache(stage):
    for entry in STAGES[stage].get("metrics", []):
        [(path, options)] = entry.items()
        # metrics/*.json, and the file DVCLive writes each epoch (dvclive/metrics.json)
        assert path.startswith(("metrics/", "dvclive/")) and path.endswith(".json")
        assert options == {"cache": False}


def test_declared_params_refuse_undeclared_sections_and_keys():
    view = DeclaredParams(load_params(REPO / "params.yaml"), ("split", "tracking.study"))
    assert view.split.val_fraction == 0.3 and view.tracking.study is None
    with pytest.raises(AttributeError, match="section 'model' but declares only"):
        _ = view.model
    with pytest.raises(AttributeError, match="key 'tracking.champion_alias' but declares only"):
        _ = view.tracking.champion_alias
    assert set(to_flat_dict(view)) == {"split.val_fraction", "split.stratify", "split.seed",
                                       "split.limit", "tracking.study"}


def test_a_declared_key_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigError, match="'tracking.alias'.*champion_alias"):
        DeclaredParams(load_params(REPO / "params.yaml"), ("tracking.alias",))


def test_dvc_confusion_plot_has_the_png_orientation():
    # plots.confusion_figure: predicted on the x axis, actual on the y axis.
    [confusion] = [next(iter(p.values())) for p in DVC["plots"]
                   if isinstance(p, dict) and "confusion" in p]
    assert confusion["x"] == "predicted"
    assert confusion["y"] == {"plots/test_predictions.csv": "actual"}


def test_generated_outputs_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"/dvc_plots/", "/mlflow.db", "/mlartifacts/", "/.venv"} <= set(ignored)


def test_the_module_plan_holds():
    """MLflow is imported in the tracking package, the record import (study/publish.py) and the
    server's user administration (server.py) only; tracking does not draw; no module of
    tracking is over 300 lines; no library module imports the stages; nothing outside tests/
    imports the tests."""
    src = REPO / "src" / "fmnist_crnn"
    for path in [*src.rglob("*.py"), *(REPO / "benchmarks").glob("*.py"),
                 *(REPO / "stages").glob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module}
        mlflow_allowed = (path.is_relative_to(src / "tracking")
                          or path in (src / "study" / "publish.py", src / "server.py"))
        if path.is_relative_to(src) and not mlflow_allowed:
            assert "mlflow" not in imported, f"{path} imports mlflow"
        assert "tests" not in imported, f"{path} imports the test suite"
        if path.is_relative_to(src):
            assert "stages" not in imported, f"{path} imports the stages"
    for path in (src / "tracking").glob("*.py"):
        assert "plots" not in project_imports(path), path
        assert len(path.read_text().splitlines()) <= 300, f"{path} is over 300 lines"


def test_no_function_in_the_library_or_the_stages_is_over_80_lines():
    long = []
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long


@pytest.mark.parametrize("where", ["the project", "a repository made like a clone"])
def test_dvc_sends_no_usage_report(where, tmp_path, monkeypatch):
    """The project's .dvc/config turns DVC's usage report off (docs/decisions.md), and the
    repositories the tests and benchmarks build keep it off, as a clone does."""
    from dvc import analytics

    from fmnist_crnn.testing.repository import init_like_a_clone

    for name in ("DVC_NO_ANALYTICS", "DVC_TEST"):
        monkeypatch.delenv(name, raising=False)
    root = REPO
    if where != "the project":
        root = tmp_path / "repo"
        root.mkdir()
        init_like_a_clone(root, {**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    monkeypatch.chdir(root)
    assert not analytics.is_enabled()
