"""eval.py --images on photos: faces found by OpenCV's Haar cascade in a synthetic scene (real FER2013 faces pasted,
upscaled, at known places into a larger noisy canvas), one line per face, the annotated PNG, face crops beside
photos, --detect auto/on/off, and the one-line message when OpenCV is missing (simulated) or has no cascade.
The scene needs ../shared/data/fer2013.npz and opencv-python-headless<5; the missing-OpenCV tests need neither."""
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data
import emonext
import eval as evaluate
from conftest import FER2013_NPZ
from emonext import EmoNeXt

K = len(data.CLASS_NAMES)
# PrivateTest faces the cascade finds when pasted at 96-128 px (it finds about 3 in 4 of FER2013's faces so)
PASTED = [(0, 40, 60, 96), (11, 150, 210, 112), (6, 300, 40, 128)]  # (face index, x, y, side), left to right


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained atto (the boxes do not depend on the weights), saved as train.py saves its checkpoints."""
    torch.manual_seed(0)
    model = EmoNeXt.from_size("atto", img_size=64, in_chans=1)
    path = tmp_path_factory.mktemp("detect") / "model.pt"
    torch.save({"config": emonext.config_dict(model), "model": model.state_dict()}, path)
    return str(path)


@pytest.fixture
def haar():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Haar cascade (needs opencv-python-headless<5)")


@pytest.fixture
def scene(tmp_path):
    """A 560x360 RGB photo-like scene with three real faces at known places, saved as PNG."""
    if not os.path.exists(FER2013_NPZ):
        pytest.skip("needs ../shared/data/fer2013.npz")
    with np.load(FER2013_NPZ) as d:
        fer = d["private_test_x"]
    canvas = 128 + np.random.default_rng(0).normal(0, 8, (360, 560))
    for i, x, y, side in PASTED:
        canvas[y:y + side, x:x + side] = np.asarray(Image.fromarray(fer[i]).resize((side, side), Image.BILINEAR))
    grey = canvas.round().clip(0, 255).astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(np.stack([grey] * 3, -1)).save(path)
    return str(path), grey


def face_lines(out):
    """(file, (x, y, w, h), top, probabilities) of each face line of eval.py --images with boxes."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["file", "box", "top", *data.CLASS_NAMES]
    rows = []
    for line in lines[1:]:
        if line.startswith("faces drawn: "):
            continue
        f, box, top, *probs = line.split()
        rows.append((f, tuple(int(v) for v in box.split(",")), top, [float(p) for p in probs]))
    return rows


