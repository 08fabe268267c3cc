import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from dvc.utils.hydra import apply_overrides

from fmnist_crnn import study
from fmnist_crnn.config import load_params
from fmnist_crnn.model import CRNN
from fmnist_crnn.study import catalog

from .conftest import REPO


@pytest.mark.parametrize("name", list(study.ALL_VARIANTS))
def test_variant_overrides_parse_build_and_train_one_step(name, tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_path)
    # The same override syntax and parser that `dvc exp run -S` uses.
    args = study.override_args({**study.ALL_VARIANTS[name].overrides, "train.seed": 7,
                                "tracking.study": "s1", "tracking.variant": name})
    apply_overrides(params_path, args[1::2])
    params = load_params(params_path)
    for key, value in study.ALL_VARIANTS[name].overrides.items():
        section, field = key.split(".")
        got = getattr(getattr(params, section), field)
        assert (list(got) if isinstance(got, tuple) else got) == value
    assert (params.tracking.study, params.tracking.variant) == ("s1", name)
    model = CRNN(params.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.arange(4))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_recipe_ladder_adds_one_ingredient_per_step_and_ends_at_the_recipe():
    steps = list(study.RECIPE_VARIANTS.values())
    for before, after in zip(steps, steps[1:], strict=False):
        assert before.overrides.items() < after.overrides.items()  # cumulative
    assert study.RECIPE == steps[-1].overrides
    params_path = Path(REPO / "params.yaml")
    raw = yaml.safe_load(params_path.read_text())
    from fmnist_crnn.config import params_from_dict
    from fmnist_crnn.model import count_parameters

    for key, value in study.RECIPE.items():
        section, field = key.split(".")
        raw[section][field] = value
    params = params_from_dict(raw)
    assert count_parameters(CRNN(params.model)) < 2_000_000  # the budget
    assert params.train.epochs == study.RECIPE_EPOCHS


@pytest.mark.parametrize("name", sorted(study.RECIPES))
def test_recipes_are_valid_params_under_the_parameter_budget(name):
    from fmnist_crnn.config import params_from_dict
    from fmnist_crnn.model import count_parameters

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in study.RECIPES[name].items():
        section, field = key.split(".")
        raw[section][field] = value
    params = params_from_dict(raw)
    assert count_parameters(CRNN(params.model)) < 2_000_000
    share = 0.1 if "-wu10-" in name else 0.2  # the one probe of a shorter rise
    assert params.train.warmup_epochs == pytest.approx(share * params.train.epochs)


def test_the_full_training_set_recipe_is_the_recipe_without_validation_on_42_epochs():
    ladder_42 = {**study.scale_to_epochs(study.RECIPE, 42), "train.epochs": 42}
    assert study.RECIPES["best-60k-42ep"] == {
        **study.RECIPES["best"], **ladder_42, "split.val_fraction": 0}
    assert study.RECIPES["best-60k-42ep"]["train.warmup_epochs"] == pytest.approx(0.2 * 42)
    # Every named recipe runs as a study variant too (`make seeds RECIPE=best-60k-42ep`), and a
    # named recipe never shares its name with a ladder step or an ablation variant.
    for name in study.RECIPES:
        assert study.ALL_VARIANTS[name].overrides == study.RECIPES[name]
    assert not set(study.RECIPES) & (set(study.RECIPE_VARIANTS) | set(study.VARIANTS))


