import pytest
import torch

from fmnist_crnn import data, train
from fmnist_crnn.config import ModelConfig, SplitConfig, TrainConfig

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
    state = train.load_resume_state(ckpt, "fp")
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
    assert train.load_resume_state(ckpt, "other") is None
    assert train.load_resume_state(ckpt, "fp") is None  # finished: a new repro trains afresh


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
    assert train.load_resume_state(ckpt, "fp")["epoch"] == 1


def test_history_csv_round_trip(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.75,
             "lr": 0.001, "epoch_seconds": 1.5}]
    train.write_history(tmp_path / "h.csv", rows)
    assert train.read_history(tmp_path / "h.csv") == rows