def test_faces_found_at_their_places_one_line_each_and_drawn(haar, checkpoint, scene, tmp_path, capsys):
    path, grey = scene
    crop = tmp_path / "crop.png"  # a face crop beside the photo: one whole face, as without detection
    Image.fromarray(grey[60:156, 40:136]).resize((48, 48)).save(crop)
    out_dir = tmp_path / "drawn"
    probs = evaluate.main([checkpoint, "--images", path, str(crop), "--tta", "none", "--out-dir", str(out_dir)])
    out = capsys.readouterr().out
    rows = face_lines(out)
    assert len(rows) == len(PASTED) + 1 and probs.shape == (len(PASTED) + 1, K)
    model = EmoNeXt.from_checkpoint(checkpoint)
    for (f, (x, y, w, h), top, p), (_, px, py, side), pr in zip(rows, PASTED, probs):
        assert f == path and w == h
        assert abs(x + w / 2 - (px + side / 2)) < 0.15 * side and abs(y + h / 2 - (py + side / 2)) < 0.15 * side
        assert 0.8 < w / side < 1.25
        # each box's face is classified as predict() classifies that crop of the photo
        torch.testing.assert_close(pr[None], model.predict(grey[y:y + h, x:x + w]), rtol=0, atol=1e-6)
        assert top == data.CLASS_NAMES[pr.argmax()] and p == pytest.approx(pr.tolist(), abs=5e-4)
    assert rows[-1][:2] == (str(crop), (0, 0, 48, 48))
    ref = evaluate.main([checkpoint, "--images", str(crop), "--tta", "none", "--detect", "off"])
    torch.testing.assert_close(probs[-1:], ref, rtol=0, atol=1e-6)

    drawn = out_dir / ("scene" + evaluate.ANNOTATED)  # only the photo is drawn, in --out-dir
    assert f"faces drawn: {drawn}" in out and os.listdir(out_dir) == [drawn.name]
    with Image.open(drawn) as im:
        assert im.format == "PNG" and im.size == (560, 360)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    for _, (x, y, w, h), _, _ in rows[:-1]:
        assert tuple(pixels[y + h // 2, x]) == (255, 40, 40)  # the box's left edge
        assert tuple(pixels[y + h - 1, x + w // 2]) == (255, 40, 40)  # its bottom edge
        inside = pixels[y + h // 2, x + w // 2]
        assert (inside == grey[y + h // 2, x + w // 2]).all()  # the face itself left as it was
    assert (pixels[340:, :30] == grey[340:, :30, None]).all()  # away from the faces: the photo unchanged


def test_detect_on_off_and_no_face(haar, checkpoint, scene, tmp_path, capsys):
    path, grey = scene
    whole = evaluate.main([checkpoint, "--images", path, "--tta", "none", "--detect", "off"])
    out = capsys.readouterr().out
    assert whole.shape == (1, K) and out.splitlines()[0].split() == ["file", "top", *data.CLASS_NAMES]
    assert not os.path.exists(path.replace(".png", evaluate.ANNOTATED))
    # a plain picture: searched (--detect on), nothing found, classified whole and said so; drawn beside it
    plain = tmp_path / "wall.png"
    Image.fromarray(np.tile(np.linspace(60, 200, 300).astype(np.uint8), (200, 1))).save(plain)
    probs = evaluate.main([checkpoint, "--images", str(plain), "--detect", "on", "--tta", "none"])
    captured = capsys.readouterr()
    assert f"eval.py: {plain}: no face found; classified the whole image" in captured.err
    assert [row[:2] for row in face_lines(captured.out)] == [(str(plain), (0, 0, 300, 200))]
    torch.testing.assert_close(probs, evaluate.main([checkpoint, "--images", str(plain), "--tta", "none",
                                                     "--detect", "off"]), rtol=0, atol=1e-6)
    assert os.path.exists(tmp_path / ("wall" + evaluate.ANNOTATED))
    # a folder run again leaves the annotated pictures out
    assert list(evaluate.image_files([str(tmp_path)])) == [path, str(plain)]  # not wall.faces.png


def test_missing_opencv_says_what_to_install(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    photo, crop = tmp_path / "photo.jpg", tmp_path / "crop.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(photo)
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 48), dtype=np.uint8)).save(crop)
    with pytest.raises(SystemExit) as e:
        evaluate.main([checkpoint, "--images", str(photo), "--detect", "on"])
    assert str(e.value.code) == ("eval.py: --detect on: finding faces in photos needs OpenCV: "
                                 "pip install 'opencv-python-headless<5'")
    # auto: one line on stderr, and every image classified whole, exactly as with --detect off
    probs = evaluate.main([checkpoint, "--images", str(photo), str(crop), "--tta", "none"])
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"eval.py: 1 image(s) larger than a face crop (first: {photo}) were classified "
                                    "whole: finding faces in photos needs OpenCV: pip install 'opencv-python-headless<5'")
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["file", "top", *data.CLASS_NAMES] and len(lines) == 3
    assert [line.split()[0] for line in lines[1:]] == [str(photo), str(crop)]
    ref = evaluate.main([checkpoint, "--images", str(photo), str(crop), "--tta", "none", "--detect", "off"])
    torch.testing.assert_close(probs, ref, rtol=0, atol=0)
    assert capsys.readouterr().err == "" and sorted(os.listdir(tmp_path)) == ["crop.png", "photo.jpg"]


def test_opencv_without_haar_cascades(checkpoint, tmp_path, monkeypatch):
    """opencv-python 5 has no CascadeClassifier: the message says which version to install."""
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit, match=re.escape("OpenCV 5.0.0 has no Haar face detector: "
                                                   "pip install 'opencv-python-headless<5'")):
        evaluate.main([checkpoint, "--images", str(tmp_path / "photo.png"), "--detect", "on"])
