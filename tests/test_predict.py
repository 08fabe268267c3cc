import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist_crnn import predict
from fmnist_crnn.config import ModelConfig, to_dict
from fmnist_crnn.config import Params as AllParams
from fmnist_crnn.model import CRNN

from .conftest import idx_bytes


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(8, 8, 16), embedding_dim=16, hidden_dim=8, num_layers=1,
                      head_dims=(8,))
    model_cfg = to_dict(AllParams(model=cfg))["model"]
    path = tmp_path / "model.pt"
    torch.save({"model_config": model_cfg, "state_dict": CRNN(cfg).state_dict()}, path)
    return path


def test_light_background_colour_photo_becomes_fashion_mnist_style(tmp_path):
    # A dark square on a white 300x150 RGB picture: inverted to a light object on black,
    # fitted into 28x28 keeping the aspect ratio.
    pixels = np.full((150, 300, 3), 255, dtype=np.uint8)
    pixels[50:100, 100:200] = (20, 40, 60)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg")
    image = predict.load_image(tmp_path / "photo.jpg")
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert image[0, 0] == 0  # background black
    assert image[14, 14] > 180  # the object light
    assert image[:7].max() == 0  # letterboxed: 2:1 picture keeps its aspect


def test_dark_background_grey_png_is_kept(tmp_path):
    pixels = np.zeros((56, 56), dtype=np.uint8)
    pixels[10:46, 20:36] = 200
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    image = predict.load_image(tmp_path / "grey.png")
    assert image[0, 0] == 0 and image[14, 14] > 150


def test_each_file_gets_an_answer_or_its_own_error(tmp_path, checkpoint, capsys):
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "idx").write_bytes(idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    code = predict.main([str(tmp_path / n) for n in ("ok.png", "broken.png", "idx", "labels",
                                                     "missing.jpg")]
                        + ["--checkpoint", str(checkpoint)])
    out, err = capsys.readouterr()
    assert code == 1
    answers = out.strip().splitlines()
    assert len(answers) == 4  # ok.png + three IDX images
    assert answers[0].startswith(f"{tmp_path / 'ok.png'}: ") and "%" in answers[0]
    assert answers[1].startswith(f"{tmp_path / 'idx'}[0]: ")
    for bad in ("broken.png", "labels", "missing.jpg"):
        assert f"{tmp_path / bad}: error:" in err


def run_predict(args, cwd, monkeypatch, capsys):
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    code = predict.main(args)
    return code, capsys.readouterr()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "shirt.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(path)
    return path


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, image, monkeypatch, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, out = run_predict([str(image), "--checkpoint", str(bad)], tmp_path, monkeypatch,
                            capsys)
    assert code == 2
    assert out.err.count("\n") == 1 and "not a readable model checkpoint" in out.err
    code, out = run_predict([str(image), "--checkpoint", str(tmp_path / "missing.pt")],
                            tmp_path, monkeypatch, capsys)
    assert code == 2 and "model file not found" in out.err


def test_a_registry_uri_outside_the_repository_never_creates_a_store(tmp_path, image,
                                                                    monkeypatch, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code, out = run_predict([str(image), "--model-uri", "models:/no-such-model@champion"],
                            outside, monkeypatch, capsys)
    assert code == 2 and out.err.startswith("error: no MLflow store at")
    assert "MLFLOW_TRACKING_URI" in out.err and "Traceback" not in out.err
    assert not (outside / "mlflow.db").exists()


def test_an_unknown_registered_model_is_one_line_and_exit_2(tmp_path, image, monkeypatch,
                                                           capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # an existing, empty store
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    code = predict.main([str(image), "--model-uri", "models:/no-such-model@champion"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot load the model models:/no-such-model")
    assert err.count("\n") == 1


def test_a_reader_that_stops_early_is_not_an_error(tmp_path, checkpoint):
    # `python -m fmnist_crnn.predict FILE | head -3`: head closes the pipe after three lines;
    # predict stops quietly instead of printing a BrokenPipeError traceback.
    (tmp_path / "many").write_bytes(idx_bytes(np.zeros((5000, 28, 28), dtype=np.uint8)))
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_crnn.predict", "--checkpoint",
                             str(checkpoint), str(tmp_path / "many")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0
    assert first.startswith(f"{tmp_path / 'many'}[0]: ".encode())
    assert "Traceback" not in err and "BrokenPipe" not in err, err
