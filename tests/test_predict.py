"""predict.py: the probabilities of image files of any size/mode (equal to EmoNeXt.predict on the same pictures as
arrays), folders, clear errors; photos: faces found by OpenCV's Haar cascade in a synthetic scene (real FER2013 faces
pasted, upscaled, at known places into a larger noisy canvas), one line per face, the annotated PNG, face crops
beside photos, --detect auto/on/off, and the one-line message when OpenCV is missing (simulated) or has no cascade;
and the script run end to end. The model is conftest's `shaken` atto (different faces get clearly different
probabilities without training). The scene needs ../shared/data/fer2013.npz and opencv-python-headless<5; the
missing-OpenCV tests need neither."""
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import emonext
import predict
import synthetic
from conftest import FER2013_NPZ, ROOT
from emonext import FER2013_CLASS_NAMES, EmoNeXt

K = len(FER2013_CLASS_NAMES)
# PrivateTest faces the cascade finds when pasted at 96-128 px (it finds about 3 in 4 of FER2013's faces so)
PASTED = [(0, 40, 60, 96), (11, 150, 210, 112), (6, 300, 40, 128)]  # (face index, x, y, side), left to right


@pytest.fixture(scope="module")
def checkpoint(shaken, tmp_path_factory):
    """conftest's shaken atto saved as train.py saves its checkpoints."""
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    torch.save({"config": emonext.config_dict(shaken), "model": shaken.state_dict()}, path)
    return str(path)


def test_predict_py_equals_predict_on_files_of_any_size(shaken, checkpoint, faces, tmp_path, capsys):
    """The arrays a user holds vs the same pictures as files through `predict.py --tta none`."""
    rng = np.random.default_rng(1)
    face = faces[0].numpy()
    pictures = [face,                                                       # a FER2013-sized grey face
                np.array(Image.fromarray(face).resize((150, 150), Image.BILINEAR)),  # a bigger one
                np.stack([face, np.roll(face, 3, 1), face[::-1]], -1),   # RGB, channels differ
                rng.integers(0, 256, (70, 130, 3), dtype=np.uint8),       # wide RGB: its centre square
                rng.integers(0, 256, (33, 21), dtype=np.uint8)]           # small, tall: upscaled
    files = []
    for i, pic in enumerate(pictures):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pic).save(files[-1])
    from_files = predict.main([checkpoint, *files, "--tta", "none", "--detect", "off"])
    capsys.readouterr()
    torch.testing.assert_close(shaken.predict(pictures), from_files, rtol=0, atol=1e-6)


def test_images_of_any_size_and_mode(shaken, checkpoint, faces, capsys, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "faces"
    folder.mkdir()
    files = []

    def save(name, im):
        path = folder / name if name.startswith("in_dir") else tmp_path / name
        im.save(path)
        return str(path)
    files.append(save("rgb_100x60.jpg", Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))))
    files.append(save("rgba_30x50.png", Image.fromarray(rng.integers(0, 256, (50, 30, 4), dtype=np.uint8))))
    face = faces[0].numpy()
    files.append(save("grey_48.png", Image.fromarray(face)))
    files.append(save("palette.gif", Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).convert("P")))
    files.append(save("bits.bmp", Image.fromarray(rng.integers(0, 2, (40, 52), dtype=np.uint8) * 255).convert("1")))
    in_dir = [save("in_dir_b.png", Image.fromarray(face[::-1].copy())),
              save("in_dir_a.tif", Image.fromarray(rng.integers(0, 65535, (33, 47), dtype=np.uint16)))]
    (folder / "notes.txt").write_text("not an image")
    probs = predict.main([checkpoint, *files, str(folder)])
    out = capsys.readouterr().out
    expected = files + sorted(in_dir)  # folders are listed in name order, non-images left out
    assert probs.shape == (len(expected), K)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(expected)), rtol=0, atol=1e-5)
    assert (probs > 0).all()
    lines = out.strip().splitlines()
    assert lines[0].split() == ["file", "top", *FER2013_CLASS_NAMES]
    assert len(lines) == 1 + len(expected)
    for line, path, p in zip(lines[1:], expected, probs):
        fields = line.split()
        assert fields[0] == path and fields[1] == FER2013_CLASS_NAMES[p.argmax()]
        values = [float(v) for v in fields[2:]]
        assert len(values) == K and sum(values) == pytest.approx(1.0, abs=4e-3)
        assert values == pytest.approx(p.tolist(), abs=5e-4)
    # a 48x48 grey face is preprocessed exactly like the test split, ten-crop by default
    ref = shaken.predict_logits(torch.from_numpy(face)[None], "tencrop").softmax(-1)[0]
    torch.testing.assert_close(probs[2], ref, rtol=0, atol=1e-6)


