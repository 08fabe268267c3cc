import pytest
import torch

from fmnist_crnn import data, history, train
from fmnist_crnn.config import AugmentConfig, ModelConfig, SplitConfig, TrainConfig
from fmnist_crnn.runs import training

SMALL = ModelConfig(channels=(8, 16, 32), embedding_dim=16, hidden_dim=16, num_layers=1,
                    head_dims=(16,))
FAST = TrainConfig(epochs=2, batch_size=16, seed=7)


@pytest.fixture
def splits(raw_dir, tmp_path):
    data.make_split(raw_dir, tmp_path / "split", SplitConfig(val_fraction=0.25))
    return data.load_split(tmp_path / "split", "train"), data.load_split(tmp_path / "split",
                                                                         "val")


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights_and_history(splits):
    a = train.fit(SMALL, FAST, *splits, progress=False)
    b = train.fit(SMALL, FAST, *splits, progress=False)
    strip = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in b.history]
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_history_has_every_epoch_and_best_weights_are_kept(splits):
    cfg = TrainConfig(epochs=3, batch_size=16, seed=1)
    result = train.fit(SMALL, cfg, *splits, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    best = max(result.history, key=lambda r: r["val_acc"])
    assert result.best_epoch == best["epoch"] and result.best_val_acc == best["val_acc"]
    from fmnist_crnn.evaluate import predict_logits
    logits = predict_logits(result.model, splits[1][0], 16, torch.device("cpu"))
    assert (logits.argmax(1) == splits[1][1]).float().mean().item() == pytest.approx(
        result.best_val_acc)


def test_resume_after_a_crash_matches_an_uninterrupted_run(splits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=16, seed=3)
    full = train.fit(SMALL, cfg, *splits, progress=False)

    ckpt = tmp_path / "last.pt"

    def crash_after_epoch_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(SMALL, cfg, *splits, checkpoint_path=ckpt, fingerprint="fp",
                  on_epoch=crash_after_epoch_2, progress=False)
    state = training.load_resume_state(ckpt, "fp")
    assert state["epoch"] == 1  # epoch 2 crashed before its checkpoint
    resumed = train.fit(SMALL, cfg, *splits, checkpoint_path=ckpt, fingerprint="fp",
                        resume=state, progress=False)
    assert resumed.resumed_from_epoch == 1
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_of_other_params_or_finished_run_is_not_resumed(splits, tmp_path):
    ckpt = tmp_path / "last.pt"
    train.fit(SMALL, FAST, *splits, checkpoint_path=ckpt, fingerprint="fp", progress=False)
    assert training.load_resume_state(ckpt, "other") is None
    assert training.load_resume_state(ckpt, "fp") is None  # finished: a new repro trains afresh


def test_non_finite_loss_stops_training_and_keeps_last_good_checkpoint(
        splits, tmp_path, monkeypatch):
    real = train.F.cross_entropy
    calls = {"n": 0}

    def nan_from_epoch_2(*args, **kwargs):
        calls["n"] += 1  # 48 training images at batch 16: epoch 2 starts at call 4
        return real(*args, **kwargs) * (float("nan") if calls["n"] >= 4 else 1.0)

    monkeypatch.setattr(train.F, "cross_entropy", nan_from_epoch_2)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(train.TrainingError, match="loss became nan at epoch 2, batch 1"):
        train.fit(SMALL, FAST, *splits, checkpoint_path=ckpt, fingerprint="fp",
                  progress=False)
    assert training.load_resume_state(ckpt, "fp")["epoch"] == 1


def test_history_csv_round_trip(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.75,
             "lr": 0.001, "epoch_seconds": 1.5}]
    history.write_history(tmp_path / "h.csv", rows)
    assert history.read_history(tmp_path / "h.csv") == rows


# The recipe's knobs ---------------------------------------------------------------------------

RECIPE = TrainConfig(epochs=3, batch_size=16, seed=5, optimizer="adamw", lr=0.003,
                     weight_decay=0.05, schedule="onecycle", warmup_epochs=1,
                     label_smoothing=0.1, grad_clip_norm=1.0, ema_decay=0.9, channels_last=True)
