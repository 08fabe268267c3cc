import functools
import gzip
import http.server
import threading

import pytest
import torch

from fmnist_crnn import data
from fmnist_crnn.config import AugmentConfig, DataConfig, SplitConfig

from .conftest import idx_bytes, synthetic_arrays

NO_MIRROR = DataConfig(mirror="", timeout_s=2)


def test_fetch_from_a_folder_writes_verified_decompressed_files(synthetic_source, tmp_path):
    folder, files = synthetic_source
    out = tmp_path / "raw"
    used = data.fetch_raw(NO_MIRROR, out, sources=[str(folder)], files=files)
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in files)
    assert used == {f.name: str(folder / f.gz_name) for f in files}
    images, labels = data.load_raw(out, "train")
    assert images.shape == (32, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (32,)


def test_decompressed_files_in_a_folder_are_accepted(synthetic_source, tmp_path):
    folder, files = synthetic_source
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in files:
        (plain / f.name).write_bytes(gzip.decompress((folder / f.gz_name).read_bytes()))
    data.fetch_raw(NO_MIRROR, tmp_path / "raw", sources=[str(plain)], files=files)


def test_gzip_header_differences_do_not_matter(synthetic_source, tmp_path):
    # Debian's .gz files differ from upstream only in the gzip header: content is what counts.
    folder, files = synthetic_source
    for f in files:
        content = gzip.decompress((folder / f.gz_name).read_bytes())
        (folder / f.gz_name).write_bytes(gzip.compress(content, mtime=12345))
    data.fetch_raw(NO_MIRROR, tmp_path / "raw", sources=[str(folder)], files=files)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_file_is_an_error_and_leaves_earlier_output(synthetic_source, tmp_path, damage):
    folder, files = synthetic_source
    out = tmp_path / "raw"
    data.fetch_raw(NO_MIRROR, out, sources=[str(folder)], files=files)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    target = folder / files[2].gz_name
    blob = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(blob[: len(blob) // 2])
    else:
        target.write_bytes(gzip.compress(gzip.decompress(blob)[:-1] + b"\x01"))
    with pytest.raises(data.DataError) as err:
        data.fetch_raw(NO_MIRROR, out, sources=[str(folder)], files=files)
    message = str(err.value)
    assert str(target) in message and files[2].sha256 in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "source"]  # no temp left


def test_no_source_lists_everything_tried(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError) as err:
        data.fetch_raw(NO_MIRROR, tmp_path / "raw",
                       sources=[str(empty), "http://127.0.0.1:9/"])
    message = str(err.value)
    assert str(empty) in message and "http://127.0.0.1:9/" in message
    assert "FASHION_MNIST_DIR" in message
    assert not (tmp_path / "raw").exists()


def test_http_mirror_is_used_when_folders_lack_the_files(synthetic_source, tmp_path):
    folder, files = synthetic_source
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        used = data.fetch_raw(NO_MIRROR, tmp_path / "raw",
                              sources=[str(tmp_path / "missing"), url], files=files)
    finally:
        server.shutdown()
    assert all(source.startswith(url) for source in used.values())


def test_candidate_sources_order(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path))
    sources = data.candidate_sources(DataConfig(source_dir="/ignored", mirror="http://m/"))
    assert sources == [str(tmp_path), str(data.DEBIAN_DIR), "http://m/"]
    monkeypatch.delenv(data.ENV_DIR)
    assert data.candidate_sources(DataConfig(source_dir="/mine"))[0] == "/mine"


def test_wrong_idx_shape_is_a_clear_error(raw_dir):
    labels = raw_dir / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(synthetic_arrays()["train-images-idx3-ubyte"]))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte: expected 1-d"):
        data.load_raw(raw_dir, "train")


