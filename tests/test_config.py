import pytest
import yaml

from fmnist_crnn.config import (
    AugmentConfig,
    ConfigError,
    ModelConfig,
    load_params,
    params_from_dict,
    parse_overrides,
    to_flat_dict,
    with_overrides,
)

from .conftest import REPO


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_the_study_baseline():
    p = load_params(REPO / "params.yaml")
    assert p.model.channels == (32, 64, 128)
    assert p.model.kernel_sizes == (3, 3, 2)
    assert (p.model.embedding_dim, p.model.hidden_dim, p.model.num_layers) == (64, 128, 3)
    assert p.model.dropout == (0.25, 0.25, 0.25)
    assert (p.train.lr, p.train.batch_size, p.train.epochs, p.train.optimizer) == (
        0.001, 64, 20, "adam")
    assert p.split.val_fraction == 0.3


@pytest.mark.parametrize(("section", "key", "value", "fragment"), [
    ("model", "hiden_dim", 3, "unknown key 'model.hiden_dim'"),
    ("model", "hidden_dim", "big", "'model.hidden_dim'"),
    ("model", "hidden_dim", -4, "'model.hidden_dim'"),
    ("model", "projection_dim", -1, "'model.projection_dim'"),
    ("train", "lookahead_steps", -2, "'train.lookahead_steps'"),
    ("train", "whiten_first_conv", "yes", "'train.whiten_first_conv'"),
    ("train", "identity_init", 1, "'train.identity_init'"),
    ("model", "dropout", [0.1, 1.0, 0.1], "'model.dropout'"),
    ("model", "kernel_sizes", [3, 3], "'model.kernel_sizes'"),
    ("train", "batch_size", 0, "'train.batch_size'"),
    ("train", "optimizer", "adagrad", "'train.optimizer'"),
    ("train", "epochs", 2.5, "'train.epochs'"),
    ("split", "val_fraction", 1.0, "'split.val_fraction'"),
    ("split", "val_fraction", -0.1, "'split.val_fraction'"),
    ("split", "stratify", "yes", "'split.stratify'"),
    ("model", "sequence", "diagonal", "'model.sequence'"),
    ("train", "schedule", "step", "'train.schedule'"),
    ("train", "warmup_epochs", 30, "'train.warmup_epochs'"),
    ("train", "label_smoothing", 1.0, "'train.label_smoothing'"),
    ("train", "grad_clip_norm", 0, "'train.grad_clip_norm'"),
    ("train", "ema_decay", 1.0, "'train.ema_decay'"),
    ("augment", "erasing", 1.5, "'augment.erasing'"),
    ("augment", "cutmix", -0.1, "'augment.cutmix'"),
    ("augment", "cutmix", 1.5, "'augment.cutmix'"),
    ("augment", "mixup", 2, "'augment.mixup'"),
    ("augment", "crop_padding", -1, "'augment.crop_padding'"),
    ("augment", "plain_last_epochs", -1, "'augment.plain_last_epochs'"),
    ("augment", "plain_last_epochs", 20, "'augment.plain_last_epochs'.*train.epochs=20"),
    ("augment", "unerased_last_epochs", -1, "'augment.unerased_last_epochs'"),
    ("augment", "unerased_last_epochs", 20, "'augment.unerased_last_epochs'.*train.epochs=20"),
    ("augment", "unmixed_last_epochs", -1, "'augment.unmixed_last_epochs'"),
    ("augment", "unmixed_last_epochs", 20, "'augment.unmixed_last_epochs'.*train.epochs=20"),
    ("augment", "vflip", True, "unknown key 'augment.vflip'"),
    ("evaluate", "tta_hflip", "yes", "'evaluate.tta_hflip'"),
    ("evaluate", "tta_shift", -1, "'evaluate.tta_shift'"),
    ("evaluate", "tta_shift", 28, "'evaluate.tta_shift'.*28-pixel image is blank"),
    ("evaluate", "tta_moves", "grid", "'evaluate.tta_moves'"),
    ("evaluate", "tta_moves", "square", "'evaluate.tta_moves'.*tta_shift is 0"),
    ("augment", "crop_padding", 28, "'augment.crop_padding'"),
    ("tracking", "champion_alias", "", "'tracking.champion_alias'"),
    ("tracking", "registered_model_name", "a/b", "'tracking.registered_model_name'"),
    ("report", "inspect_indices", [0, 42000], "'report.inspect_indices'.*below 42,000"),
    ("train", "amp_validation", True, "'train.amp_validation'.*while train.amp is false"),
    ("train", "norm_bias_lr_scale", 0, "'train.norm_bias_lr_scale'"),
    ("augment", "alternate_flips", True, "'augment.alternate_flips'.*while augment.hflip is"),
])
def test_bad_values_name_the_key(section, key, value, fragment):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace(r"\.*", ".*")):
        params_from_dict(raw)