AUGMENT = AugmentConfig(crop_padding=2, hflip=True, erasing=0.5)


def _lrs(cfg, steps_per_epoch=10):
    model = torch.nn.Linear(2, 2)
    opt = train.make_optimizer(model, cfg)
    sched = train.make_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return lrs


def test_schedules_warm_up_peak_at_lr_and_anneal():
    assert train.make_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1), FAST, 10) is None
    assert set(_lrs(FAST)) == {FAST.lr}
    cosine = _lrs(TrainConfig(epochs=4, lr=0.01, schedule="cosine", warmup_epochs=1))
    assert cosine[0] == pytest.approx(0.01 / 25) and max(cosine) == pytest.approx(0.01)
    assert cosine.index(max(cosine)) == 10 and cosine[-1] < 0.0002
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:], strict=False))
    onecycle = _lrs(TrainConfig(epochs=4, lr=0.01, schedule="onecycle", warmup_epochs=1))
    assert max(onecycle) == pytest.approx(0.01, rel=1e-3) and onecycle.index(max(onecycle)) <= 10
    assert onecycle[0] < 0.001 and onecycle[-1] < 1e-5
    warm = _lrs(TrainConfig(epochs=2, lr=0.01, warmup_epochs=1))
    assert warm[0] == pytest.approx(0.0004) and warm[10:] == [0.01] * 10


def test_norm_biases_get_their_own_lr_and_decay_through_the_schedule():
    from fmnist_crnn.model import CRNN

    model = CRNN(SMALL)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norm_biases
    one = train.make_optimizer(model, RECIPE)
    assert len(one.param_groups) == 1  # the default: the optimizer as it always was
    cfg = TrainConfig(epochs=2, optimizer="adamw", lr=0.01, weight_decay=0.08,
                      schedule="onecycle", warmup_epochs=1, norm_bias_lr_scale=4.0)
    opt = train.make_optimizer(model, cfg)
    rest, biases = opt.param_groups
    assert {id(p) for p in biases["params"]} == norm_biases
    assert not norm_biases & {id(p) for p in rest["params"]}
    assert len(rest["params"]) + len(biases["params"]) == len(list(model.parameters()))
    assert (biases["weight_decay"], rest["weight_decay"]) == (0.02, 0.08)
    sched = train.make_scheduler(opt, cfg, steps_per_epoch=5)
    peaks = []
    for _ in range(10):
        assert biases["lr"] == pytest.approx(4 * rest["lr"])
        peaks.append(rest["lr"])
        opt.step()
        sched.step()
    assert max(peaks) == pytest.approx(0.01, rel=1e-3)


