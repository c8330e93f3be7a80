"""The shipped models, weights/emonext_atto_fer2013.pt (FER2013's 7 classes), weights/emonext_atto_ferplus.pt
(FER+'s 8) and the FER2013 model's int8 ONNX file weights/emonext_atto_fer2013_int8.onnx: what the files hold,
that a copied emonext.py alone loads the .pt, that `predict.py` runs on them, that the README's onnxruntime example
runs as written, and that the README's sha256s and PrivateTest accuracy lines are what these very files give (the
accuracy through eval.py on the real FER2013 and FER+ labels, so those tests are slow and need ../shared/data/)."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
import predict
import synthetic
from conftest import FER2013_NPZ, ROOT, largest_int8_weight
from data import FERPLUS_CLASS_NAMES
from emonext import FER2013_CLASS_NAMES, EmoNeXt, grey_faces

WEIGHTS = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
FERPLUS_WEIGHTS = os.path.join(ROOT, "weights", "emonext_atto_ferplus.pt")
SHIPPED = [(WEIGHTS, FER2013_CLASS_NAMES), (FERPLUS_WEIGHTS, FERPLUS_CLASS_NAMES)]  # each .pt and its columns
FERPLUS_CSV = os.path.join(os.path.dirname(FER2013_NPZ), "fer2013new.csv")
ONNX_INT8 = os.path.join(ROOT, "weights", "emonext_atto_fer2013_int8.onnx")
README = open(os.path.join(ROOT, "README.md")).read()


@pytest.fixture(scope="module")
def model():
    return EmoNeXt.from_checkpoint(WEIGHTS).eval()


@pytest.mark.parametrize("path, class_names", SHIPPED)
def test_the_file_holds_half_precision_ema_weights_config_and_class_names(path, class_names):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    provenance = {"args", "iter", "best_val_acc", "averaged_from"}
    assert set(ckpt) <= {"config", "ema", "class_names"} | provenance  # no optimizer, no online weights
    assert list(ckpt["config"]["class_names"]) == ckpt["class_names"] == list(class_names)
    assert EmoNeXt.from_checkpoint(path).config.class_names == tuple(class_names)
    floats = [v for v in ckpt["ema"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert os.path.getsize(path) < 10 * 2**20
    assert ckpt["config"]["num_classes"] == len(class_names) and ckpt["config"]["in_chans"] == 1


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


@pytest.mark.parametrize("weights, class_names", SHIPPED)
def test_predict_on_the_shipped_weights(weights, class_names, tmp_path, capsys):
    face = synthetic.synthetic_faces(n_train=1, n_val=0, n_test=0, seed=5)["train"][0][0].numpy()
    path = str(tmp_path / "face.jpg")
    Image.fromarray(face).resize((96, 96)).save(path)  # a face photo larger than FER2013's, as a JPEG
    probs = predict.main([weights, path, "--tta", "none", "--detect", "off"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "frame", "box", "top", *class_names]
    assert lines[1].split()[:4] == [path, "0", "0,0,96,96", class_names[probs[0].argmax()]]
    model = EmoNeXt.from_checkpoint(weights).eval()
    torch.testing.assert_close(probs, model.predict(np.array(Image.open(path))), rtol=0, atol=1e-6)


def test_readme_gives_the_files_sha256():
    digests = {}
    for path in (WEIGHTS, FERPLUS_WEIGHTS, ONNX_INT8):
        with open(path, "rb") as f:
            digests[os.path.relpath(path, ROOT)] = hashlib.sha256(f.read()).hexdigest()
    named = re.findall(r"`(weights/\S+)` \([\d.]+ MiB, sha256 ([0-9a-f]{64})\)", README)
    assert dict(named) == digests and len(named) == 3
    assert sorted(re.findall(r"sha256 ([0-9a-f]{64})", README)) == sorted(digests.values())  # and no other


def test_the_onnx_file_is_the_shipped_models_int8_path():
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(ONNX_INT8, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    ckpt = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert json.loads(meta["emonext.class_names"]) == list(FER2013_CLASS_NAMES) and meta["emonext.precision"] == "int8"
    assert json.loads(meta["emonext.args"]) == ckpt["args"]
    for key in ("iter", "best_val_acc", "averaged_from"):  # where the weights came from, as the .pt says
        assert json.loads(meta.get(f"emonext.{key}", "null")) == ckpt.get(key), key
    how = json.loads(meta["emonext.quantization"])
    assert how["calibration"] == {"method": "MinMax", "data": "../shared/data/fer2013.npz", "train faces": 1000,
                                  "seed": 0}  # what README's export command says
    assert os.path.getsize(ONNX_INT8) < 5 * 2**20
    assert largest_int8_weight(ONNX_INT8) <= 64  # 7 bits: the same numbers on CPUs without VNNI


def test_readme_onnx_example_runs_as_written_on_a_face_png(model, tmp_path, capsys, monkeypatch):
    """The README's onnxruntime + numpy + Pillow lines on a face PNG (RGB, not square, larger than 48): the face they
    make is grey_faces' to within a grey level, and their probabilities are the shipped model's to int8 precision."""
    pytest.importorskip("onnxruntime")
    block = README[README.index("### Deploy with ONNX"):]
    block = block[block.index("```python\n") + len("```python\n"):]
    code = block[:block.index("```")]
    face = synthetic.synthetic_faces(n_train=1, n_val=0, n_test=0, seed=5)["train"][0][0].numpy()
    photo = np.stack([face, face // 2 + 100, 255 - face], -1)  # colours, so the grey conversion counts
    Image.fromarray(photo).resize((100, 130)).save(tmp_path / "face.png")
    monkeypatch.chdir(tmp_path)
    code = code.replace('"weights/emonext_atto_fer2013_int8.onnx"', repr(ONNX_INT8))
    scope = {}
    exec(code, scope)
    image = np.asarray(Image.open(tmp_path / "face.png"))
    assert np.abs(scope["face"].astype(int) - grey_faces(image)[0].numpy().astype(int)).max() <= 1
    probs = torch.from_numpy(scope["probs"])
    assert probs.shape == (7,) and abs(probs.sum().item() - 1) < 1e-5
    assert (probs - model.predict(image)[0]).abs().max() < 0.2
    assert capsys.readouterr().out.split()[0] == FER2013_CLASS_NAMES[probs.argmax()]


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(FER2013_NPZ) and os.path.exists(FERPLUS_CSV)),
                    reason="needs ../shared/data/fer2013.npz and fer2013new.csv")
@pytest.mark.parametrize("weights, class_names", SHIPPED)
def test_readme_accuracy_is_what_eval_gives_on_the_shipped_file(weights, class_names, tmp_path, capsys):
    """Each .pt's paragraph in README (its sha256, then its accuracy line) against eval.py on it; the FER+ model is
    scored with FER+'s majority labels, which eval.py reads from the checkpoint and fer2013new.csv beside the .npz."""
    lines = dict((name, (plain, tencrop)) for name, plain, tencrop in re.findall(
        r"`(weights/\S+\.pt)` \([\d.]+ MiB, sha256 [0-9a-f]{64}\):.*?"
        r"`eval.py` on this file:\s+([\d.]+)% plain,\s+([\d.]+)% ten-crop", README, re.S))
    claimed = lines.get(os.path.relpath(weights, ROOT))
    assert claimed, f"README: the accuracy line of {os.path.relpath(weights, ROOT)} is missing"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # ten-crop is ten forward passes of each of about 3,500 faces
    try:
        for tta, percent in zip(("none", "tencrop"), claimed):
            acc = evaluate.main([weights, "--data", FER2013_NPZ, "--tta", tta, "--out-dir", str(tmp_path)])
            assert f"{100 * acc:.2f}" == percent, tta
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "test accuracy (tencrop)" in out and all(name in out for name in class_names)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FER2013_NPZ), reason="needs ../shared/data/fer2013.npz")
def test_readme_accuracy_is_what_eval_gives_on_the_shipped_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    claimed = re.search(r"`eval.py` on this .onnx file: ([\d.]+)% plain", README)
    assert claimed, "README: the ONNX file's accuracy line is missing"
    acc = evaluate.main([ONNX_INT8, "--data", FER2013_NPZ, "--out-dir", str(tmp_path)])
    assert f"{100 * acc:.2f}" == claimed[1]
    assert "test accuracy (none)" in capsys.readouterr().out
