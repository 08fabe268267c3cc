"""dvc.yaml must declare what each stage reads, or DVC would not re-run it on a change."""

import importlib.util
import shlex

import pytest
import yaml

from fmnist_crnn.cli import SectionView
from fmnist_crnn.config import load_params

from .conftest import REPO

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
    assert list(STAGES) == ["download", "split", "train", "evaluate", "report"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_sections_match_what_the_stage_reads(stage):
    assert set(stage_module(stage).SECTIONS) == declared(stage, "params")


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_path_argument_is_a_dependency_or_output(stage):
    words = shlex.split(STAGES[stage]["cmd"])
    assert words[:3] == ["PYTHONPATH=src", "python", f"stages/{stage}.py"]
    paths = [w for w in words[3:] if not w.startswith("--")]
    known = declared(stage, "deps") | declared(stage, "outs") | declared(stage, "metrics")
    reports_dir = {p.split("/")[0] for p in declared(stage, "outs")}
    # dvc.lock is DVC's own record, written by DVC itself: read, never a dependency.
    missing = [p for p in paths if p not in known | reports_dir | {"dvc.lock"}]
    assert not missing


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_its_script_and_the_modules_it_imports(stage):
    deps = declared(stage, "deps")
    assert f"stages/{stage}.py" in deps
    source = (REPO / "stages" / f"{stage}.py").read_text()
    [line] = [x for x in source.splitlines() if x.startswith("from fmnist_crnn import ")]
    modules = [m.strip() for m in line.removeprefix("from fmnist_crnn import ").split(",")]
    assert modules and all(f"src/fmnist_crnn/{m}.py" in deps for m in modules)


@pytest.mark.parametrize("stage", list(STAGES))
def test_metrics_are_small_json_files_outside_the_cache(stage):
    for entry in STAGES[stage].get("metrics", []):
        [(path, options)] = entry.items()
        assert path.startswith("metrics/") and path.endswith(".json")
        assert options == {"cache": False}


def test_section_view_refuses_undeclared_sections():
    view = SectionView(load_params(REPO / "params.yaml"), ("split",))
    assert view.split.val_fraction == 0.3
    with pytest.raises(AttributeError, match="declares only"):
        _ = view.model
