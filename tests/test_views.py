"""The report's views file: what the evaluate stage computes with the model, read back by the
report stage without torch."""

import numpy as np
import pytest
import torch

from fmnist_crnn import data
from fmnist_crnn.config import ModelConfig
from fmnist_crnn.model import CRNN, shape_table
from fmnist_crnn.views import ReportViews, load_views, save_views, trace


def views_of(model: CRNN, mistakes: int) -> ReportViews:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 9, 4])
    titles = [f"Shirt -> T-shirt/top ({90 - i}%)" for i in range(mistakes)]
    return ReportViews(list(data.CLASS_NAMES), trace(model, images, labels),
                       shape_table(model.cfg), images[:mistakes].numpy(), titles)


@pytest.mark.parametrize("mistakes", [2, 0])
def test_views_read_back_as_written(tmp_path, mistakes):
    torch.manual_seed(0)
    views = views_of(CRNN(ModelConfig()), mistakes)
    save_views(views, tmp_path / "views.npz")
    back = load_views(tmp_path / "views.npz")
    assert back.classes == views.classes and back.shapes == views.shapes
    assert back.mistake_titles == views.mistake_titles
    assert np.array_equal(back.mistake_images, views.mistake_images)
    assert back.trace.labels == [0, 9, 4]
    for a, b in zip([*back.trace.blocks, back.trace.sequence, back.trace.probabilities,
                     back.trace.images],
                    [*views.trace.blocks, views.trace.sequence, views.trace.probabilities,
                     views.trace.images], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_the_trace_is_the_models_own_forward_pass():
    torch.manual_seed(0)
    model = CRNN(ModelConfig()).eval()
    views = views_of(model, 1)
    images = torch.from_numpy(views.trace.images)
    with torch.no_grad():
        expected = torch.softmax(model(data.to_float(images)), dim=1).numpy()
    np.testing.assert_allclose(views.trace.probabilities, expected, rtol=1e-5, atol=1e-6)
    # Each block's maps have the shape table's channels and size (the table is for 64).
    for block, (_, shape) in zip(views.trace.blocks, views.shapes[1:], strict=False):
        assert list(block.shape[1:]) == shape[1:]


def test_a_missing_or_broken_views_file_names_itself(tmp_path):
    with pytest.raises(ValueError, match=r"views\.npz: not found; run the evaluate stage"):
        load_views(tmp_path / "views.npz")
    (tmp_path / "views.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"views\.npz: not a readable views file"):
        load_views(tmp_path / "views.npz")
    np.savez(tmp_path / "old.npz", classes=np.array(["a"]))
    with pytest.raises(ValueError, match=r"old\.npz: lacks 'images'"):
        load_views(tmp_path / "old.npz")