def test_garbage_idx_is_a_clear_error(raw_dir):
    (raw_dir / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte"):
        data.load_raw(raw_dir, "t10k")


def test_split_sizes_and_disjointness(raw_dir, tmp_path):
    out = tmp_path / "split"
    sizes = data.make_split(raw_dir, out, SplitConfig(val_fraction=0.25, seed=1))
    assert sizes == {"train": 48, "val": 16, "test": 32}
    train_x, _ = data.load_split(out, "train")
    val_x, _ = data.load_split(out, "val")
    raw_x, _ = data.load_raw(raw_dir, "train")
    rows = {bytes(x.numpy()) for x in raw_x}
    seen = [bytes(x.numpy()) for x in torch.cat([train_x, val_x])]
    assert len(set(seen)) == 64 and set(seen) == rows


def test_split_without_validation_trains_on_every_image(raw_dir, tmp_path):
    out = tmp_path / "split"
    sizes = data.make_split(raw_dir, out, SplitConfig(val_fraction=0.0))
    assert sizes == {"train": 64, "val": 0, "test": 32}
    train_x, train_y = data.load_split(out, "train")
    raw_x, raw_y = data.load_raw(raw_dir, "train")
    assert torch.equal(train_x, raw_x) and torch.equal(train_y, raw_y)
    val_x, val_y = data.load_split(out, "val")
    assert val_x.shape == (0, 28, 28) and val_y.shape == (0,)
    assert torch.equal(data.load_split(out, "test")[1], data.load_raw(raw_dir, "t10k")[1])


def test_split_is_seeded(raw_dir, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        data.make_split(raw_dir, tmp_path / name, SplitConfig(seed=seed))
    a, b, c = (data.load_split(tmp_path / n, "val")[1] for n in "abc")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stratified_split_keeps_class_proportions(raw_dir, tmp_path):
    data.make_split(raw_dir, tmp_path / "s", SplitConfig(val_fraction=0.5, stratify=True))
    _, train_y = data.load_split(tmp_path / "s", "train")
    _, val_y = data.load_split(tmp_path / "s", "val")
    diff = torch.bincount(train_y, minlength=10) - torch.bincount(val_y, minlength=10)
    assert diff.abs().max() <= 1


def test_limit_takes_the_first_images(raw_dir, tmp_path):
    sizes = data.make_split(raw_dir, tmp_path / "s", SplitConfig(limit=20, val_fraction=0.5))
    assert sizes == {"train": 10, "val": 10, "test": 20}


def test_batches_cover_every_image_once_in_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).repeat_interleave(784).view(10, 28, 28)
    labels = torch.arange(10)
    order = [y for _, ys in data.batches(images, labels, 4, torch.Generator().manual_seed(0))
             for y in ys.tolist()]
    again = [y for _, ys in data.batches(images, labels, 4, torch.Generator().manual_seed(0))
             for y in ys.tolist()]
    assert sorted(order) == list(range(10)) and order == again
    x, y = next(data.batches(images, labels, 4))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], y.float() / 255)


# Batch augmentation ---------------------------------------------------------------------------