def _crash_in_epoch_3_then_resume(cfg, augment, splits, ckpt):
    """Train until epoch 3 raises KeyboardInterrupt, then resume from the checkpoint."""
    def crash_in_epoch_3(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(SMALL, cfg, *splits, augment, checkpoint_path=ckpt, fingerprint="fp",
                  on_epoch=crash_in_epoch_3, progress=False)
    return train.fit(SMALL, cfg, *splits, augment, checkpoint_path=ckpt, fingerprint="fp",
                     resume=training.load_resume_state(ckpt, "fp"), progress=False)


def test_recipe_knobs_train_repeatably_and_resume_exactly(splits, tmp_path):
    full = train.fit(SMALL, RECIPE, *splits, AUGMENT, progress=False)
    again = train.fit(SMALL, RECIPE, *splits, AUGMENT, progress=False)
    assert [r["val_loss"] for r in full.history] == [r["val_loss"] for r in again.history]
    assert full.last_raw is not None  # with an EMA the trained weights stay at hand
    assert any(not torch.equal(a, b) for a, b in zip(
        full.model.state_dict().values(), full.last_raw.state_dict().values(), strict=True))

    resumed = _crash_in_epoch_3_then_resume(RECIPE, AUGMENT, splits, tmp_path / "last.pt")
    assert resumed.resumed_from_epoch == 2
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_alternating_flips_train_repeatably_resume_exactly_and_change_the_training(
        splits, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(RECIPE, ema_decay=None)
    alternating = AugmentConfig(hflip=True, alternate_flips=True)
    full = train.fit(SMALL, cfg, *splits, alternating, progress=False)
    random_flips = train.fit(SMALL, cfg, *splits, AugmentConfig(hflip=True), progress=False)
    assert [r["train_loss"] for r in full.history] != [
        r["train_loss"] for r in random_flips.history]

    resumed = _crash_in_epoch_3_then_resume(cfg, alternating, splits, tmp_path / "last.pt")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_plain_last_epochs_train_without_crop_and_erasing_and_resume_exactly(
        splits, tmp_path, monkeypatch):
    import dataclasses

    plain_end = dataclasses.replace(AUGMENT, plain_last_epochs=1)
    applied = []  # the augmentation each training batch got
    augment_batch = data.augment_batch
    monkeypatch.setattr(data, "augment_batch", lambda x, cfg, generator: (
        applied.append(cfg), augment_batch(x, cfg, generator))[1])
    full = train.fit(SMALL, RECIPE, *splits, AUGMENT, progress=False)
    steps = len(applied) // RECIPE.epochs
    applied.clear()
    ending = train.fit(SMALL, RECIPE, *splits, plain_end, progress=False)
    assert applied[:2 * steps] == [plain_end] * (2 * steps)
    assert applied[2 * steps:] == [AugmentConfig(hflip=True, plain_last_epochs=1)] * steps
    # The same first two epochs, another last one.
    assert [r["val_loss"] for r in ending.history[:2]] == [
        r["val_loss"] for r in full.history[:2]]
    assert ending.history[2]["train_loss"] != full.history[2]["train_loss"]

    resumed = _crash_in_epoch_3_then_resume(RECIPE, plain_end, splits, tmp_path / "last.pt")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in ending.history]


@pytest.mark.parametrize("key", ["cutmix", "mixup"])
def test_mixing_trains_on_both_labels_and_resumes_exactly(key, splits, tmp_path, monkeypatch):
    import dataclasses

    mixing = dataclasses.replace(AUGMENT, **{key: 1.0})
    full = train.fit(SMALL, RECIPE, *splits, mixing, progress=False)
    plain = train.fit(SMALL, RECIPE, *splits, AUGMENT, progress=False)
    assert full.history[0]["train_loss"] != plain.history[0]["train_loss"]
    resumed = _crash_in_epoch_3_then_resume(RECIPE, mixing, splits, tmp_path / "last.pt")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]

    # The loss weighs each label by its share: a batch that keeps every image whole (lambda
    # 1) trains exactly as without mixing, one that takes every pixel from the partners trains
    # on the partners' labels.
    for own in (1.0, 0.0):
        monkeypatch.setattr(data, key, lambda x, p, generator, own=own: (
            x, (torch.arange(len(x)).roll(1), own)))
        ran = train.fit(SMALL, RECIPE, *splits, mixing, progress=False)
        assert (ran.history[0]["train_loss"] == plain.history[0]["train_loss"]) == (own == 1.0)


