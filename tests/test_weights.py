"""The shipped FER2013 model, weights/emonext_atto_fer2013.pt: what the file holds, that a copied emonext.py alone
loads it, that `predict.py` runs on it, and that the README's sha256 and PrivateTest accuracy line are
what this very file gives (the accuracy through eval.py on the real FER2013, so that test is slow and needs
../shared/data/fer2013.npz)."""
import hashlib
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
import predict
import synthetic
from conftest import FER2013_NPZ, ROOT
from emonext import FER2013_CLASS_NAMES, EmoNeXt

WEIGHTS = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
README = open(os.path.join(ROOT, "README.md")).read()


@pytest.fixture(scope="module")
def model():
    return EmoNeXt.from_checkpoint(WEIGHTS).eval()


def test_the_file_holds_half_precision_ema_weights_config_and_class_names():
    ckpt = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert set(ckpt) <= {"config", "ema", "class_names", "args", "iter", "best_val_acc"}  # no optimizer, no online weights
    # exported before the config held class names: the model takes the file's top-level ones
    assert ckpt["class_names"] == list(FER2013_CLASS_NAMES) and "class_names" not in ckpt["config"]
    assert EmoNeXt.from_checkpoint(WEIGHTS).config.class_names == FER2013_CLASS_NAMES
    floats = [v for v in ckpt["ema"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert os.path.getsize(WEIGHTS) < 10 * 2**20
    assert ckpt["config"]["num_classes"] == 7 and ckpt["config"]["in_chans"] == 1


def test_a_copied_emonext_alone_loads_it_and_predicts_as_here(model, run_emonext_alone, tmp_path):
    faces = synthetic.synthetic_faces(n_train=6, n_val=0, n_test=0, seed=3)["train"][0]
    np.save(tmp_path / "faces.npy", faces.numpy())
    out = run_emonext_alone(
        "import sys, numpy, torch\n"
        "from emonext import EmoNeXt\n"
        "assert 'data' not in sys.modules and 'kernels' not in sys.modules\n"
        f"m = EmoNeXt.from_checkpoint({WEIGHTS!r})\n"
        "torch.save(m.predict(numpy.load('faces.npy')), 'probs.pt')\n"
        "print(m.config.img_size, next(m.parameters()).dtype)\n")
    assert out.split() == [str(model.config.img_size), "torch.float32"]  # fp16 on disk, fp32 in the model
    torch.testing.assert_close(torch.load(tmp_path / "probs.pt", weights_only=True), model.predict(faces),
                               rtol=0, atol=1e-6)


def test_predict_on_the_shipped_weights(model, tmp_path, capsys):
    face = synthetic.synthetic_faces(n_train=1, n_val=0, n_test=0, seed=5)["train"][0][0].numpy()
    path = str(tmp_path / "face.jpg")
    Image.fromarray(face).resize((96, 96)).save(path)  # a face photo larger than FER2013's, as a JPEG
    probs = predict.main([WEIGHTS, path, "--tta", "none", "--detect", "off"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "frame", "box", "top", *FER2013_CLASS_NAMES]
    assert lines[1].split()[:4] == [path, "0", "0,0,96,96", FER2013_CLASS_NAMES[probs[0].argmax()]]
    torch.testing.assert_close(probs, model.predict(np.array(Image.open(path))), rtol=0, atol=1e-6)


def test_readme_gives_the_files_sha256():
    with open(WEIGHTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert re.findall(r"sha256 ([0-9a-f]{64})", README) == [digest]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FER2013_NPZ), reason="needs ../shared/data/fer2013.npz")
def test_readme_accuracy_is_what_eval_gives_on_the_shipped_file(tmp_path, capsys):
    claimed = re.search(r"`eval.py` on this file:\s+([\d.]+)% plain,\s+([\d.]+)% ten-crop", README)
    assert claimed, "README: the shipped weights' accuracy line is missing"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # ten-crop is 35,890 forward passes
    try:
        for tta, percent in zip(("none", "tencrop"), claimed.groups()):
            acc = evaluate.main([WEIGHTS, "--data", FER2013_NPZ, "--tta", tta, "--out-dir", str(tmp_path)])
            assert f"{100 * acc:.2f}" == percent, tta
    finally:
        torch.set_num_threads(threads)
    assert "test accuracy (tencrop)" in capsys.readouterr().out