def _dot_batch(n=64):
    """Black images with one white pixel at (row 5, column 9): easy to follow."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, 0, 5, 9] = 1.0
    return x


def test_augmentation_is_seeded_and_per_image():
    cfg = AugmentConfig(crop_padding=3, hflip=True, erasing=0.5)
    x = torch.rand(32, 1, 28, 28)
    a = data.augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = data.augment_batch(x, cfg, torch.Generator().manual_seed(1))
    c = data.augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(img.flatten()[:50].tolist()) for img in a}) > 1  # not one draw for all


def test_default_augmentation_changes_nothing():
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(data.augment_batch(x, AugmentConfig(), torch.Generator()), x)


def test_random_crop_shifts_each_image_within_the_padding():
    out = data.random_crop(_dot_batch(), 2, torch.Generator().manual_seed(0))
    positions = out[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 28, positions % 28
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(64))  # the dot is moved, not lost
    assert ((rows - 5).abs() <= 2).all() and ((cols - 9).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (1, 0), (-1, 0), (0, 2), (-2, -3)])
def test_shift_moves_the_image_and_fills_black(dy, dx):
    x = _dot_batch(1)  # one white pixel at row 5, column 9
    out = data.shift(x, dy, dx)
    assert out.shape == x.shape
    assert out[0, 0, 5 + dy, 9 + dx] == 1 and out.sum() == 1
    full = data.shift(torch.ones(1, 1, 28, 28), dy, dx)[0, 0]
    assert full.sum() == (28 - abs(dy)) * (28 - abs(dx))  # uncovered rows/columns are 0


def test_flip_is_horizontal_only_and_about_half_the_batch():
    out = data.augment_batch(_dot_batch(200), AugmentConfig(hflip=True),
                             torch.Generator().manual_seed(0))
    positions = out[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 28, positions % 28
    assert (rows == 5).all()  # never upside down
    assert set(cols.tolist()) == {9, 18}
    assert 60 < (cols == 18).sum() < 140


def test_alternating_flips_show_each_image_both_ways_every_two_epochs():
    images = torch.arange(200 * 2 * 3, dtype=torch.int32).reshape(200, 2, 3)
    odd = data.alternating_flips(200, seed=7)
    assert torch.equal(odd, data.alternating_flips(200, seed=7))  # the seed alone decides
    assert not torch.equal(odd, data.alternating_flips(200, seed=8))
    assert 60 < odd.sum() < 140  # about half start mirrored
    mirrored = images.flip(-1)
    first, second, third = (data.epoch_images(images, odd, epoch) for epoch in (1, 2, 3))
    for i in range(200):
        assert torch.equal(first[i], mirrored[i] if odd[i] else images[i])
        assert torch.equal(second[i], images[i] if odd[i] else mirrored[i])
    assert torch.equal(third, first)


def test_with_alternating_flips_the_batches_draw_no_flip_of_their_own():
    x = _dot_batch(50)
    generator = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, AugmentConfig(hflip=True, alternate_flips=True), generator)
    assert torch.equal(out, x)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_random_erasing_blanks_one_rectangle_with_probability_p():
    x = torch.ones(400, 1, 28, 28)
    out = data.random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).sum(1)
    touched = erased > 0
    assert 150 < touched.sum() < 250
    fractions = erased[touched].float() / (28 * 28)
    assert fractions.min() > 0.005 and fractions.max() < 0.5
    for img in out[touched][:20, 0]:  # the zeros form one axis-aligned rectangle
        rows = (img == 0).any(1).nonzero().flatten()
        cols = (img == 0).any(0).nonzero().flatten()
        box = img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (box == 0).all() and (img == 0).sum() == box.numel()


def test_cutmix_pastes_one_rectangle_of_each_images_partner_and_weighs_the_labels_by_area():
    x = torch.arange(8.0)[:, None, None, None].expand(8, 1, 28, 28).clone()  # image i is all i
    assert data.cutmix(x, 0.0, torch.Generator().manual_seed(0)) == (x, None)
    shares = []
    for seed in range(20):
        out, (partners, own) = data.cutmix(x, 1.0, torch.Generator().manual_seed(seed))
        assert sorted(partners.tolist()) == list(range(8))  # a pairing of the batch
        box = None  # the same rectangle in every image, filled with its partner's pixels
        for i, img in enumerate(out[:, 0]):
            pasted = img != i
            if partners[i] == i:
                assert not pasted.any()
                continue
            box = pasted if box is None else box
            assert torch.equal(pasted, box) and (img[pasted] == partners[i]).all()
            assert pasted.float().mean().item() == pytest.approx(1 - own)
        if box is not None and box.any():
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        shares.append(own)
    assert min(shares) < 0.5 < max(shares) <= 1  # lambda drawn anew for each batch
    out, mix = data.cutmix(x, 1.0, torch.Generator().manual_seed(3))
    again, mix_again = data.cutmix(x, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(mix[0], mix_again[0])  # seeded


def test_mixup_blends_each_image_with_its_partner_by_one_lambda_per_batch():
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert data.mixup(x, 0.0, torch.Generator().manual_seed(0)) == (x, None)
    lambdas = []
    for seed in range(20):
        out, (partners, lam) = data.mixup(x, 1.0, torch.Generator().manual_seed(seed))
        assert sorted(partners.tolist()) == list(range(8))  # a pairing of the batch
        assert torch.allclose(out, lam * x + (1 - lam) * x[partners], atol=1e-6)
        lambdas.append(lam)
    assert 0 <= min(lambdas) < 0.5 < max(lambdas) <= 1  # drawn anew for each batch
    out, mix = data.mixup(x, 1.0, torch.Generator().manual_seed(3))
    again, mix_again = data.mixup(x, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(mix[0], mix_again[0])  # seeded
    assert mix[1] == mix_again[1]