def test_the_last_epochs_drop_crop_and_erasing_or_erasing_alone():
    aug = AugmentConfig(crop_padding=2, hflip=True, erasing=0.25, plain_last_epochs=1,
                        unerased_last_epochs=3)
    got = [(a.crop_padding, a.hflip, a.erasing) for a in
           (aug.for_epoch(epoch, 10) for epoch in range(1, 11))]
    assert got == [(2, True, 0.25)] * 7 + [(2, True, 0.0)] * 2 + [(0, True, 0.0)]
    assert AugmentConfig(erasing=0.25).for_epoch(10, 10) == AugmentConfig(erasing=0.25)
    for key in ("cutmix", "mixup"):
        mixed = AugmentConfig(**{key: 0.5}, plain_last_epochs=1, unerased_last_epochs=2)
        assert [getattr(mixed.for_epoch(epoch, 3), key) for epoch in (1, 2, 3)] == [
            0.5, 0.5, 0.0]  # the plain epochs alone end CutMix and mixup


def test_the_unmixed_last_epochs_drop_cutmix_and_mixup_alone():
    for key in ("cutmix", "mixup"):
        aug = AugmentConfig(crop_padding=2, hflip=True, erasing=0.25, **{key: 0.5},
                            unmixed_last_epochs=2, plain_last_epochs=1)
        got = [(a.crop_padding, a.hflip, a.erasing, getattr(a, key)) for a in
               (aug.for_epoch(epoch, 5) for epoch in range(1, 6))]
        assert got == [(2, True, 0.25, 0.5)] * 3 + [(2, True, 0.25, 0.0), (0, True, 0.0, 0.0)]


def test_cutmix_and_mixup_do_not_share_a_batch():
    raw = raw_params()
    raw["augment"].update(cutmix=0.5, mixup=0.5)
    with pytest.raises(ConfigError, match=r"'augment\.mixup'.*while augment\.cutmix is set"):
        params_from_dict(raw)


def test_onecycle_needs_its_rising_phase():
    raw = raw_params()
    raw["train"].update(schedule="onecycle", warmup_epochs=0)
    with pytest.raises(ConfigError, match="train.warmup_epochs.*onecycle"):
        params_from_dict(raw)
    raw["train"]["warmup_epochs"] = 2
    assert params_from_dict(raw).train.schedule == "onecycle"


def test_default_training_knobs_are_the_study_behaviour():
    p = load_params(REPO / "params.yaml")
    assert (p.train.schedule, p.train.warmup_epochs, p.train.label_smoothing) == ("none", 0, 0)
    assert (p.train.grad_clip_norm, p.train.ema_decay, p.train.amp) == (None, None, False)
    assert (p.augment.crop_padding, p.augment.hflip, p.augment.erasing) == (0, False, 0)
    assert (p.model.sequence, p.model.bidirectional, p.evaluate.tta_hflip) == (
        "chunk", False, False)