def test_lookahead_pulls_the_weights_to_a_slow_copy_on_its_schedule():
    model = torch.nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]
    look = train.Lookahead(model, every=2, total_steps=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    look.after_step(model)  # step 1: not a lookahead step, nothing moves
    assert all(torch.equal(s, p) for s, p in zip(look.slow, start, strict=True))
    moved = [p.detach().clone() for p in model.parameters()]
    look.after_step(model)  # step 2 of 4: rho = 0.95^2 * (1/2)^3
    rho = 0.95 ** 2 * 0.5 ** 3
    for slow, fast, was, before in zip(look.slow, model.parameters(), moved, start, strict=True):
        assert torch.allclose(slow, before + (1 - rho) * (was - before))
        assert torch.equal(fast.detach(), slow)
    again = train.Lookahead(torch.nn.Linear(3, 1), every=2, total_steps=4)
    again.load_state_dict(look.state_dict())
    assert again.step == 2
    assert all(torch.equal(a, b) for a, b in zip(again.slow, look.slow, strict=True))


def test_lookahead_trains_repeatably_and_resumes_exactly(splits, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(RECIPE, lookahead_steps=3)
    full = train.fit(SMALL, cfg, *splits, AUGMENT, progress=False)
    resumed = _crash_in_epoch_3_then_resume(cfg, AUGMENT, splits, tmp_path / "last.pt")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_each_knob_changes_the_training(splits):
    import dataclasses

    base = TrainConfig(epochs=1, batch_size=16, seed=5)
    reference = train.fit(SMALL, base, *splits, progress=False).history[0]["train_loss"]
    for change in (dict(label_smoothing=0.2), dict(grad_clip_norm=0.01),
                   dict(schedule="cosine"), dict(optimizer="adamw", weight_decay=0.5),
                   dict(lookahead_steps=2)):
        cfg = dataclasses.replace(base, **change)
        loss = train.fit(SMALL, cfg, *splits, progress=False).history[0]["train_loss"]
        assert loss != reference, change
    augmented = train.fit(SMALL, base, *splits, AUGMENT, progress=False)
    assert augmented.history[0]["train_loss"] != reference


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(splits):
    from fmnist_crnn.evaluate import predict_logits
    from fmnist_crnn.model import CRNN

    model = CRNN(SMALL).eval()
    images = splits[1][0][:10]
    device = torch.device("cpu")
    plain = predict_logits(model, images, 4, device)
    mirrored = predict_logits(model, images.flip(-1), 4, device)
    tta = predict_logits(model, images, 4, device, tta_hflip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-6)


def test_shift_tta_averages_the_moved_images_and_their_mirrors(splits):
    from fmnist_crnn.data import shift, to_float
    from fmnist_crnn.evaluate import predict_logits_and_tta, tta_views
    from fmnist_crnn.model import CRNN

    assert tta_views(False) == [(0, 0, False)]
    assert len(tta_views(True)) == 2 and len(tta_views(False, 1)) == 5
    views = tta_views(True, 2)
    assert views[0] == (0, 0, False) and len(set(views)) == 10
    assert {(dy, dx) for dy, dx, _ in views} == {(0, 0), (-2, 0), (2, 0), (0, -2), (0, 2)}
    # The other neighbourhoods start with the cross and add the places nearest first.
    for moves, pixels, places in (("square", 1, 9), ("diamond", 2, 13), ("square", 2, 25)):
        grid = tta_views(True, pixels, moves)
        assert grid[:10] == tta_views(True, pixels) and len(set(grid)) == 2 * places
        reach = range(-pixels, pixels + 1)
        assert {(dy, dx) for dy, dx, _ in grid} == {
            (dy, dx) for dy in reach for dx in reach
            if moves == "square" or abs(dy) + abs(dx) <= pixels}
    assert tta_views(True, 2, "diamond")[10:12] == [(-1, 0, False), (-1, 0, True)]
    assert tta_views(True, 1, "diamond") == tta_views(True, 1)

    torch.manual_seed(0)  # the same weights whichever tests ran before in this process
    model = CRNN(SMALL).eval()
    images = splits[1][0][:10]
    x = to_float(images)
    with torch.no_grad():
        expected = torch.stack([model(shift(x, dy, dx).flip(-1) if m else shift(x, dy, dx))
                                for dy, dx, m in views]).mean(0)
        plain_expected = model(x)
    plain, tta = predict_logits_and_tta(model, images, 4, torch.device("cpu"),
                                        tta_hflip=True, tta_shift=2)
    assert torch.allclose(tta, expected, atol=1e-5)
    assert torch.allclose(plain, plain_expected, atol=1e-5)
    # An untrained model's logits move by ~1e-3 at most: TTA differs beyond float noise.
    assert not torch.allclose(tta, plain, atol=1e-5)


def test_seconds_to_accuracy_counts_epochs_until_the_first_hit():
    epochs = [{"epoch_seconds": 10.0, "val_acc": 0.8}, {"epoch_seconds": 12.0, "val_acc": 0.93},
              {"epoch_seconds": 11.0, "val_acc": 0.95}]
    assert history.seconds_to_accuracy(epochs, 0.93) == 22.0
    assert history.seconds_to_accuracy(epochs, 0.96) is None


def test_ema_warms_up_then_uses_its_decay():
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=train.ema_with_warmup(0.9))
    values = []
    for step in range(1, 400):
        model.weight.data.fill_(float(step))
        ema.update_parameters(model)
        values.append(ema.module.weight.item())
    # Early on the average follows the weights closely (decay (1+n)/(10+n) < 0.9); once the
    # warmup decay passes 0.9 (n = 80) it lags a linear ramp by decay/(1-decay) = 9 steps.
    assert 10 - values[9] < 4
    assert 399 - values[-1] == pytest.approx(9, abs=0.01)


def test_without_validation_the_last_epoch_is_kept_and_reported_as_such(raw_dir, tmp_path):
    data.make_split(raw_dir, tmp_path / "split", SplitConfig(val_fraction=0.0))
    train_data, val_data = (data.load_split(tmp_path / "split", n) for n in ("train", "val"))
    cfg = TrainConfig(epochs=2, batch_size=16, seed=5)
    result = train.fit(SMALL, cfg, train_data, val_data, progress=False)
    assert result.best_epoch == 2
    assert all("val_acc" not in r and "val_loss" not in r for r in result.history)
    # The kept weights are the last epoch's: a run of one epoch less ends elsewhere.
    shorter = train.fit(SMALL, TrainConfig(epochs=1, batch_size=16, seed=5), train_data,
                        val_data, progress=False)
    last, first = weights(result.model), weights(shorter.model)
    assert not all(torch.equal(last[k], first[k]) for k in last)
    summary = training.summarize(result, val_data, 16)
    assert summary["best_val_acc"] is None and summary["best_epoch"] == 2
    assert summary["seconds_to_val_acc_90"] is None and summary["train_seconds"] > 0
    history.write_history(tmp_path / "history.csv", result.history)
    assert history.read_history(tmp_path / "history.csv") == [
        {k: pytest.approx(v, rel=1e-5) for k, v in r.items()} for r in result.history]


def test_amp_on_the_cpu_trains_in_bfloat16_and_keeps_float32_weights(splits):
    import dataclasses

    base = TrainConfig(epochs=1, batch_size=16, seed=5, device="cpu")
    seen = []  # (training?, dtype) of every convolution's output
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append((module.training, out.dtype))
        if isinstance(module, torch.nn.Conv2d) else None)
    try:
        plain = train.fit(SMALL, base, *splits, progress=False)
        assert set(seen) == {(True, torch.float32), (False, torch.float32)}
        seen.clear()
        mixed = train.fit(SMALL, dataclasses.replace(base, amp=True), *splits, progress=False)
        # The training steps run in bfloat16, the per-epoch validation (eval mode) in float32:
        # the recorded runs picked their epoch that way (`bf16-60ep` in docs/accuracy.md).
        assert set(seen) == {(True, torch.bfloat16), (False, torch.float32)}
        again = train.fit(SMALL, dataclasses.replace(base, amp=True), *splits, progress=False)
        seen.clear()
        # train.amp_validation: the per-epoch validation under the autocast too, the same
        # training (validation changes no weight, draws no random number).
        fast_val = train.fit(SMALL, dataclasses.replace(base, amp=True, amp_validation=True),
                             *splits, progress=False)
        assert set(seen) == {(True, torch.bfloat16), (False, torch.bfloat16)}
    finally:
        hook.remove()
    assert fast_val.history[0]["train_loss"] == mixed.history[0]["train_loss"]
    assert fast_val.history[0]["val_loss"] != mixed.history[0]["val_loss"]
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert mixed.history[0]["train_loss"] != plain.history[0]["train_loss"]
    # bfloat16 is as repeatable as float32 on one machine: same seed, same weights.
    wa, wb = weights(mixed.model), weights(again.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_identity_init_passes_each_conv_blocks_input_through_its_first_filters(splits):
    import dataclasses

    cfg = dataclasses.replace(RECIPE, identity_init=True, epochs=2)
    torch.manual_seed(1)
    state = train.new_state(SMALL, cfg, 5, torch.device("cpu"), torch.channels_last)
    torch.manual_seed(1)  # the same random initialisation, without it
    plain = train.new_state(SMALL, RECIPE, 5, torch.device("cpu"), torch.channels_last)
    for i, (conv, before) in enumerate(zip(state.model.blocks, plain.model.blocks,
                                           strict=True)):
        conv, before = conv[0], before[0]
        n, k = conv.in_channels, conv.kernel_size[0]  # SMALL: 1 -> 8 -> 16 -> 32 channels
        assert torch.equal(conv.weight[:n], torch.nn.init.dirac_(torch.empty(n, n, k, k)))
        if k == 3:  # a 1 at the centre: the filters copy their input channel
            inputs = torch.rand(2, n, 6, 6)
            passed = torch.nn.functional.conv2d(inputs, conv.weight[:n], padding=1)
            assert torch.equal(passed, inputs), f"block {i}"
        assert torch.equal(conv.weight[n:], before.weight[n:])  # the rest: random as before
        assert torch.equal(conv.bias, before.bias)
    assert torch.equal(state.ema.module.blocks[1][0].weight, state.model.blocks[1][0].weight)
    fit = train.fit(SMALL, cfg, *splits, AUGMENT, progress=False)
    assert fit.history[0]["train_loss"] < 5


def test_whitening_filters_whiten_the_patches():
    torch.manual_seed(0)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).view(1, 1, 3, 3)
    images = torch.nn.functional.conv2d(torch.randn(500, 1, 20, 20), blur)  # correlated pixels
    filters = train.whitening_filters(images, 3)
    assert filters.shape == (18, 1, 3, 3)
    assert torch.equal(filters[1::2], -filters[0::2])  # each filter, then its negative
    patches = torch.nn.functional.unfold(images, 3).transpose(1, 2).reshape(-1, 9)
    white = patches @ filters[0::2].reshape(9, 9).T
    cov = white.T @ white / len(white)
    assert torch.allclose(cov, torch.eye(9), atol=0.01)
    # Largest eigenvalue first: the filters' norms (1/sqrt(eigenvalue)) grow.
    assert torch.all(filters[0::2].reshape(9, 9).norm(dim=1).diff() > 0)