def test_images_errors(checkpoint, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SystemExit) as e:
        predict.main([checkpoint, str(bad)])
    assert str(e.value.code).startswith("predict.py: ") and "broken.jpg: not a readable image" in str(e.value.code)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="predict.py: no image files in"):
        predict.main([checkpoint, str(empty)])
    with pytest.raises(SystemExit, match="missing.png: no such file"):
        predict.main([checkpoint, str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match="^predict.py: checkpoint not found: .*nothing.pt"):
        predict.main([str(tmp_path / "nothing.pt"), str(bad)])


def test_predict_py_end_to_end_on_a_crop(tmp_path):
    """`python predict.py` as a user runs it on the shipped weights: a header, then one line per file."""
    crops = [str(tmp_path / f"face{i}.png") for i in range(2)]
    for i, face in enumerate(synthetic.synthetic_faces(n_train=2, n_val=0, n_test=0, seed=6)["train"][0]):
        Image.fromarray(face.numpy()).save(crops[i])
    weights = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), weights, *crops, "--tta", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["file", "top", *FER2013_CLASS_NAMES] and len(lines) == 1 + len(crops)
    shipped = EmoNeXt.from_checkpoint(weights)
    for line, crop in zip(lines[1:], crops):
        file, top, *probs = line.split()
        expected = shipped.predict(np.array(Image.open(crop)))[0]
        assert file == crop and top == FER2013_CLASS_NAMES[expected.argmax()]
        assert [float(p) for p in probs] == pytest.approx(expected.tolist(), abs=5e-4)


# -----------------------------------------------------------------------------
# faces in photos