def test_unknown_and_missing_sections_are_errors():
    raw = raw_params()
    raw["extra"] = {}
    with pytest.raises(ConfigError, match="unknown section"):
        params_from_dict(raw)
    raw = raw_params()
    del raw["model"]
    with pytest.raises(ConfigError, match="missing section"):
        params_from_dict(raw)


def test_overrides_set_dotted_keys_as_dvc_exp_run_does():
    base = load_params(REPO / "params.yaml")
    overrides = parse_overrides(["train.lr=0.005", "model.channels=[16, 32, 64]"])
    assert overrides == {"train.lr": 0.005, "model.channels": [16, 32, 64]}
    p = with_overrides(base, overrides)
    assert (p.train.lr, p.model.channels) == (0.005, (16, 32, 64))
    assert p.train.epochs == base.train.epochs  # the rest as params.yaml has it


@pytest.mark.parametrize(("items", "fragment"), [
    (["train.lr"], "expected KEY=VALUE"),
    (["=1"], "expected KEY=VALUE"),
])
def test_malformed_overrides_are_refused(items, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_overrides(items)


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"lr": 0.1}, "override 'lr': expected section.key"),
    ({"optim.lr": 0.1}, "override 'optim.lr'"),
    ({"train.learning_rate": 0.1}, "unknown key 'train.learning_rate'"),
    ({"train.lr": -1}, "invalid value for 'train.lr'"),
])
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        with_overrides(load_params(REPO / "params.yaml"), overrides)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)


def test_scalar_dropout_and_pool_apply_to_every_block():
    raw = raw_params()
    raw["model"]["dropout"] = 0.1
    raw["model"]["pool"] = True
    p = params_from_dict(raw)
    assert p.model.dropout == (0.1, 0.1, 0.1)
    assert p.model.pool == (True, True, True)


def test_padding_auto_follows_the_kernel():
    assert ModelConfig(kernel_sizes=(5, 5, 5)).paddings == (2, 2, 2)
    assert ModelConfig(padding=(1, 0, 0)).paddings == (1, 0, 0)


def test_flat_keys_match_params_yaml():
    flat = to_flat_dict(load_params(REPO / "params.yaml"))
    raw = raw_params()
    expected = {f"{s}.{k}" for s, section in raw.items() for k in section}
    assert expected <= set(flat)
    assert flat["model.hidden_dim"] == 128
    assert flat["model.channels"] == [32, 64, 128]


NAMES = ["fashion-mnist-crnn", "", " ", "a/b", "a:b", ".", "..", "../x", "/x", "x/", ".hidden",
         "two words", "ünïcode"]
ALIASES = ["champion", "", "latest", "Latest", "v3", "V12", "v3a", "best_2", "has space",
           "dot.ted", "ünïcode", "x" * 255, "x" * 256]


def _mlflow_accepts(check, *args) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        check(*args)
    except MlflowException:
        return False
    return True


@pytest.mark.parametrize(("name", "alias"), [(n, "champion") for n in NAMES]
                         + [("fashion-mnist-crnn", a) for a in ALIASES])
def test_registry_names_are_refused_exactly_when_mlflow_refuses_them(name, alias):
    """The validate stage refuses what MLflow's registry would refuse, and nothing else."""
    from mlflow.utils import validation

    expected = _mlflow_accepts(validation._validate_model_name, name) and (
        _mlflow_accepts(validation._validate_model_alias_name, alias)
        and _mlflow_accepts(validation._validate_model_alias_name_reserved, alias))
    raw = raw_params()
    raw["tracking"].update(registered_model_name=name, champion_alias=alias)
    try:
        params_from_dict(raw)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == expected


def test_inspected_images_are_checked_against_the_split_they_come_from():
    raw = raw_params()
    raw["split"].update(limit=3000, val_fraction=0.3)  # 2,100 training images
    raw["report"]["inspect_indices"] = [2099]
    params_from_dict(raw)
    raw["report"]["inspect_indices"] = [2100]
    with pytest.raises(ConfigError, match="below 2,100"):
        params_from_dict(raw)