def test_whitening_starts_the_first_filters_only_and_trains(splits):
    import dataclasses

    cfg = dataclasses.replace(RECIPE, whiten_first_conv=True, epochs=2)
    images = splits[0][0]
    torch.manual_seed(1)
    state = train.new_state(SMALL, cfg, 5, torch.device("cpu"), torch.contiguous_format, images)
    torch.manual_seed(1)  # the same random initialisation, without whitening
    plain = train.new_state(SMALL, RECIPE, 5, torch.device("cpu"), torch.contiguous_format)
    first, random_init = state.model.blocks[0][0].weight, plain.model.blocks[0][0].weight
    assert first.shape[0] == 8  # SMALL's first block: 8 of the 18 whitening filters
    x = (data.to_float(images[:5000]) - 0.2860) / 0.3530
    assert torch.allclose(first, train.whitening_filters(x, 3)[:8])
    assert torch.equal(state.ema.module.blocks[0][0].weight, first)  # the average starts there
    rest = [k for k in plain.model.state_dict() if not k.startswith("blocks.0.0.weight")]
    assert all(torch.equal(state.model.state_dict()[k], plain.model.state_dict()[k]) for k in rest)
    assert not torch.equal(first, random_init)
    fit = train.fit(SMALL, cfg, *splits, AUGMENT, progress=False)
    assert fit.history[0]["train_loss"] < 5
