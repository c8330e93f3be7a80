"""EmoNeXt.predict and the input transform it shares with eval.py (emonext.grey_faces, emonext.preprocess): equal
to eval.py's plain predictions, every input form it takes, RGB -> grey as PIL's convert("L"), clear errors, and
the normalisation constants carried by the config. The model is an untrained atto whose weights are shaken so
that different faces get clearly different probabilities (no training needed to compare two paths)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import emonext
import eval as evaluate
import synthetic
from emonext import EmoNeXt

K = len(data.CLASS_NAMES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EmoNeXt.from_size("atto", img_size=64, in_chans=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def faces():
    return synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=4)["train"][0]  # uint8 (12, 48, 48)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    torch.save({"config": emonext.config_dict(model), "model": model.state_dict(),
                "class_names": list(data.CLASS_NAMES)}, path)
    return str(path)


def test_predict_equals_eval_plain_predictions(model, faces):
    probs = model.predict(faces)
    ref = evaluate.predict(model, faces, 64, "none").softmax(-1)  # eval.py's path for a data split, tta none
    assert probs.shape == (12, K) and probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-6)
    assert probs.argmax(1).unique().numel() > 1 and probs.max() > 0.5  # the faces really get different answers
    torch.testing.assert_close(model.predict(faces, batch_size=5), probs, rtol=0, atol=1e-5)  # other batches


def test_predict_equals_eval_images_on_files_of_any_size(model, checkpoint, faces, tmp_path, capsys):
    """The arrays a user holds vs the same pictures as files through `eval.py --images --tta none`."""
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
    from_files = evaluate.main([checkpoint, "--images", *files, "--tta", "none", "--detect", "off"])
    capsys.readouterr()
    torch.testing.assert_close(model.predict(pictures), from_files, rtol=0, atol=1e-6)


def test_predict_input_forms(model, faces):
    ref = model.predict(faces[:3])
    torch.testing.assert_close(model.predict(faces[0]), ref[:1], rtol=0, atol=1e-6)  # (H, W): one face
    torch.testing.assert_close(model.predict(faces[:3].numpy()), ref, rtol=0, atol=1e-6)  # numpy
    read_only = faces[:3].numpy().copy()
    read_only.setflags(write=False)
    torch.testing.assert_close(model.predict(read_only), ref, rtol=0, atol=1e-6)
    rgb = faces[:3, :, :, None].expand(-1, -1, -1, 3)  # grey stored as RGB: the same faces
    torch.testing.assert_close(model.predict(rgb), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.predict(rgb[1]), ref[1:2], rtol=0, atol=1e-6)  # (H, W, 3): one face
    mixed = [faces[0], np.zeros((90, 60, 3), np.uint8), faces[1:3].numpy()]  # a list: faces of any sizes
    out = model.predict(mixed)
    assert out.shape == (4, K)
    torch.testing.assert_close(out[[0, 2, 3]], ref[:3], rtol=0, atol=1e-5)  # batched otherwise
    torch.testing.assert_close(out[1:2], model.predict(np.zeros((90, 60), np.uint8)), rtol=0, atol=1e-6)
    assert model.predict(faces[:0]).shape == (0, K) and model.predict([]).shape == (0, K)
    model.train()
    torch.testing.assert_close(model.predict(faces[:3]), ref, rtol=0, atol=1e-6)  # eval mode inside (BatchNorm)
    assert model.training  # and the caller's mode is back
    model.eval()


def test_predict_errors(model):
    with pytest.raises(ValueError, match="uint8 grey levels 0..255, got torch.float32"):
        model.predict(torch.rand(2, 48, 48))
    with pytest.raises(ValueError, match="got torch.int64"):
        model.predict(np.zeros((48, 48), dtype=np.int64))
    for shape in [(48,), (2, 1, 48, 48), (2, 2, 48, 48, 3), (0, 48), (3, 0, 48)]:
        with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\) grey or .* RGB, got shape"):
            model.predict(torch.zeros(shape, dtype=torch.uint8))
    model.train()
    with pytest.raises(ValueError, match="got torch.float32"):  # the second face of a list is bad
        model.predict([np.zeros((48, 48), np.uint8), np.zeros((48, 48), np.float32)])
    assert model.training  # the caller's mode is back after the error too
    model.eval()
    for shape in [(48, 48, 4), (2, 48, 48, 4)]:  # not H faces 4 pixels wide
        with pytest.raises(ValueError, match=r"look RGBA: pass faces\[\.\.\., :3\]"):
            model.predict(np.zeros(shape, np.uint8))


def test_grey_faces_rgb_as_pil_and_centre_square():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    assert torch.equal(emonext.grey_faces(rgb), torch.from_numpy(pil))  # ITU-R 601-2 in PIL's fixed point
    face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    wide = np.pad(face, ((0, 0), (30, 31)), constant_values=255)  # (48, 109): bars left and right
    tall = np.pad(face, ((20, 21), (0, 0)), constant_values=0)
    for im in (face, wide, tall):
        assert torch.equal(emonext.grey_faces(im), torch.from_numpy(face)[None])
    # other sizes: resized to 48 like PIL's bilinear resize of the square (what data.load_image did before)
    smooth = np.array(Image.fromarray(face).resize((150, 150), Image.BICUBIC))
    pil48 = np.asarray(Image.fromarray(smooth).resize((48, 48), Image.BILINEAR)).astype(int)
    assert np.abs(emonext.grey_faces(smooth)[0].numpy().astype(int) - pil48).max() <= 1
    up = emonext.grey_faces(np.full((20, 20), 77, np.uint8))
    assert up.shape == (1, 48, 48) and up.dtype == torch.uint8 and (up == 77).all()


def test_one_preprocess_and_the_constants_in_the_config(model, faces):
    assert (data.MEAN, data.STD) == (emonext.FER2013_MEAN, emonext.FER2013_STD) == (0.5077, 0.2551)
    assert torch.equal(data.preprocess(faces, 64), emonext.preprocess(faces, 64))
    config = emonext.config_dict(model)
    assert (config["pixel_mean"], config["pixel_std"]) == (0.5077, 0.2551)
    old = {k: v for k, v in config.items() if k not in ("pixel_mean", "pixel_std")}  # a checkpoint from before
    loaded = EmoNeXt.from_checkpoint({"config": old, "model": model.state_dict()})
    assert (loaded.config.pixel_mean, loaded.config.pixel_std) == (0.5077, 0.2551)
    torch.testing.assert_close(loaded.predict(faces), model.predict(faces), rtol=0, atol=0)
    # a model trained with other constants carries them: predict normalises with the config's, nothing else
    other = EmoNeXt.from_checkpoint({"config": {**config, "pixel_mean": 0.3, "pixel_std": 0.2},
                                     "model": model.state_dict()}).eval()
    with torch.no_grad():
        x = torch.nn.functional.interpolate(faces[:, None].float() / 255, size=(64, 64), mode="bilinear",
                                            align_corners=False)
        ref = other((x - 0.3) / 0.2).softmax(-1)
    torch.testing.assert_close(other.predict(faces), ref, rtol=0, atol=1e-6)
    assert not torch.allclose(other.predict(faces), model.predict(faces), atol=1e-3)


def test_predict_from_a_copied_emonext_alone(model, checkpoint, faces, tmp_path):
    """emonext.py copied alone into an empty folder, with the checkpoint: the same probabilities, no data.py."""
    shutil.copy(os.path.join(os.path.dirname(data.__file__), "emonext.py"), tmp_path / "emonext.py")
    rgb = np.stack([faces[0].numpy(), faces[1].numpy(), faces[2].numpy()], -1)
    np.save(tmp_path / "faces.npy", rgb)
    script = ("import numpy, torch, emonext, sys; assert 'data' not in sys.modules; "
              f"m = emonext.EmoNeXt.from_checkpoint({checkpoint!r}); "
              "torch.save(m.predict(numpy.load('faces.npy')), 'probs.pt')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "probs.pt", weights_only=True), model.predict(rgb),
                               rtol=0, atol=1e-6)