def test_the_no_dropout_recipes_are_the_full_training_set_recipe_without_dropout():
    best_60k_30 = {**study.scale_to_epochs(study.RECIPES["best-60k-42ep"], 30), "train.epochs": 30}
    assert study.RECIPES["best-60k-nodrop-30ep"] == {
        **best_60k_30, "model.dropout": [0.0, 0.0, 0.0, 0.0]}
    best_60k_28 = {**study.scale_to_epochs(study.RECIPES["best-60k-nodrop-30ep"], 28),
                   "train.epochs": 28}
    assert study.RECIPES["best-60k-nodrop-28ep"] == best_60k_28
    assert best_60k_28["train.warmup_epochs"] == pytest.approx(0.2 * 28)
    assert study.RECIPES["best-60k-nodrop-29ep"] == {
        **study.scale_to_epochs(study.RECIPES["best-60k-nodrop-30ep"], 29), "train.epochs": 29}
    assert study.RECIPES["best-60k-nodrop-52ep"] == {
        **study.scale_to_epochs(study.RECIPES["best-60k-nodrop-30ep"], 52), "train.epochs": 52}
    # Its 70:30 probe differs from the ladder's 22 epochs in the dropout alone.
    assert study.RECIPES["best-nodrop-22ep"] == {
        **study.RECIPES["best-22ep"], "model.dropout": [0.0, 0.0, 0.0, 0.0]}
    for width in (512, 384):
        assert study.RECIPES[f"best-nodrop-p{width}-22ep"] == {
            **study.RECIPES["best-nodrop-22ep"], "model.projection_dim": width}
    assert study.RECIPES["best-nodrop-e50-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "augment.erasing": 0.5}
    assert study.RECIPES["best-nodrop-la5-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.lookahead_steps": 5}
    assert study.RECIPES["best-nodrop-wh-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.whiten_first_conv": True}
    assert study.RECIPES["best-nodrop-w96-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "model.channels": [48, 96, 96, 128]}
    assert study.RECIPES["best-nodrop-b256-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.batch_size": 256}
    assert study.RECIPES["best-nodrop-b256-lr42-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.batch_size": 256, "train.lr": 0.0042}
    assert study.RECIPES["best-nodrop-lr5-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.lr": 0.005}
    assert study.RECIPES["best-nodrop-wu10-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.warmup_epochs": 2.2}
    assert study.RECIPES["best-nodrop-e0-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "augment.erasing": 0.0}
    assert study.RECIPES["fast-60k-6ep-nb8-id"] == {
        **study.scale_to_epochs(study.RECIPES["fast-60k-7ep-nb8"], 6), "train.epochs": 6,
        "train.identity_init": True}
    assert study.RECIPES["fast-60k-7ep-nb8-id"] == {
        **study.RECIPES["fast-60k-7ep-nb8"], "train.identity_init": True}
    assert study.RECIPES["normbias8-id-bf16-7ep"] == {
        **study.RECIPES["normbias8-bf16-7ep"], "train.identity_init": True}
    for name, decay in (("normbias8-id-ema-bf16-7ep", 0.999),
                        ("normbias8-id-ema995-bf16-7ep", 0.995)):
        assert study.RECIPES[name] == {
            **study.RECIPES["normbias8-id-bf16-7ep"], "train.ema_decay": decay}
    assert study.RECIPES["normbias8-id-ema-bf16-6ep"] == {
        **study.scale_to_epochs(study.RECIPES["normbias8-id-ema-bf16-7ep"], 6), "train.epochs": 6}
    assert study.RECIPES["normbias8-id-bf16-6ep"] == {
        **study.scale_to_epochs(study.RECIPES["normbias8-id-bf16-7ep"], 6), "train.epochs": 6}
    assert study.RECIPES["best-nodrop-id-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.identity_init": True}
    assert study.RECIPES["best-nodrop-ls2-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.label_smoothing": 0.2}
    for n in (3, 6):
        assert study.RECIPES[f"best-nodrop-pl{n}-22ep"] == {
            **study.RECIPES["best-nodrop-22ep"], "augment.plain_last_epochs": n}
    assert study.RECIPES["best-nodrop-ue6-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "augment.unerased_last_epochs": 6}
    assert study.RECIPES["best-nodrop-cm5-e0-um8-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "augment.unmixed_last_epochs": 8}
    assert study.RECIPES["best-nodrop-cm5-e0-h192-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "model.hidden_dim": 192}
    assert study.RECIPES["best-nodrop-cm5-e0-ls0-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "train.label_smoothing": 0.0}
    assert study.RECIPES["best-nodrop-cm5-52ep"] == {
        **study.RECIPES["best-nodrop-52ep"], "augment.cutmix": 0.5}
    assert study.RECIPES["best-nodrop-cm5-e0-ema9995-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "train.ema_decay": 0.9995}
    assert study.RECIPES["best-nodrop-cm5-e0-lr2-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "train.lr": 0.002}
    assert study.RECIPES["best-nodrop-cm5-e0-wd10-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "train.weight_decay": 0.1}
    assert study.RECIPES["best-nodrop-cm5-e0-cp1-52ep"] == {
        **study.RECIPES["best-nodrop-cm5-e0-52ep"], "augment.crop_padding": 1}
    deeper = study.RECIPES["best-nodrop-d6-22ep"]
    assert deeper == {**study.RECIPES["best-nodrop-22ep"], **{
        key: deeper[key] for key in ("model.channels", "model.kernel_sizes", "model.strides",
                                     "model.pool", "model.dropout")}}
    assert deeper["model.channels"] == [32, 64, 64, 64, 128, 128]
    assert deeper["model.pool"] == [True, False, False, True, False, False]
    assert study.RECIPES["best-nodrop-cm5-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "augment.cutmix": 0.5}
    assert study.RECIPES["best-nodrop-cm5-e0-22ep"] == {
        **study.RECIPES["best-nodrop-cm5-22ep"], "augment.erasing": 0.0}
    assert study.RECIPES["best-nodrop-l2-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "model.num_layers": 2}
    for name, p in (("best-nodrop-mu5-22ep", 0.5), ("best-nodrop-mu2-22ep", 0.2)):
        assert study.RECIPES[name] == {**study.RECIPES["best-nodrop-22ep"], "augment.mixup": p}
    assert study.RECIPES["best-nodrop-b64-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "train.batch_size": 64}
    assert study.RECIPES["best-nodrop-k5-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "model.kernel_sizes": [5, 3, 3, 3]}
    assert study.RECIPES["best-nodrop-h192-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "model.hidden_dim": 192}
    for name, decay in (("best-nodrop-wd02-22ep", 0.02), ("best-nodrop-wd10-22ep", 0.1)):
        assert study.RECIPES[name] == {**study.RECIPES["best-nodrop-22ep"],
                                       "train.weight_decay": decay}
    sgd = {**study.RECIPES["best-nodrop-22ep"], "train.optimizer": "sgd",
           "train.weight_decay": 0.0005}
    for name, lr in (("best-nodrop-sgd5-22ep", 0.05), ("best-nodrop-sgd10-22ep", 0.1)):
        assert study.RECIPES[name] == {**sgd, "train.lr": lr}
    assert study.RECIPES["best-nodrop-col-22ep"] == {
        **study.RECIPES["best-nodrop-22ep"], "model.sequence": "columns"}
    for name, padding in (("best-nodrop-cp1-22ep", 1), ("best-nodrop-cp3-22ep", 3)):
        assert study.RECIPES[name] == {**study.RECIPES["best-nodrop-22ep"],
                                       "augment.crop_padding": padding}
    for epochs in (28, 52):
        assert study.RECIPES[f"best-60k-nodrop-cp1-{epochs}ep"] == {
            **study.RECIPES[f"best-60k-nodrop-{epochs}ep"], "augment.crop_padding": 1}
    assert study.RECIPES["best-nodrop-e50-52ep"] == {
        **study.RECIPES["best-nodrop-52ep"], "augment.erasing": 0.5}
    for prefix in ("best-nodrop", "best-60k-nodrop"):
        assert study.RECIPES[f"{prefix}-cm5-e0-52ep"] == {
            **study.RECIPES[f"{prefix}-52ep"], "augment.cutmix": 0.5, "augment.erasing": 0.0}
    assert study.RECIPES["best-60k-nodrop-cm5-e0-60ep"] == {
        **study.scale_to_epochs(study.RECIPES["best-60k-nodrop-cm5-e0-52ep"], 60),
        "train.epochs": 60}
    assert study.RECIPES["best-60k-nodrop-cm5-e0-52ep-tta26"] == {
        **study.RECIPES["best-60k-nodrop-cm5-e0-52ep"], "evaluate.tta_shift": 2,
        "evaluate.tta_moves": "diamond"}
    assert study.RECIPES["best-60k-nodrop-cm5-e0-cp1-52ep-tta26"] == {
        **study.RECIPES["best-60k-nodrop-cm5-e0-52ep-tta26"], "augment.crop_padding": 1}
    assert study.RECIPES["best-60k-nodrop-cm5-e0-cp1-52ep-sq18"] == {
        **study.RECIPES["best-60k-nodrop-cm5-e0-cp1-52ep-tta26"], "evaluate.tta_shift": 1,
        "evaluate.tta_moves": "square"}


def test_the_recipe_is_the_ladder_in_bfloat16_on_60_epochs_scored_on_ten_views():
    ladder = study.scale_to_epochs(study.RECIPE, 60)
    assert study.RECIPES["best"] == {**ladder, "train.epochs": 60, "train.amp": True,
                                     "train.amp_validation": True, "evaluate.tta_shift": 1}
    assert study.RECIPES["best"]["evaluate.tta_hflip"] is True
    # The archive's steps to it: the same training validated in float32, then scored on 10
    # views, differs from the recipe only in the per-epoch validation's precision.
    assert study.RECIPES["bf16-60ep-tta10"] == {**study.RECIPES["bf16-60ep"],
                                                "evaluate.tta_shift": 1}
    assert study.RECIPES["best"] == {**study.RECIPES["bf16-60ep-tta10"],
                                     "train.amp_validation": True}


def test_the_archived_records_match_their_recipes():
    """Each recipe's records (reports/study/runs/<recipe>/) were planned with its overrides."""
    runs = REPO / "reports" / "study" / "runs"
    for name, overrides in study.RECIPES.items():
        plan = runs / name / "plan.json"
        if not plan.exists():
            continue
        for entry in json.loads(plan.read_text())["runs"].values():
            planned = {k: v for k, v in entry["overrides"].items()
                       if k not in ("train.seed", "tracking.study", "tracking.variant")}
            assert planned == overrides, name


def test_a_ladder_study_scales_the_recipe_warmup_from_its_own_epochs():
    last = study.ALL_VARIANTS["ema-clip"]
    runs = study.run_overrides(last, 42, "ingredients-6ep", {"train.epochs": 6})
    assert runs["train.epochs"] == 6
    share = study.RECIPES["best"]["train.warmup_epochs"] / study.RECIPES["best"]["train.epochs"]
    assert runs["train.warmup_epochs"] == pytest.approx(share * 6)


def test_shorter_ladders_keep_the_warmup_share():
    scaled = study.scale_to_epochs(study.RECIPE, 5)
    assert scaled["train.warmup_epochs"] == pytest.approx(1.0)
    assert study.scale_to_epochs(study.VARIANTS["final"].overrides, 5) == (
        study.VARIANTS["final"].overrides)


def test_tta_runs_get_a_row_without_tta_just_above():
    records = [record("baseline", s, 0.89) for s in (1, 2)]
    records += [{**record("ema-clip", s, a), "test_accuracy_without_tta": a - 0.002}
                for s, a in ((1, 0.93), (2, 0.932))]
    lines, summary = study.comparison_table(records)
    names = [s["variant"] for s in summary]
    assert names == ["baseline", "ema-clip (no TTA)", "ema-clip"]
    assert summary[2]["delta_vs_row_above"] == pytest.approx(0.2)
    assert summary[1]["delta_vs_row_above"] == pytest.approx(3.9)
    # A ladder reads row by row: the step column is there, one cell per header cell.
    assert "Δ vs row above" in lines[0]
    assert {line.count("|") for line in lines} == {lines[0].count("|")}
    assert "+ flip TTA at test" in lines[-1]
    # The change names what the runs' evaluate stage averaged.
    ten = {"params": {"evaluate": {"tta_hflip": True, "tta_shift": 1}}}
    assert study.comparison.tta_change(ten).endswith("mirrors of all five (10 views)")
    lines, _ = study.comparison_table([{**r, **ten} for r in records])
    assert "moves by 1 pixel up, down, left and right" in lines[-1]
    diamond = {"params": {"evaluate": {"tta_hflip": True, "tta_shift": 2, "tta_moves": "diamond"}}}
    assert study.comparison.tta_change(diamond).endswith(
        "moves of up to 2 pixels in all, and the mirrors of all 13 (26 views)")


def test_comparison_is_rebuilt_from_records_and_names_missing_runs(tmp_path):
    from fmnist_crnn.study import records
    from fmnist_crnn.study.comparison import compare

    plan = {f"s-{v}-{seed}": {"variant": v, "seed": seed, "overrides": {}}
            for v in ("baseline", "hidden256") for seed in (1, 2)}
    records.add_to_plan(tmp_path, "s", plan)
    folder = records.runs_dir(tmp_path, "s")
    for name, acc in (("s-baseline-1", 0.89), ("s-baseline-2", 0.891),
                      ("s-hidden256-1", 0.9)):
        variant = name.split("-")[1]
        rec = {**record(variant, int(name[-1]), acc), "name": name,
               "history": {"val_acc": [0.8, acc]}}
        (folder / f"{name}.json").write_text(json.dumps(rec))
    path = compare("s", tmp_path)
    text = path.read_text()
    assert "Runs recorded: 3" in text and "Missing (1): s-hidden256-2" in text
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["missing"] == ["s-hidden256-2"]
    assert [len(v["runs"]) for v in report["variants"]] == [2, 1]
    assert (tmp_path / "s_val_acc.png").stat().st_size > 0


def test_variants_are_data_a_user_can_extend():
    from fmnist_crnn.study import catalog

    assert list(catalog.VARIANTS) == ["baseline", "conv2", "pool2", "kernels222", "kernels333",
                                      "kernels555", "hidden256", "dropout01", "dropout01x1",
                                      "final"]
    assert catalog.VARIANTS["hidden256"].overrides == {"model.hidden_dim": 256}
    assert (catalog.HERE / "variants.yaml").exists()


def test_variant_command_is_one_dvc_exp_run():
    command = study.variant_command(study.VARIANTS["final"])
    assert command == ("dvc exp run -n final -S model.hidden_dim=256 "
                       "-S 'model.dropout=[0.1,0.1,0.1]'")


def test_run_help_fits_one_screen_and_names_where_the_variants_are(capsys):
    from fmnist_crnn.study.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 40
    words = " ".join(text.split())  # as argparse wrapped it to the terminal's width
    assert "kernels555" not in words and "`python -m fmnist_crnn.study commands`" in words


def record(variant, seed, acc):
    return {"name": f"s-{variant}-{seed}", "study": "s", "variant": variant, "seed": seed,
            "epochs": 20, "limit": None, "test_accuracy": acc, "test_loss": 1 - acc,
            "best_val_acc": acc, "params_count": 1000, "train_seconds": 10.0}


def test_table_has_mean_std_delta_and_noise_verdict():
    records = [record("baseline", s, a) for s, a in ((1, 0.890), (2, 0.892), (3, 0.891))]
    records += [record("hidden256", s, a) for s, a in ((1, 0.900), (2, 0.902), (3, 0.901))]
    records += [record("dropout01", s, a) for s, a in ((1, 0.880), (2, 0.900), (3, 0.893))]
    lines, summary = study.comparison_table(records)
    text = "\n".join(lines)
    assert "| baseline |" in text and "89.10 ± 0.10" in text
    hidden = next(s for s in summary if s["variant"] == "hidden256")
    assert hidden["delta_points"] == pytest.approx(1.0)
    assert hidden["beyond_noise"].startswith("yes")
    dropout = next(s for s in summary if s["variant"] == "dropout01")
    assert dropout["beyond_noise"].startswith("no")
    # Between ablations a "Δ vs row above" would compare unrelated variants: no such column.
    assert "row above" not in lines[0]
    assert {line.count("|") for line in lines} == {lines[0].count("|")}


def test_a_record_commit_names_the_run_within_its_study(tmp_path, monkeypatch):
    """A long study name does not make a long subject: the subject names the run without the
    study's prefix, the body the full run name."""
    from fmnist_crnn.study.__main__ import commit_record

    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "t")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "t@example.invalid")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    study_name = "best-60k-nodrop-30ep-retimed"
    run = f"{study_name}-best-60k-nodrop-30ep-s44"
    Path("r.json").write_text("{}")
    commit_record(study_name, run, [Path("r.json")])
    message = subprocess.run(["git", "log", "-1", "--format=%s%n%b"], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert message[0] == f"study {study_name}: record best-60k-nodrop-30ep-s44"
    assert len(message[0]) <= 72
    assert f"Run: {run}" in message


def test_each_record_carries_its_reference_and_the_table_its_ratio(tmp_path):
    from fmnist_crnn.study import records as rec

    runs = [record("fast", s, 0.93) for s in (42, 43, 44)]
    for r in runs:
        r["name"] = f"t-fast-s{r['seed']}"
        rec.write_record(tmp_path, "t", r)
    names = [r["name"] for r in runs]
    rec.set_reference(tmp_path, "t", names[:2], "before", 8.0)
    rec.set_reference(tmp_path, "t", names[:2], "after", 12.5, note="timed around")
    rec.set_reference(tmp_path, "t", names[2:], "before", 20.0)
    stored = rec.read_records(tmp_path, "t")
    assert stored[0][rec.REFERENCE_KEY] == {"before": 8.0, "after": 12.5, "note": "timed around"}
    assert stored[2][rec.REFERENCE_KEY] == {"before": 20.0, "after": None}
    # 10 s of training: 1.25x the shorter reference of the first two, 0.50x of the third.
    assert [rec.reference_ratio(r) for r in stored] == [1.25, 1.25, 0.5]
    lines, _ = study.comparison_table(stored)
    header = [c.strip() for c in lines[0].split("|")]
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[header.index("x the default run")] == "0.50x-1.25x"
    # Records without references: no such column.
    assert "x the default run" not in study.comparison_table([record("fast", 1, 0.9)])[0][0]


def test_reference_timing_refuses_a_changed_params_yaml(tmp_path, monkeypatch, capsys):
    from fmnist_crnn.study import __main__ as cli

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.catalog, "committed_resets", lambda root: {"train.epochs": 20})
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "--study", "t", "--variants", "fast", "--reference", "--out",
                  str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "--reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was planned


def test_holm_adjusts_for_the_number_of_variants_tested():
    adjusted = study.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1, never below the step before.
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert study.holm({"a": 0.6, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_many_near_five_percent_verdicts_do_not_survive_holm():
    records = [record("baseline", s, a) for s, a in ((1, 0.890), (2, 0.895), (3, 0.885))]
    for variant, shift in (("conv2", 0.008), ("kernels555", 0.009), ("dropout01", 0.030)):
        records += [record(variant, s, a + shift)
                    for s, a in ((1, 0.890), (2, 0.896), (3, 0.884))]
    lines, summary = study.comparison_table(records)
    assert "after Holm (3 tests)" in lines[0]
    by_name = {s["variant"]: s for s in summary}
    assert by_name["dropout01"]["beyond_noise_holm"].startswith("yes")
    assert by_name["kernels555"]["p_value"] < 0.2
    assert by_name["kernels555"]["p_value_holm"] > by_name["kernels555"]["p_value"]
    assert by_name["baseline"]["beyond_noise_holm"] is None
    assert {line.count("|") for line in lines} == {lines[0].count("|")}


def test_collect_experiments_reads_dvc_exp_show_json():
    def node(name, variant, acc):
        return {"rev": f"rev-{name}-{acc}", "name": name, "data": {
            "params": {"params.yaml": {"data": {
                "tracking": {"study": "s", "variant": variant}, "train": {"seed": 1,
                                                                         "epochs": 2},
                "split": {"limit": None}}}},
            "metrics": {"metrics/test.json": {"data": {"accuracy": acc, "loss": 0.3}},
                        "metrics/train.json": {"data": {"best_val_acc": acc,
                                                        "params_count": 5,
                                                        "train_seconds": 1.0}}}}}
    shown = [{"rev": "workspace", "data": {"params": {}, "metrics": {}}},
             {"rev": "main", "data": {"params": {}}, "experiments": [
                 {"revs": [node("s-baseline-s1", "baseline", 0.8)]},
                 {"revs": [node("s-final-s1", "final", 0.9)]},
                 {"revs": [dict(node("other", "final", 0.5), data={
                     **node("other", "final", 0.5)["data"],
                     "params": {"params.yaml": {"data": {"tracking": {"study": "t"}}}}})]}]}]
    # The same experiment again as a bare commit, named by its revision only.
    shown[1]["experiments"].append({"revs": [{**node("s-baseline-s1", "baseline", 0.8),
                                              "name": None}]})
    failed = dict(node("s-final-s1", "final", 0.1), error={"msg": "Experiment run failed"})
    running = node("s-final-s1", "final", 0.2)
    running["data"]["rev"] = "workspace"  # how `dvc exp show` reports a running experiment
    shown[1]["experiments"] += [{"revs": [failed]}, {"revs": [running]}]
    records = study.collect_experiments("s", shown)
    assert [(r["variant"], r["test_accuracy"]) for r in records] == [("baseline", 0.8),
                                                                     ("final", 0.9)]


@pytest.mark.e2e
def test_two_queued_variants_run_in_parallel_and_are_compared(tmp_path_factory):
    from .repos import make_repo

    repo, env = make_repo(tmp_path_factory, {"train": {"epochs": 1},
                                             "tracking": {"log_model": False}}, name="queue")
    proc = subprocess.run(
        [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", "tiny",
         "--variants", "baseline", "dropout01", "--jobs", "2", "--out", "reports/study",
         "--poll", "5"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((repo / "reports/study/tiny.json").read_text())
    assert report["missing"] == []
    summary = report["variants"]
    assert [s["variant"] for s in summary] == ["baseline", "dropout01"]
    recorded = sorted(p.name for p in (repo / "reports/study/runs/tiny").glob("*.json"))
    assert recorded == ["plan.json", "tiny-baseline-s42.json", "tiny-dropout01-s42.json"]
    table = (repo / "reports/study/tiny.md").read_text()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fashion-mnist-crnn"], output_format="list",
                              filter_string="tags.study = 'tiny'")
    assert sorted(r.data.tags["variant"] for r in runs) == ["baseline", "dropout01"]
    assert all(r.info.status == "FINISHED" for r in runs)  # both landed, nothing lost
    for row in summary:
        [run] = [r for r in runs if r.data.tags["variant"] == row["variant"]]
        acc = run.data.metrics["test_accuracy"]
        assert row["runs"][0]["test_accuracy"] == pytest.approx(acc)
        assert f"{acc * 100:.2f}" in table
    assert (repo / "reports/study/tiny_val_acc.png").exists()
    for row in summary:  # each record carries its curve and the environment it ran in
        [run_record] = row["runs"]
        assert len(run_record["history"]["val_acc"]) == 1
        assert run_record["environment"]["torch_threads"]

    # Run again: everything is recorded, nothing is queued, the table is rebuilt.
    proc = subprocess.run(
        [sys.executable, "-m", "fmnist_crnn.study", "run", "--study", "tiny",
         "--variants", "baseline", "dropout01", "--jobs", "2", "--out", "reports/study",
         "--poll", "5"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 planned, 2 recorded, 0 to run" in proc.stdout
    assert "queued" not in proc.stdout


def test_waiting_collects_only_when_a_run_finished(monkeypatch):
    from fmnist_crnn.study import queue

    def status(*states):
        rows = [f"t{i}  s-v-{i}  10:00 PM  {state}" for i, state in enumerate(states)]
        return "\n".join(["Task  Name  Created  Status", *rows, "",
                          "Worker status: 1 active, 0 idle"])

    rounds = iter([status("Running", "Queued"), status("Running", "Queued"),
                   status("Success", "Running"), status("Success", "Running"),
                   status("Success", "Success")])
    monkeypatch.setattr(queue, "dvc", lambda *args: next(rounds))
    monkeypatch.setattr(queue.time, "sleep", lambda s: None)
    collected = []
    queue.wait(1, on_finished=lambda: collected.append(1), poll_s=0)
    # Once at the start, once per round in which a run finished: not on every poll.
    assert len(collected) == 3


def test_waiting_retries_a_failed_collect_at_the_next_poll(monkeypatch):
    # `dvc exp show` fails while a worker's temporary copy is half made: the queue runs on,
    # so the wait must not end (and leave finished runs unrecorded); the next poll retries.
    from fmnist_crnn.study import queue

    header = "Task  Name  Created  Status"
    rounds = iter([f"{header}\nt0  s-v-0  10:00 PM  Running\n\nWorker status: 1 active, 0 idle",
                   f"{header}\nt0  s-v-0  10:00 PM  Running\n\nWorker status: 1 active, 0 idle",
                   f"{header}\nt0  s-v-0  10:00 PM  Success\n\nWorker status: 0 active, 0 idle"])
    monkeypatch.setattr(queue, "dvc", lambda *args: next(rounds))
    monkeypatch.setattr(queue.time, "sleep", lambda s: None)
    attempts = []

    def collect():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("`dvc exp show --json --all-commits` failed (1): no .dvc")

    queue.wait(1, on_finished=collect, poll_s=0)
    # Failed at the start, retried on the next poll (same count), again when the run finished.
    assert len(attempts) == 3


def test_a_running_study_collects_without_rereading_params_yaml(monkeypatch, tmp_path):
    # A key added to params.yaml while the study's runs train (a new option, committed beside
    # them) once stopped the collection with "unknown key": the process had imported the
    # older config. The study passes the experiment it read at its start.
    from fmnist_crnn.study import __main__ as cli
    from fmnist_crnn.study import publish, queue, records

    params = (REPO / "params.yaml").read_text().replace("train:\n", "train:\n  not_a_key_yet: 1\n")
    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(queue, "dvc", lambda *args: "[]")
    monkeypatch.setattr(records, "collect_experiments", lambda study, shown: [{"name": "s-v-s1"}])
    seen = {}
    monkeypatch.setattr(publish, "study_runs", lambda experiment, study: experiment)
    monkeypatch.setattr(records, "record_new",
                        lambda study, out, shown, runs: seen.setdefault("runs", runs) and [])
    assert cli.collect("s", tmp_path / "out", experiment="from-the-start") == []
    assert seen["runs"] == "from-the-start"
    with pytest.raises(Exception, match="not_a_key_yet"):
        cli.collect("s", tmp_path / "out")  # without it params.yaml is read, and refused


def test_waiting_restarts_workers_only_when_none_is_seen_twice_and_nothing_runs(monkeypatch):
    # A fresh worker can run its task before `dvc queue status` counts it: restarting then
    # would put a second timed training beside the first (it happened once).
    from fmnist_crnn.study import queue

    def status(workers, *states):
        rows = [f"t{i}  s-v-{i}  10:00 PM  {state}" for i, state in enumerate(states)]
        return "\n".join(["Task  Name  Created  Status", *rows, "",
                          f"Worker status: {workers} active, 0 idle"])

    rounds = iter([status(0, "Running", "Queued"), status(0, "Running", "Queued"),
                   status(0, "Queued", "Queued"), status(0, "Queued", "Queued"),
                   status(1, "Running", "Queued"), status(0, "Success", "Success")])
    monkeypatch.setattr(queue, "dvc", lambda *args: next(rounds))
    monkeypatch.setattr(queue.time, "sleep", lambda s: None)
    started = []
    monkeypatch.setattr(queue, "start_workers", started.append)
    queue.wait(1, poll_s=0)
    assert started == [1]  # once: after the second poll in a row with no worker and no run


@pytest.mark.parametrize("staged_before", [False, True])
def test_timing_the_default_run_leaves_the_lock_staged_only_if_it_was(staged_before, tmp_path,
                                                                      monkeypatch):
    # DVC stages the lock it rewrites (core.autostage); on another CPU it names that machine's
    # outputs, and a `git commit` of the study's records or the user's files would take it.
    from fmnist_crnn.study import queue

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("model: committed\n")
    git("add", "dvc.lock")
    git("commit", "-q", "-m", "lock")
    if staged_before:  # the user's own staged change stays staged
        (tmp_path / "dvc.lock").write_text("model: staged by the user\n")
        git("add", "dvc.lock")
    monkeypatch.chdir(tmp_path)

    calls = []

    def repro(*args, capture=True):  # what `dvc repro` does to the lock, autostage included
        calls.append(args)
        (tmp_path / "dvc.lock").write_text("model: this machine's\n")
        git("add", "dvc.lock")
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / "train.json").write_text('{"train_seconds": 281.5}')
        return ""

    monkeypatch.setattr(queue, "dvc", repro)
    assert queue.time_default_run() == 281.5
    # The data first (a fresh clone has none), then train forced alone, then the rest.
    assert calls == [("repro", "split"), ("repro", "-f", "-s", "train"), ("repro",)]
    assert (tmp_path / "dvc.lock").read_text() == "model: this machine's\n"
    assert bool(git("diff", "--cached", "--name-only")) is staged_before


def test_queue_workers_start_without_holding_the_runners_output_open(tmp_path):
    # `dvc queue start` leaves launchers running that inherit its stdout and stderr until
    # their worker exits. Neither may be this program's output: a reader of the runner's
    # output (`| tee`, a test capturing it) would wait until the last worker had gone.
    fake_dvc = tmp_path / "dvc_fake.py"  # prints, then leaves a child holding fds 1 and 2
    launcher = tmp_path / "launcher.pid"
    fake_dvc.write_text(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(launcher)!r}, 'w').write(str(child.pid))\n"
        "print('Started 2 new experiment task queue workers.')\n")
    code = ("import sys; sys.path[:0] = {path!r}; import fmnist_crnn.study.queue as q, "
            "subprocess; real = subprocess.run; "
            "q.subprocess.run = lambda cmd, **kw: real([sys.executable, {fake!r}], **kw); "
            "q.start_workers(2); print('runner done', flush=True)")
    code = code.format(path=sys.path, fake=str(fake_dvc))
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = reader.communicate(timeout=120)  # EOF once the runner exits, not in 600 s
    finally:
        os.kill(int(launcher.read_text()), signal.SIGKILL)
    assert reader.returncode == 0
    assert "Started 2 new experiment task queue workers." in out and "runner done" in out


def test_a_study_and_a_recipe_start_from_the_committed_baseline(tmp_path):
    """After `make fast` (a workspace experiment), params.yaml holds the fast recipe (four
    conv blocks); every study run must still be the committed baseline plus its variant."""
    workspace = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", workspace)
    apply_overrides(workspace, study.override_args(study.RECIPES["fast"])[1::2])
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    resets = catalog.baseline_resets(committed, yaml.safe_load(workspace.read_text()))
    assert "model.channels" in resets
    for name in study.VARIANTS:
        built = tmp_path / f"{name}.yaml"
        shutil.copy(workspace, built)
        overrides = {**resets, **study.run_overrides(study.VARIANTS[name], 42, "s", {})}
        apply_overrides(built, study.override_args(overrides)[1::2])  # as `dvc exp run -S`
        expected = tmp_path / f"{name}-expected.yaml"
        shutil.copy(REPO / "params.yaml", expected)
        apply_overrides(expected, study.override_args(
            study.run_overrides(study.VARIANTS[name], 42, "s", {}))[1::2])
        assert load_params(built) == load_params(expected), name
    assert catalog.baseline_resets(committed, committed) == {}


def test_rescore_scores_the_recorded_model_again_and_keeps_the_training(raw_dir, tmp_path,
                                                                          monkeypatch):
    from fmnist_crnn import data
    from fmnist_crnn.config import ModelConfig, SplitConfig
    from fmnist_crnn.errors import ProjectError
    from fmnist_crnn.evaluate import accuracy, classification_metrics, predict_logits_and_tta
    from fmnist_crnn.files import atomic_write_json
    from fmnist_crnn.model import save_model
    from fmnist_crnn.study import records, rescore

    data.make_split(raw_dir, tmp_path / "split", SplitConfig(val_fraction=0.25))
    torch.manual_seed(0)
    model = CRNN(ModelConfig(channels=(8, 16, 32), embedding_dim=16, hidden_dim=16,
                             num_layers=1, head_dims=(16,))).eval()
    save_model(model, tmp_path / "model.pt")
    files = {rescore.MODEL: tmp_path / "model.pt",
             rescore.TEST_SPLIT: tmp_path / "split" / "test.pt"}
    fetched = []

    def at_rev(path, rev, to):  # the experiment commit's file, as DVC's cache gives it
        fetched.append((path, rev))
        to.write_bytes(files[path].read_bytes())
        return to

    monkeypatch.setattr(rescore, "file_at_rev", at_rev)
    images, labels = data.load_split(tmp_path / "split", "test")
    cpu = torch.device("cpu")
    plain, ten = predict_logits_and_tta(model, images, 8, cpu, tta_hflip=True, tta_shift=1)
    rev = "a" * 40
    source = {"name": "src-s42", "rev": rev, "study": "src", "variant": "src", "seed": 42,
              "params": {"train": {"batch_size": 8},
                         "evaluate": {"tta_hflip": True, "tta_shift": 1},
                         "tracking": {"study": "src", "variant": "src"}},
              "test_accuracy": accuracy(ten, labels),
              "test_accuracy_without_tta": accuracy(plain, labels), "train_seconds": 100.0,
              "reference_train_seconds": {"before": 50.0, "after": 60.0},
              "mlflow_run_id": "r1"}
    out = tmp_path / "study"
    atomic_write_json(records.runs_dir(out, "src") / "src-s42.json", source)
    diamond = {"evaluate.tta_shift": 2, "evaluate.tta_moves": "diamond"}

    [path] = rescore.rescore(out, "src", "src-d2", diamond)
    new = json.loads(path.read_text())
    _, moved = predict_logits_and_tta(model, images, 8, cpu, tta_hflip=True, tta_shift=2,
                                      tta_moves="diamond")
    assert new["name"] == "src-d2-s42" and new["study"] == new["variant"] == "src-d2"
    assert new["test_accuracy"] == accuracy(moved, labels)
    # The loss tells the views apart where 32 images' accuracies may not.
    assert new["test_loss"] == pytest.approx(classification_metrics(moved, labels)["loss"])
    assert new["test_loss"] != pytest.approx(classification_metrics(ten, labels)["loss"])
    assert new["test_accuracy_without_tta"] == source["test_accuracy_without_tta"]
    assert new["params"]["evaluate"] == {"tta_hflip": True, "tta_shift": 2,
                                         "tta_moves": "diamond"}
    assert new["params"]["tracking"] == {"study": "src-d2", "variant": "src-d2"}
    # The training's fields stay, its ratio with them; the source is named.
    assert records.reference_ratio(new) == records.reference_ratio(source) == 2.0
    assert (new["rescored_from"], new["rev"], new["mlflow_run_id"]) == ("src-s42", rev, None)
    assert fetched == [(rescore.MODEL, rev), (rescore.TEST_SPLIT, rev)]
    assert rescore.rescore(out, "src", "src-d2", diamond) == []  # recorded runs are skipped

    # A model that does not score its record's accuracy is not the recorded one: no record.
    atomic_write_json(records.runs_dir(out, "src") / "src-s43.json",
                      {**source, "name": "src-s43",
                       "test_accuracy_without_tta": source["test_accuracy_without_tta"] + 0.01})
    with pytest.raises(ProjectError, match="src-s43: the model at aaaaaaaaaaaa scores"):
        rescore.rescore(out, "src", "src-d2", diamond)
    assert not (records.runs_dir(out, "src-d2") / "src-d2-s43.json").exists()
    (records.runs_dir(out, "src") / "src-s43.json").unlink()
    atomic_write_json(records.runs_dir(out, "src") / "src-s44.json",
                      {**source, "name": "src-s44", "rev": None})
    with pytest.raises(ProjectError, match="src-s44: its record names no experiment commit"):
        rescore.rescore(out, "src", "src-d2", diamond)
    # Only the evaluate stage's keys, checked as in params.yaml; the source study stays.
    with pytest.raises(ProjectError, match=r"evaluate\.\* keys only, got train.lr"):
        rescore.rescore(out, "src", "src-lr", {"train.lr": 0.1})
    with pytest.raises(ProjectError, match="'evaluate.tta_moves'"):
        rescore.rescore(out, "src", "src-x", {"evaluate.tta_moves": "grid"})
    with pytest.raises(ProjectError, match="must differ"):
        rescore.rescore(out, "src", "src", diamond)
    with pytest.raises(ProjectError, match="no records of study 'nothing'"):
        rescore.rescore(out, "nothing", "src-d2", diamond)