@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """An untrained atto (the boxes do not depend on the weights), saved as train.py saves its checkpoints."""
    torch.manual_seed(0)
    m = EmoNeXt.from_size("atto", img_size=64, in_chans=1)
    path = tmp_path_factory.mktemp("detect") / "model.pt"
    torch.save({"config": emonext.config_dict(m), "model": m.state_dict()}, path)
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
    """(file, (x, y, w, h), top, probabilities) of each face line of predict.py with boxes."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["file", "box", "top", *FER2013_CLASS_NAMES]
    rows = []
    for line in lines[1:]:
        if line.startswith("faces drawn: "):
            continue
        f, box, top, *probs = line.split()
        rows.append((f, tuple(int(v) for v in box.split(",")), top, [float(p) for p in probs]))
    return rows


def test_faces_found_at_their_places_one_line_each_and_drawn(haar, untrained, scene, tmp_path, capsys):
    path, grey = scene
    crop = tmp_path / "crop.png"  # a face crop beside the photo: one whole face, as without detection
    Image.fromarray(grey[60:156, 40:136]).resize((48, 48)).save(crop)
    out_dir = tmp_path / "drawn"
    probs = predict.main([untrained, path, str(crop), "--tta", "none", "--out-dir", str(out_dir)])
    out = capsys.readouterr().out
    rows = face_lines(out)
    assert len(rows) == len(PASTED) + 1 and probs.shape == (len(PASTED) + 1, K)
    model = EmoNeXt.from_checkpoint(untrained)
    for (f, (x, y, w, h), top, p), (_, px, py, side), pr in zip(rows, PASTED, probs):
        assert f == path and w == h
        assert abs(x + w / 2 - (px + side / 2)) < 0.15 * side and abs(y + h / 2 - (py + side / 2)) < 0.15 * side
        assert 0.8 < w / side < 1.25
        # each box's face is classified as predict() classifies that crop of the photo
        torch.testing.assert_close(pr[None], model.predict(grey[y:y + h, x:x + w]), rtol=0, atol=1e-6)
        assert top == FER2013_CLASS_NAMES[pr.argmax()] and p == pytest.approx(pr.tolist(), abs=5e-4)
    assert rows[-1][:2] == (str(crop), (0, 0, 48, 48))
    ref = predict.main([untrained, str(crop), "--tta", "none", "--detect", "off"])
    torch.testing.assert_close(probs[-1:], ref, rtol=0, atol=1e-6)

    drawn = out_dir / ("scene" + predict.ANNOTATED)  # only the photo is drawn, in --out-dir
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


def test_detect_on_off_and_no_face(haar, untrained, scene, tmp_path, capsys):
    path, grey = scene
    whole = predict.main([untrained, path, "--tta", "none", "--detect", "off"])
    out = capsys.readouterr().out
    assert whole.shape == (1, K) and out.splitlines()[0].split() == ["file", "top", *FER2013_CLASS_NAMES]
    assert not os.path.exists(path.replace(".png", predict.ANNOTATED))
    # a plain picture: searched (--detect on), nothing found, classified whole and said so; drawn beside it
    plain = tmp_path / "wall.png"
    Image.fromarray(np.tile(np.linspace(60, 200, 300).astype(np.uint8), (200, 1))).save(plain)
    probs = predict.main([untrained, str(plain), "--detect", "on", "--tta", "none"])
    captured = capsys.readouterr()
    assert f"predict.py: {plain}: no face found; classified the whole image" in captured.err
    assert [row[:2] for row in face_lines(captured.out)] == [(str(plain), (0, 0, 300, 200))]
    torch.testing.assert_close(probs, predict.main([untrained, str(plain), "--tta", "none", "--detect", "off"]),
                               rtol=0, atol=1e-6)
    assert os.path.exists(tmp_path / ("wall" + predict.ANNOTATED))
    # a folder run again leaves the annotated pictures out
    assert list(predict.image_files([str(tmp_path)])) == [path, str(plain)]  # not wall.faces.png


def test_missing_opencv_says_what_to_install(untrained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    photo, crop = tmp_path / "photo.jpg", tmp_path / "crop.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(photo)
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 48), dtype=np.uint8)).save(crop)
    with pytest.raises(SystemExit) as e:
        predict.main([untrained, str(photo), "--detect", "on"])
    assert str(e.value.code) == ("predict.py: --detect on: finding faces in photos needs OpenCV: "
                                 "pip install 'opencv-python-headless<5'")
    # auto: one line on stderr, and every image classified whole, exactly as with --detect off
    probs = predict.main([untrained, str(photo), str(crop), "--tta", "none"])
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"predict.py: 1 image(s) larger than a face crop (first: {photo}) were "
                                    "classified whole: finding faces in photos needs OpenCV: "
                                    "pip install 'opencv-python-headless<5'")
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["file", "top", *FER2013_CLASS_NAMES] and len(lines) == 3
    assert [line.split()[0] for line in lines[1:]] == [str(photo), str(crop)]
    ref = predict.main([untrained, str(photo), str(crop), "--tta", "none", "--detect", "off"])
    torch.testing.assert_close(probs, ref, rtol=0, atol=0)
    assert capsys.readouterr().err == "" and sorted(os.listdir(tmp_path)) == ["crop.png", "photo.jpg"]


def test_opencv_without_haar_cascades(untrained, tmp_path, monkeypatch):
    """opencv-python 5 has no CascadeClassifier: the message says which version to install."""
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit, match=re.escape("OpenCV 5.0.0 has no Haar face detector: "
                                                   "pip install 'opencv-python-headless<5'")):
        predict.main([untrained, str(tmp_path / "photo.png"), "--detect", "on"])
