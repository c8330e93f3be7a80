"""The shipped models, weights/emonext_atto_fer2013.pt (FER2013's 7 classes), weights/emonext_atto_ferplus.pt
(FER+'s 8) and the FER2013 model's int8 ONNX file weights/emonext_atto_fer2013_int8.onnx: what the files hold,
that a copied emonext.py alone loads the .pt, that `predict.py` runs on them, and that weights/results.json, the
record README's table and the model cards are checked against, is what these very files are (sha256, size) and
give (the accuracy through eval.py on the real FER2013 and FER+ labels, so those tests are slow and need
../shared/data/)."""
import hashlib
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
import predict
import synthetic
from conftest import FER2013_NPZ, ROOT, largest_int8_weight
from data import FERPLUS_CLASS_NAMES
from emonext import FER2013_CLASS_NAMES, EmoNeXt

WEIGHTS = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
FERPLUS_WEIGHTS = os.path.join(ROOT, "weights", "emonext_atto_ferplus.pt")
SHIPPED = [(WEIGHTS, FER2013_CLASS_NAMES), (FERPLUS_WEIGHTS, FERPLUS_CLASS_NAMES)]  # each .pt and its columns
FERPLUS_CSV = os.path.join(os.path.dirname(FER2013_NPZ), "fer2013new.csv")
ONNX_INT8 = os.path.join(ROOT, "weights", "emonext_atto_fer2013_int8.onnx")
RESULTS = json.load(open(os.path.join(ROOT, "weights", "results.json")))


@pytest.fixture(scope="module")
def model():
    return EmoNeXt.from_checkpoint(WEIGHTS).eval()


@pytest.mark.parametrize("path, class_names", SHIPPED)
def test_the_file_holds_half_precision_ema_weights_config_and_class_names(path, class_names):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    provenance = {"args", "iter", "best_val_acc", "averaged_from"}
    assert set(ckpt) <= {"config", "ema", "class_names"} | provenance  # no optimizer, no online weights
    assert list(ckpt["config"]["class_names"]) == list(class_names)  # export.py writes them once, in the config
    assert ckpt.get("class_names", list(class_names)) == list(class_names)  # files before it: a top-level copy too
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


def test_the_onnx_file_is_the_shipped_models_int8_path():
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(ONNX_INT8, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    ckpt = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert json.loads(meta["emonext.class_names"]) == list(FER2013_CLASS_NAMES)
    assert json.loads(meta["emonext.precision"]) == "int8"
    assert json.loads(meta["emonext.args"]) == ckpt["args"]
    for key in ("iter", "best_val_acc", "averaged_from"):  # where the weights came from, as the .pt says
        assert json.loads(meta.get(f"emonext.{key}", "null")) == ckpt.get(key), key
    how = json.loads(meta["emonext.quantization"])
    assert how["calibration"] == {"method": "MinMax", "data": "data/fer2013.npz", "train faces": 1000,
                                  "seed": 0}  # what docs/inference.md's export command says
    assert os.path.getsize(ONNX_INT8) < 5 * 2**20
    assert largest_int8_weight(ONNX_INT8) <= 64  # 7 bits: the same numbers on CPUs without VNNI


def test_the_record_names_every_shipped_file_as_it_is():
    """weights/results.json against the files: one record per model file in weights/, its sha256 and size."""
    shipped = sorted(f"weights/{f}" for f in os.listdir(os.path.join(ROOT, "weights")) if f.endswith((".pt", ".onnx")))
    assert sorted(RESULTS) == shipped
    for path, record in RESULTS.items():
        with open(os.path.join(ROOT, path), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == record["sha256"], path
        assert os.path.getsize(os.path.join(ROOT, path)) == record["bytes"], path


def eval_args(record, tmp_path):
    """The record's eval.py command as arguments, its --data replaced by where the tests find FER2013."""
    args = shlex.split(record["eval"])
    assert args[:2] == ["python", "eval.py"] and args[3] == "--data", record["eval"]
    return [os.path.join(ROOT, args[2]), "--data", FER2013_NPZ, *args[5:], "--out-dir", str(tmp_path)]


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(FER2013_NPZ) and os.path.exists(FERPLUS_CSV)),
                    reason="needs ../shared/data/fer2013.npz and fer2013new.csv")
@pytest.mark.parametrize("path", sorted(RESULTS))
def test_the_recorded_accuracy_is_what_eval_gives_on_the_file(path, tmp_path, capsys):
    """Each file's PrivateTest accuracy (plain, and ten-crop for a .pt) and, where recorded, its val accuracy, by
    the record's eval.py command; the FER+ model is scored with FER+'s majority labels, which eval.py reads from the
    checkpoint and fer2013new.csv beside the .npz."""
    record = RESULTS[path]
    if path.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    runs = [(["--tta", "none"], record["accuracy"]["plain"], "test", record["faces"])]
    if record["accuracy"]["tencrop"] is not None:
        runs.append((["--tta", "tencrop"], record["accuracy"]["tencrop"], "test", record["faces"]))
    if "val_accuracy" in record:
        runs.append((["--split", "val", "--tta", "none"], record["val_accuracy"]["plain"], "val", None))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # ten-crop is ten forward passes of each of about 3,500 faces
    try:
        for flags, recorded, split, faces in runs:
            acc = evaluate.main(eval_args(record, tmp_path) + flags)
            out = capsys.readouterr().out
            assert f"{100 * acc:.2f}" == f"{recorded:.2f}", (path, flags)
            counted = re.search(r"accuracy \((?:none|tencrop)\): [\d.]+% of (\d+)", out)
            assert counted and (faces is None or int(counted[1]) == faces), (path, flags, out[-500:])
    finally:
        torch.set_num_threads(threads)
