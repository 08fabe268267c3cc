import dataclasses

import pytest
import torch

from fmnist_crnn.config import ConfigError, ModelConfig
from fmnist_crnn.model import CRNN, count_parameters, plan, shape_table

# The study's ablations (shared/docs/study.md), as model overrides, with the shapes we expect
# after each block and the LSTM's (steps, hidden).
TWO_BLOCKS = dict(channels=(32, 64), kernel_sizes=(3, 3), strides=(2, 1), pool=(True, True),
                  dropout=(0.25, 0.25))
VARIANTS = {
    "baseline": ({}, [(32, 7, 7), (64, 3, 3), (128, 2, 2)], (8, 128)),
    "conv2": (TWO_BLOCKS, [(32, 7, 7), (64, 3, 3)], (9, 128)),
    "pool2": (dict(pool=(True, True, False)), [(32, 7, 7), (64, 3, 3), (128, 4, 4)], (32, 128)),
    "kernels222": (dict(kernel_sizes=(2, 2, 2)), [(32, 7, 7), (64, 4, 4), (128, 2, 2)],
                   (8, 128)),
    "kernels333": (dict(kernel_sizes=(3, 3, 3)), [(32, 7, 7), (64, 3, 3), (128, 1, 1)],
                   (2, 128)),
    "kernels555": (dict(kernel_sizes=(5, 5, 5)), [(32, 7, 7), (64, 3, 3), (128, 1, 1)],
                   (2, 128)),
    "hidden256": (dict(hidden_dim=256), [(32, 7, 7), (64, 3, 3), (128, 2, 2)], (8, 256)),
    "dropout01": (dict(dropout=(0.1, 0.1, 0.1)), [(32, 7, 7), (64, 3, 3), (128, 2, 2)],
                  (8, 128)),
    "dropout01x1": (dict(dropout=(0.1, 0.25, 0.25)), [(32, 7, 7), (64, 3, 3), (128, 2, 2)],
                    (8, 128)),
    "final": (dict(hidden_dim=256, dropout=(0.1, 0.1, 0.1)),
              [(32, 7, 7), (64, 3, 3), (128, 2, 2)], (8, 256)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_study_variant_builds_with_expected_shapes(name):
    overrides, blocks, (steps, hidden) = VARIANTS[name]
    cfg = ModelConfig(**overrides)
    table = dict(shape_table(cfg, batch_size=4))
    assert table["input"] == [4, 1, 28, 28]
    assert [tuple(table[f"block{i + 1}"][1:]) for i in range(len(blocks))] == blocks
    assert table["lstm"] == [4, steps, hidden]
    assert table["head"] == [4, 10]


def test_study_printed_shapes_for_the_baseline():
    # study.md: [64, 1, 28, 28] -> [64, 32, 7, 7] -> [64, 64, 3, 3]; head -> [64, 10].
    table = dict(shape_table(ModelConfig()))
    assert table["block1"] == [64, 32, 7, 7]
    assert table["block2"] == [64, 64, 3, 3]
    assert table["head"] == [64, 10]


def test_hidden_256_has_about_1_7m_parameters():
    assert 1_650_000 < count_parameters(CRNN(ModelConfig(hidden_dim=256))) < 1_750_000


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = CRNN(ModelConfig())
    x = torch.rand(8, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (8, 10)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_head_input_is_computed_not_typed():
    cfg = ModelConfig(hidden_dim=96)
    model = CRNN(cfg)
    first_linear = next(m for m in model.head if isinstance(m, torch.nn.Linear))
    assert first_linear.in_features == plan(cfg).seq_len * 96


def test_no_pixels_left_names_the_parameters():
    with pytest.raises(ConfigError, match=r"kernel_sizes\[2\]=5.*no pixels|no pixels.*"
                                          r"kernel_sizes\[2\]=5"):
        plan(ModelConfig(kernel_sizes=(3, 3, 5), padding=(1, 1, 0)))


def test_pooling_to_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"model.pool\[3\]"):
        plan(ModelConfig(channels=(8, 8, 8, 8), kernel_sizes=(3,) * 4, strides=(2, 1, 1, 1),
                         pool=(True,) * 4, dropout=(0.0,) * 4))


def test_embedding_dim_must_divide_the_flattened_size():
    with pytest.raises(ConfigError, match=r"128\*2\*2 = 512.*embedding_dim=60"):
        plan(ModelConfig(embedding_dim=60))


ROWS = ModelConfig(channels=(8, 16), kernel_sizes=(3, 3), strides=(1, 1), pool=(True, True),
                   dropout=(0.0, 0.0), sequence="rows", hidden_dim=12, num_layers=1,
                   head_dims=())


@pytest.mark.parametrize(("sequence", "bidirectional", "steps", "step_size", "width"), [
    ("rows", False, 7, 16 * 7, 12),
    ("columns", True, 7, 16 * 7, 24),
])
def test_rows_and_columns_read_the_feature_map_as_a_sequence(sequence, bidirectional, steps,
                                                             step_size, width):
    cfg = dataclasses.replace(ROWS, sequence=sequence, bidirectional=bidirectional)
    p = plan(cfg)
    assert (p.seq_len, p.step_size, p.head_in) == (steps, step_size, steps * width)
    rows = dict(shape_table(cfg, batch_size=2))
    assert rows["lstm"] == [2, steps, width] and rows["head"] == [2, 10]


def test_rows_sequence_steps_are_the_feature_map_rows():
    model = CRNN(ROWS).eval()
    fmap = torch.randn(2, 16, 7, 7)
    seen = {}
    model.lstm.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model.sequence(fmap)
    # Step t holds row t of every channel: (C, W) flattened channel-major.
    assert torch.equal(seen["x"][:, 3], fmap[:, :, 3, :].reshape(2, -1))


def test_a_projection_feeds_the_lstm_its_own_width():
    cfg = dataclasses.replace(ROWS, projection_dim=20)
    model = CRNN(cfg).eval()
    assert (model.projection.in_features, model.projection.out_features) == (16 * 7, 20)
    assert model.lstm.input_size == 20
    seen = {}
    model.lstm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    assert list(model(torch.randn(2, 1, 28, 28)).shape) == [2, 10]
    assert list(seen["x"].shape) == [2, 7, 20]
    # Without one the model has exactly the same weights as before the option existed.
    plain = CRNN(ROWS)
    assert not any(k.startswith("projection") for k in plain.state_dict())
    assert count_parameters(model) - count_parameters(plain) == (
        16 * 7 * 20 + 20 - 4 * 12 * (16 * 7 - 20))
