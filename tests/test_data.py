"""data.py: the FER2013 readers (Kaggle's csv files, image folders, .npz), their errors,
the default data and load_dataset, batches and the batched augmentation (its warp moves a dot where its pose says),
the real ../shared/data/fer2013.npz when it is there; and FER+ (issue 10): the vote loaders and their joins to
FER2013, the label modes, and the real fer2013new.csv."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import emonext
import synthetic
from conftest import FER2013_NPZ, FERPLUS_HEADER, check_splits, random_faces

USAGES = ["Training", "Training", "Training", "PublicTest", "PrivateTest", "PrivateTest"]


def pixel_string(face):
    return " ".join(map(str, face.ravel().tolist()))


def write_csv(path, header, rows):
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def fer_csv(tmp_path, rows=None):
    """A fer2013.csv in Kaggle's layout; `rows` replaces its data lines."""
    x = random_faces(len(USAGES))
    y = np.arange(len(USAGES)) % 7
    default = [f"{c},{pixel_string(f)},{u}" for c, f, u in zip(y, x, USAGES)]
    return write_csv(tmp_path / "fer2013.csv", "emotion,pixels,Usage", default if rows is None else rows), x, y


def assert_error_of(fn, where, *args, **kwargs):
    """fn(*args, **kwargs) raises one ValueError whose message starts with the file (and line) it is about."""
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert str(e.value).startswith(str(where)), str(e.value)
    return str(e.value)


def assert_error(path, where, **kwargs):
    """The loader raises one ValueError whose message names the file and the place in it."""
    return assert_error_of(data.load_fer2013, where, path, **kwargs)

# -----------------------------------------------------------------------------
# csv files


def test_fer2013_csv(tmp_path):
    path, x, y = fer_csv(tmp_path)
    splits = data.load_fer2013(path)
    check_splits(splits, (3, 1, 2))
    assert torch.equal(splits["train"][0], torch.from_numpy(x[:3]))
    assert torch.equal(splits["val"][0], torch.from_numpy(x[3:4]))
    assert torch.equal(splits["test"][0], torch.from_numpy(x[4:]))
    assert splits["test"][1].tolist() == y[4:].tolist()


def test_icml_csv_other_order_and_spaced_names(tmp_path):
    x = random_faces(3)
    rows = [f'{c},{u},"{pixel_string(f)}"' for c, f, u in zip((3, 0, 6), x, ("Training", "PublicTest", "PrivateTest"))]
    splits = data.load_fer2013(write_csv(tmp_path / "icml_face_data.csv", "emotion, Usage, pixels", rows))
    check_splits(splits, (1, 1, 1))
    assert [splits[s][1].item() for s in ("train", "val", "test")] == [3, 0, 6]
    assert torch.equal(splits["val"][0][0], torch.from_numpy(x[1]))


def test_competition_train_csv_is_all_train(tmp_path):
    rows = [f"{c},{pixel_string(f)}" for c, f in zip((1, 2, 5), random_faces(3))]
    check_splits(data.load_fer2013(write_csv(tmp_path / "train.csv", "emotion,pixels", rows)), (3, 0, 0))


def test_competition_test_csv_is_refused(tmp_path):
    path = write_csv(tmp_path / "test.csv", "pixels", [pixel_string(f) for f in random_faces(2)])
    assert "unlabelled" in assert_error(path, path)


@pytest.mark.parametrize("row, reason", [
    ("3,{pixels} 7,Training", "2305 values"),
    ("3,{short},Training", "2303 values"),
    ("3,{pixels_256},Training", "0..256"),
    ("3,{pixels_neg},Training", "-1.."),
    ("3,{pixels_text},Training", "other text"),
    ("3,{pixels} x,Training", "other text"),  # 2304 good numbers, then text
    ("3,,Training", "0 values"),
    ("7,{pixels},Training", "label '7'"),
    ("x,{pixels},Training", "label 'x'"),
    ("3,{pixels},Train", "Usage 'Train'"),
    ("3,{pixels}", "expected 3 fields, got 2"),
])
def test_bad_csv_row_names_file_and_line(tmp_path, row, reason):
    face = random_faces(1)[0]
    good = pixel_string(face)
    row = row.format(pixels=good, short=good.rsplit(" ", 1)[0], pixels_256="256" + good[good.index(" "):],
                     pixels_neg="-1" + good[good.index(" "):], pixels_text=good.replace(" ", " a", 1))
    path, _, _ = fer_csv(tmp_path, [f"0,{good},Training", row, f"1,{good},PublicTest"])
    assert reason in assert_error(path, f"{path}, line 3:")


def test_bad_csv_files(tmp_path):
    assert_error(tmp_path / "missing.csv", tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty" in assert_error(empty, empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    assert "empty" in assert_error(blank, blank)
    header_only = write_csv(tmp_path / "header.csv", "emotion,pixels,Usage", [])
    assert "no data rows" in assert_error(header_only, header_only)
    no_pixels = write_csv(tmp_path / "nopixels.csv", "emotion,Usage", ["0,Training"])
    assert "missing column 'pixels'" in assert_error(no_pixels, f"{no_pixels}, line 1:")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_error(binary, binary)


def test_skip_bad_rows_counts(tmp_path, capsys):
    good = pixel_string(random_faces(1)[0])
    rows = [f"0,{good},Training", f"9,{good},Training", f"1,{good},PublicTest", "2,1 2 3,Training",
            f"3,{good},PrivateTest"]
    path, _, _ = fer_csv(tmp_path, rows)
    assert "1 more bad rows" in assert_error(path, f"{path}, line 3:")
    splits = data.load_fer2013(path, skip_bad_rows=True)
    check_splits(splits, (1, 1, 1))
    assert "skipped 2 bad rows" in capsys.readouterr().out
    all_bad, _, _ = fer_csv(tmp_path, [f"9,{good},Training"])
    assert_error(all_bad, all_bad, skip_bad_rows=True)


def test_unparsed_pixel_text_is_an_error_where_numpy_only_warns(tmp_path, monkeypatch):
    """numpy 1.18 to 2.2 warn on text np.fromstring cannot parse and return the numbers before it; a row whose
    2304 numbers are followed by text then looks complete. Emulate that numpy: the row must still be refused."""
    def warn_only_fromstring(text, dtype, sep):
        numbers = []
        for token in text.split():
            if not token.lstrip("-").isdigit():
                warnings.warn("string or file could not be read to its end due to unmatched data; this will raise a "
                              "ValueError in the future.", DeprecationWarning, stacklevel=2)
                break
            numbers.append(int(token))
        return np.array(numbers, dtype=dtype)
    monkeypatch.setattr(np, "fromstring", warn_only_fromstring)
    good = pixel_string(random_faces(1)[0])
    path, _, _ = fer_csv(tmp_path, [f"0,{good},Training", f"1,{good} 7x,Training", f"2,{good},PublicTest"])
    assert "other text" in assert_error(path, f"{path}, line 3:")
    check_splits(data.load_fer2013(path, skip_bad_rows=True), (1, 1, 0))  # the good rows still parse

# -----------------------------------------------------------------------------
# image folders, npz, single images


def save_image(path, size=(48, 48), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_image_folders_with_public_private_prefixes(tmp_path):
    save_image(tmp_path / "train" / "happy" / "Training_1.jpg")
    save_image(tmp_path / "train" / "angry" / "Training_2.png", size=(100, 60), mode="RGB", value=200)
    save_image(tmp_path / "train" / "angry" / "Training_3.png", size=(30, 30), mode="RGB")
    (tmp_path / "train" / "angry" / "notes.txt").write_text("not an image, ignored")
    save_image(tmp_path / "test" / "sad" / "PublicTest_1.jpg")
    save_image(tmp_path / "test" / "neutral" / "PrivateTest_1.jpg")
    save_image(tmp_path / "test" / "neutral" / "PrivateTest_2.jpg")
    splits = data.load_fer2013(tmp_path)
    check_splits(splits, (3, 1, 2))
    assert splits["train"][1].tolist() == [0, 0, 3]  # class folders in FER2013 order, files sorted
    assert splits["train"][0][0].float().mean().item() == pytest.approx(200, abs=1)
    assert splits["val"][1].tolist() == [4] and splits["test"][1].tolist() == [6, 6]


def test_image_folders_with_val_folder(tmp_path):
    save_image(tmp_path / "train" / "fear" / "a.jpg")
    save_image(tmp_path / "val" / "surprise" / "b.jpg")
    save_image(tmp_path / "test" / "disgust" / "c.jpg")
    splits = data.load_fer2013(tmp_path)
    check_splits(splits, (1, 1, 1))
    assert [splits[s][1].item() for s in ("train", "val", "test")] == [2, 5, 1]


def test_bad_image_folders(tmp_path):
    assert "no train/" in assert_error(tmp_path, tmp_path)
    save_image(tmp_path / "train" / "happy" / "a.jpg")
    (tmp_path / "test" / "happy").mkdir(parents=True)
    assert "no images" in assert_error(tmp_path, tmp_path / "test")
    save_image(tmp_path / "test" / "joy" / "a.jpg")
    assert "unknown class folder 'joy'" in assert_error(tmp_path, tmp_path / "test" / "joy")
    (tmp_path / "test" / "joy" / "a.jpg").unlink()
    (tmp_path / "test" / "joy").rmdir()
    (tmp_path / "test" / "happy" / "broken.jpg").write_text("not a jpeg")
    assert "not a readable image" in assert_error(tmp_path, tmp_path / "test" / "happy" / "broken.jpg")


def save_npz(path, **splits):
    arrays = {}
    for prefix, n in splits.items():
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = random_faces(n), (np.arange(n) % 7).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_npz(tmp_path):
    check_splits(data.load_fer2013(save_npz(tmp_path / "a.npz", train=5, public_test=2, private_test=3)), (5, 2, 3))
    check_splits(data.load_fer2013(save_npz(tmp_path / "b.npz", test=4)), (0, 0, 4))  # public + private as test


def test_bad_npz(tmp_path):
    bad = save_npz(tmp_path / "labels.npz", train=3)
    arrays = dict(np.load(bad))
    arrays["train_y"][2] = 7
    np.savez(bad, **arrays)
    assert "train_y row 2" in assert_error(bad, bad)
    other = tmp_path / "other.npz"
    np.savez(other, votes=np.zeros(3))
    assert "none of the arrays" in assert_error(other, other)
    half = tmp_path / "half.npz"
    np.savez(half, train_x=random_faces(2))
    assert_error(half, half)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK not really a zip")
    assert "not a readable .npz" in assert_error(garbage, garbage)


# -----------------------------------------------------------------------------
# the default data and load_dataset


def test_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ROOT", str(tmp_path))
    assert data.find_default_data() == "synthetic"
    (tmp_path / "data").mkdir()
    path = save_npz(tmp_path / "data" / "fer2013.npz", train=7, public_test=2, private_test=3)
    assert data.find_default_data() == str(path)
    splits, description = data.load_dataset(None)
    check_splits(splits, (7, 2, 3))
    assert str(path) in description and "\n" not in description

# -----------------------------------------------------------------------------
# batches and augmentation


def test_augment_shape_determinism_and_identity():
    x = torch.from_numpy(random_faces(8))
    out = data.augment(x, 64, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, data.augment(x, 64, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(out, data.augment(x, 64, generator=torch.Generator().manual_seed(1)))
    # with every random transform off, the warp is the eval path's plain resize
    plain = data.augment(x, 64, rotate=0, scale=(1, 1), translate=0, hflip=False)
    assert torch.allclose(plain, emonext.preprocess(x, 64), atol=1e-5)
    other = data.augment(x, 64, rotate=0, scale=(1, 1), translate=0, hflip=False, mean=0.3, std=0.2)
    assert torch.allclose(other, emonext.preprocess(x, 64, 0.3, 0.2), atol=1e-4)  # another normalisation
    # flips only: each sample is the image or its mirror, and both occur
    flipped = data.augment(x, 48, generator=torch.Generator().manual_seed(0), rotate=0, scale=(1, 1), translate=0)
    ref = emonext.preprocess(x, 48)
    mirrored = torch.tensor([torch.allclose(f, r.flip(-1), atol=1e-5) for f, r in zip(flipped, ref)])
    unchanged = torch.tensor([torch.allclose(f, r, atol=1e-5) for f, r in zip(flipped, ref)])
    assert (mirrored | unchanged).all() and mirrored.any() and unchanged.any()


def test_augment_draws_the_whole_batch_for_any_split():
    x = synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=0)["train"][0]
    whole = data.augment(x, 32, torch.Generator().manual_seed(5))
    parts = [data.augment(x[i:i + 4], 32, torch.Generator().manual_seed(5), rows=(i, 12)) for i in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[1], data.augment(x[4:8], 32, torch.Generator().manual_seed(5)))


def marker(cx, cy, sigma=1.0):
    """uint8 (48, 48): black with one bright Gaussian dot centred on pixel (cx, cy) (x right, y down)."""
    yy, xx = np.mgrid[:48, :48]
    return torch.from_numpy(np.round(255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))).astype(np.uint8))


def dot_centre(img, near, radius):
    """Centroid (x, y) of the brightness of a normalised (S, S) image within `radius` of `near`, and its mass."""
    grey = (img * emonext.FER2013_STD + emonext.FER2013_MEAN).clamp(min=0).double()
    yy, xx = torch.meshgrid(torch.arange(grey.shape[0]), torch.arange(grey.shape[1]), indexing="ij")
    w = grey * ((xx - near[0]) ** 2 + (yy - near[1]) ** 2 <= radius ** 2)
    return ((w * xx).sum() / w.sum()).item(), ((w * yy).sum() / w.sum()).item(), w.sum().item()


def where_the_dot_goes(cx, cy, size, angle=0.0, zoom=1.0, shift=(0.0, 0.0), flip_x=1.0, flip_y=1.0):
    """The documented pose, by hand: mirror, move by shift * 48 px, turn counter-clockwise on screen by angle and
    scale by zoom about the centre, then resize 48 -> size."""
    x, y = flip_x * (cx - 23.5) + shift[0] * 48, flip_y * (cy - 23.5) + shift[1] * 48
    c, s = math.cos(angle), math.sin(angle)
    x, y = zoom * (c * x + s * y), zoom * (-s * x + c * y)  # y points down: counter-clockwise on screen
    k = size / 48
    return (size - 1) / 2 + k * x, (size - 1) / 2 + k * y


def one_pose(**kw):
    pose = {**dict(angle=0.0, zoom=1.0, shift=(0.0, 0.0), flip_x=1.0, flip_y=1.0), **kw}
    return {k: torch.tensor([v], dtype=torch.float32) for k, v in pose.items()}  # a batch of one


@pytest.mark.parametrize("size", (48, 64))
@pytest.mark.parametrize("pose, moved_to", [
    (dict(), (33.0, 18.0)),  # identity
    (dict(angle=math.radians(90)), (18.0, 14.0)),  # a quarter turn counter-clockwise: right of centre -> above it
    (dict(angle=math.radians(-30)), None),
    (dict(zoom=1.5), (37.75, 15.25)),  # 1.5 x farther from the centre
    (dict(zoom=0.8), (31.1, 19.1)),
    (dict(shift=(0.1, -0.05)), (37.8, 15.6)),  # 0.1 and 0.05 of the 48 px side
    (dict(flip_x=-1.0), (14.0, 18.0)),
    (dict(flip_y=-1.0), (33.0, 29.0)),
    (dict(angle=math.radians(15), zoom=1.2, shift=(-0.08, 0.06), flip_x=-1.0, flip_y=-1.0), None),
])
def test_warp_moves_a_dot_where_its_pose_says(size, pose, moved_to):
    x = marker(33.0, 18.0)[None]  # 9.5 px right of the centre (23.5), 5.5 px above it
    expected = where_the_dot_goes(33.0, 18.0, size, **pose)
    if moved_to is not None and size == 48:
        assert expected == pytest.approx(moved_to, abs=1e-9)  # the hand formula against hand-worked numbers
    out = data.warp(x, size, **one_pose(**pose))[0, 0]
    cx, cy, mass = dot_centre(out, expected, radius=6 * size / 48)
    assert (cx, cy) == pytest.approx(expected, abs=0.1 * size / 48)
    ref_mass = dot_centre(emonext.preprocess(x, size)[0, 0], where_the_dot_goes(33.0, 18.0, size), 6 * size / 48)[2]
    assert mass == pytest.approx(ref_mass * pose.get("zoom", 1.0) ** 2, rel=0.1)  # the whole dot, its area zoomed


def test_random_pose_ranges_and_augment_is_its_warp():
    b, gen = 4000, torch.Generator().manual_seed(0)
    pose = data.random_pose(b, gen, rotate=20, scale=(0.8, 1.2), translate=0.1, hflip=True, vflip=False)
    assert set(pose) == {"angle", "zoom", "shift", "flip_x", "flip_y"} and pose["shift"].shape == (b, 2)
    for name, lo, hi in (("angle", -math.radians(20), math.radians(20)), ("zoom", 0.8, 1.2), ("shift", -0.1, 0.1)):
        v = pose[name]
        assert lo <= v.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < v.max() <= hi, name
        assert v.mean().item() == pytest.approx((lo + hi) / 2, abs=0.02 * (hi - lo)), name
    assert (pose["flip_x"] == -1).double().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (pose["flip_y"] == 1).all()  # vflip off
    assert set(data.random_pose(64, gen, vflip=True)["flip_y"].tolist()) == {-1.0, 1.0}
    fixed = data.random_pose(64, gen, rotate=0, scale=(1, 1), translate=0, hflip=False)
    assert (fixed["angle"] == 0).all() and (fixed["zoom"] == 1).all() and (fixed["shift"] == 0).all()
    x = torch.from_numpy(random_faces(5))
    kw = dict(rotate=7, scale=(0.75, 1.25), translate=0.03, vflip=True)
    torch.testing.assert_close(data.augment(x, 64, torch.Generator().manual_seed(3), **kw),
                               data.warp(x, 64, **data.random_pose(5, torch.Generator().manual_seed(3), **kw)),
                               rtol=0, atol=0)


def test_random_pose_framing_draws_the_detector_crop_law_and_leaves_other_draws_alone():
    """framing=0 draws what random_pose always drew; framing=1 gives every face the zoom and shift of a crop whose
    side and centre follow DETECTOR_CROP (zoom = 1 / side, shift = minus the centre); 0.5 about half of them, the rest
    as without it; augment warps by exactly those poses."""
    b, kw = 20000, dict(rotate=10, scale=(0.9, 1.1), translate=0.05)
    before = data.random_pose(b, torch.Generator().manual_seed(4), **kw)
    off = data.random_pose(b, torch.Generator().manual_seed(4), **kw, framing=0.0)
    assert all(torch.equal(before[k], off[k]) for k in before)
    framed = data.random_pose(b, torch.Generator().manual_seed(4), **kw, framing=1.0)
    assert all(torch.equal(before[k], framed[k]) for k in ("angle", "flip_x", "flip_y"))
    side, centre = 1 / framed["zoom"], -framed["shift"]
    lo, hi = data.DETECTOR_CROP_SIDES
    assert lo <= side.min() and side.max() <= hi
    for v, (mean, sd) in ((side, data.DETECTOR_CROP["side"]), (centre[:, 0], data.DETECTOR_CROP["x"]),
                          (centre[:, 1], data.DETECTOR_CROP["y"])):
        assert v.mean().item() == pytest.approx(mean, abs=0.05 * sd + 1e-3)
        assert v.std().item() == pytest.approx(sd, rel=0.05)
    half = data.random_pose(b, torch.Generator().manual_seed(4), **kw, framing=0.5)
    kept = half["zoom"] == before["zoom"]
    assert kept.double().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(half["shift"][kept], before["shift"][kept])
    assert ((half["zoom"][~kept] - 1).abs() > 0).all() and (half["shift"][~kept].abs().amax(1) > 0).all()
    x = torch.from_numpy(random_faces(5))
    torch.testing.assert_close(data.augment(x, 48, torch.Generator().manual_seed(3), framing=0.7),
                               data.warp(x, 48, **data.random_pose(5, torch.Generator().manual_seed(3), framing=0.7)),
                               rtol=0, atol=0)


def test_augment_moves_dots_as_its_drawn_poses_say():
    """augment end to end: dots at known places, the official-size ranges, vertical flips on; each dot ends where
    the pose drawn from the same seed puts it."""
    spots = [(33.0, 18.0), (14.0, 30.0), (26.0, 13.0), (20.0, 33.0)] * 4
    x = torch.stack([marker(cx, cy) for cx, cy in spots])
    kw = dict(rotate=20, scale=(0.8, 1.2), translate=0.1, vflip=True)
    out = data.augment(x, 64, torch.Generator().manual_seed(7), **kw)
    pose = data.random_pose(len(x), torch.Generator().manual_seed(7), **kw)
    for i, (cx, cy) in enumerate(spots):
        p = {k: v[i].tolist() for k, v in pose.items()}
        expected = where_the_dot_goes(cx, cy, 64, **p)
        got = dot_centre(out[i, 0], expected, radius=8)
        assert got[:2] == pytest.approx(expected, abs=0.15), (i, p)
    assert {p for p in pose["flip_y"].tolist()} == {-1.0, 1.0} and {p for p in pose["flip_x"].tolist()} == {-1.0, 1.0}


# -----------------------------------------------------------------------------
# the real data


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FER2013_NPZ), reason="needs ../shared/data/fer2013.npz")
def test_real_fer2013_npz():
    splits = data.load_fer2013(FER2013_NPZ)
    check_splits(splits, (28709, 3589, 3589))
    counts = {name: torch.bincount(splits[name][1], minlength=7).tolist() for name in splits}
    assert counts == {"train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
                      "val": [467, 56, 496, 895, 653, 415, 607],
                      "test": [491, 55, 528, 879, 594, 416, 626]}
    mean = splits["train"][0].float().div(255)
    assert mean.mean().item() == pytest.approx(emonext.FER2013_MEAN, abs=1e-3)
    assert mean.std().item() == pytest.approx(emonext.FER2013_STD, abs=1e-3)


# =============================================================================
# FER+ (issue 10; was tests/test_ferplus.py): the vote loaders and their joins, the label modes, the real FER+ file
# =============================================================================

FERPLUS_CSV = os.path.join(os.path.dirname(FER2013_NPZ), "fer2013new.csv")
FERPLUS_USAGES = ["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 2
# one row per face of the fer2013.csv below; row 2 is a face FER+ dropped (no image name)
VOTES = np.array([[6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
                  [0, 8, 0, 0, 0, 0, 0, 0, 2, 0],
                  [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
                  [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],
                  [0, 0, 9, 0, 0, 0, 1, 0, 0, 0],
                  [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0, 7, 3, 0],
                  [2, 0, 0, 0, 0, 0, 0, 0, 8, 0]])
DROPPED = 2


def write_pair(tmp_path, votes=VOTES, usages=FERPLUS_USAGES, extra_lines=()):
    """A fer2013.csv of random faces and its fer2013.csv-ordered fer2013new.csv; returns (csv, new csv, faces)."""
    x = random_faces(len(usages))
    rows = [f"{i % 7},{' '.join(map(str, f.ravel().tolist()))},{u}" for i, (f, u) in enumerate(zip(x, usages))]
    fer = tmp_path / "fer2013.csv"
    fer.write_text("\n".join(["emotion,pixels,Usage"] + rows) + "\n")
    new = [f"{u},{'' if i == DROPPED else f'fer{i:07d}.png'},{','.join(map(str, v))}"
           for i, (u, v) in enumerate(zip(usages, votes))]
    ferplus = tmp_path / "fer2013new.csv"
    ferplus.write_text("\n".join([FERPLUS_HEADER] + new + list(extra_lines)) + "\n")
    return fer, ferplus, x


# -----------------------------------------------------------------------------
# loaders and joins


def test_csv_pair_loads_the_exact_votes(tmp_path):
    fer, ferplus, x = write_pair(tmp_path)
    splits = data.load_fer2013(fer, ferplus=ferplus)
    kept = {"train": [0, 1, 3], "val": [4, 5], "test": [6, 7]}  # row 2 (train) was dropped by FER+
    for name, rows in kept.items():
        sx, votes = splits[name]
        assert votes.dtype == torch.int64 and votes.shape == (len(rows), 10)
        assert torch.equal(votes, torch.from_numpy(VOTES[rows]))
        assert torch.equal(sx, torch.from_numpy(x[rows]))  # the pixels stay FER2013's, row for row


def test_npz_joins_by_csv_index(tmp_path):
    fer, ferplus, x = write_pair(tmp_path)
    # npz rows in another order than fer2013.csv (as the real one, sorted by class), one face of unknown row
    train_rows, test_rows = np.array([3, -1, 2, 0, 1]), np.array([7, 6])
    unknown = random_faces(1, seed=5)[0]
    train_x = np.stack([x[r] if r >= 0 else unknown for r in train_rows])
    npz = tmp_path / "faces.npz"
    np.savez(npz, train_x=train_x, train_y=np.zeros(5, np.int64), train_csv_index=train_rows.astype(np.int32),
             private_test_x=x[test_rows], private_test_y=np.zeros(2, np.int64), private_test_csv_index=test_rows)
    splits, description = data.load_dataset(str(npz), labels="ferplus-majority", ferplus=str(ferplus))
    votes = data.load_fer2013(npz, ferplus=ferplus)
    assert torch.equal(votes["train"][1], torch.from_numpy(VOTES[[3, 0, 1]]))
    assert torch.equal(votes["train"][0], torch.from_numpy(x[[3, 0, 1]]))
    assert torch.equal(votes["test"][1], torch.from_numpy(VOTES[[7, 6]]))
    assert votes["val"][1].shape == (0, 10)
    assert "train 1 + 1" in description and "test 0 + 0" in description  # 1 dropped by FER+, 1 of unknown row
    # majority labels: row 3 has none (4 of 9 remaining votes), row 7's winner is unknown
    assert splits["train"][1].tolist() == [0, 1] and splits["test"][1].tolist() == [7]


def test_load_dataset_label_modes_and_default_vote_file(tmp_path):
    fer, _, x = write_pair(tmp_path)  # fer2013new.csv lies beside fer2013.csv: found without ferplus=
    splits, description = data.load_dataset(str(fer), labels="ferplus-soft")
    train_x, train_y = splits["train"]
    assert train_y.dtype == torch.float32 and train_y.shape == (3, 8)
    assert torch.equal(train_x, torch.from_numpy(x[[0, 1, 3]]))
    assert torch.allclose(train_y.sum(1), torch.ones(3))
    # val and test keep the majority protocol whatever the training labels
    assert splits["val"][1].tolist() == [2] and splits["test"][1].tolist() == [7]
    assert "left out by the label rule: train 0 (soft), val 1 (majority), test 1 (majority)" in description
    assert description.endswith("train 3 / val 1 / test 1")
    assert data.class_names("ferplus-soft") == data.FERPLUS_CLASS_NAMES and len(data.FERPLUS_CLASS_NAMES) == 8
    assert data.class_names("fer2013") == emonext.FER2013_CLASS_NAMES


def test_ferplus_folder_tree(tmp_path):
    x = random_faces(5, seed=3)
    layout = {"FER2013Train": [0, 1, 2], "FER2013Test": [3, 4]}  # no FER2013Valid: an empty val split
    for folder, rows in layout.items():
        (tmp_path / folder).mkdir()
        lines = []
        for i in rows:
            Image.fromarray(x[i]).save(tmp_path / folder / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",{",".join(map(str, VOTES[i]))}')
        (tmp_path / folder / "label.csv").write_text("\n".join(lines) + "\n")
    splits = data.load_fer2013(tmp_path)
    assert torch.equal(splits["train"][0], torch.from_numpy(x[:3]))
    assert torch.equal(splits["train"][1], torch.from_numpy(VOTES[:3]))
    assert torch.equal(splits["test"][1], torch.from_numpy(VOTES[3:5]))
    assert splits["val"][0].shape == (0, 48, 48) and splits["val"][1].shape == (0, 10)
    splits, _ = data.load_dataset(str(tmp_path), labels="ferplus-majority")
    assert splits["train"][1].tolist() == [0, 1] and splits["test"][1].tolist() == [2]
    assert_error_of(data.load_dataset, tmp_path, str(tmp_path))  # FER2013 labels asked of FER+ votes

    label_csv = tmp_path / "FER2013Test" / "label.csv"
    good = label_csv.read_text()
    label_csv.write_text(good.replace(",0,0,9,", ",0,0,x,", 1))
    assert "line 2: surprise vote 'x'" in assert_error_of(data.load_fer2013, label_csv, tmp_path)
    label_csv.write_text(good.replace('"(0, 0, 48, 48)",', "", 1))
    assert "line 1: expected 12 fields" in assert_error_of(data.load_fer2013, label_csv, tmp_path)
    label_csv.write_text(good + 'fer9999999.png,"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0\n')
    assert_error_of(data.load_fer2013, tmp_path / "FER2013Test" / "fer9999999.png", tmp_path)  # a missing image
    assert_error_of(data.load_fer2013, tmp_path, tmp_path, ferplus=FERPLUS_CSV)  # votes given twice


def test_mismatched_files_are_clear_errors(tmp_path):
    fer, ferplus, _ = write_pair(tmp_path)
    good = ferplus.read_text().splitlines()

    def load_with(lines):
        ferplus.write_text("\n".join(lines) + "\n")
        return assert_error_of(data.load_fer2013, ferplus, fer, ferplus=ferplus)

    assert "7 data rows, but" in load_with(good[:-1]) and str(fer) in load_with(good[:-1])  # one row short
    assert "line 3: happiness vote '8.5'" in load_with([good[0], good[1], good[2].replace(",8,", ",8.5,")] + good[3:])
    assert "line 2: neutral vote '-1'" in load_with([good[0], good[1].replace(",6,", ",-1,")] + good[2:])
    assert "line 1: not FER+'s header" in load_with(["emotion,pixels,Usage"] + good[1:])
    assert "line 4: expected 12 fields" in load_with(good[:3] + [good[3] + ",0"] + good[4:])
    assert "line 2: Usage 'Train'" in load_with([good[0], good[1].replace("Training", "Train")] + good[2:])
    swapped = good[:4] + [good[5], good[4]] + good[6:]  # a train row and a val row swapped
    assert "line 5: a val row, but it is the row of train face 3" in load_with(swapped)
    assert "line 1: not FER+'s header" in load_with([])
    assert_error_of(data.load_fer2013, tmp_path / "nothing.csv", fer, ferplus=tmp_path / "nothing.csv")
    assert_error_of(data.load_dataset, "synthetic", "synthetic", labels="ferplus-majority")
    assert_error_of(data.load_dataset, "labels 'ferplus'", str(fer), labels="ferplus")
    assert_error_of(data.load_dataset, ferplus, str(fer), ferplus=str(ferplus))  # votes given without FER+ labels


def test_npz_without_or_with_bad_csv_index(tmp_path):
    _, ferplus, x = write_pair(tmp_path)
    npz = tmp_path / "a.npz"
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64))
    assert "no csv_index array for its train split" in assert_error_of(data.load_fer2013, npz, npz, ferplus=ferplus)
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64), train_csv_index=np.array([0, 8]))
    assert "beyond the 8 rows" in assert_error_of(data.load_fer2013, npz, npz, ferplus=ferplus)
    np.savez(npz, train_x=x[:2], train_y=np.zeros(2, np.int64), train_csv_index=np.array([0.0, 1.0]))
    assert_error_of(data.load_fer2013, npz, npz)

# -----------------------------------------------------------------------------
# label modes


@pytest.mark.parametrize("votes, majority, soft", [
    ([6, 0, 1, 1, 0, 0, 0, 0, 2, 0], 0, [1, 0, 0, 0, 0, 0, 0, 0]),  # single votes dropped, unknown left out
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], None, [4 / 9, 0, 0, 0, 3 / 9, 2 / 9, 0, 0]),  # 4 of 9: no majority
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None, [0.5, 0.5, 0, 0, 0, 0, 0, 0]),  # a tie between emotions
    ([0, 0, 0, 0, 0, 0, 0, 6, 4, 0], 7, [0, 0, 0, 0, 0, 0, 0, 1]),  # contempt beats unknown
    ([3, 0, 0, 0, 0, 0, 0, 0, 7, 0], None, None),  # unknown wins
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None, None),  # not a face
    ([4, 2, 0, 0, 0, 0, 0, 0, 4, 0], None, None),  # an emotion tied with unknown is no winner
    ([2, 0, 0, 0, 0, 0, 0, 0, 0, 2], None, None),  # ... nor one tied with not-a-face
    ([4, 0, 0, 3, 0, 0, 0, 0, 3, 0], None, [4 / 7, 0, 0, 3 / 7, 0, 0, 0, 0]),  # beats unknown, no majority
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, None),  # every vote single: nothing left
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, None),  # a single vote in all
    ([0, 2, 0, 0, 0, 0, 0, 0, 0, 0], 1, [0, 1, 0, 0, 0, 0, 0, 0]),  # two votes are enough
])
def test_label_modes(votes, majority, soft):
    v = torch.tensor([votes])
    keep, y = data.ferplus_targets(v, "majority")
    assert keep.tolist() == [majority is not None] and y.dtype == torch.int64
    assert y.tolist() == ([] if majority is None else [majority])
    keep, y = data.ferplus_targets(v, "soft")
    assert keep.tolist() == [soft is not None] and y.dtype == torch.float32 and y.shape == (int(keep.sum()), 8)
    if soft is not None:
        assert torch.allclose(y[0], torch.tensor(soft, dtype=torch.float32))


def test_label_modes_on_many_rows_match_the_rules_one_by_one():
    votes = torch.from_numpy(np.random.default_rng(0).multinomial(10, np.full(10, 0.1), 500))
    keep_m, y_m = data.ferplus_targets(votes, "majority")
    keep_s, y_s = data.ferplus_targets(votes, "soft")
    expected_m, expected_s = [], []
    for row in votes.tolist():
        left = [v if v > 1 else 0 for v in row]
        top = max(left)
        if 2 * top > sum(left) and left.index(top) < 8:
            expected_m.append(left.index(top))
        if max(left[:8]) > max(left[8:]):
            expected_s.append([v / sum(left[:8]) for v in left[:8]])
    assert y_m.tolist() == expected_m and int(keep_m.sum()) == len(expected_m)
    assert torch.allclose(y_s, torch.tensor(expected_s)) and int(keep_s.sum()) == len(expected_s)
    assert 0 < len(expected_m) < len(expected_s) < 500  # the rows exercise every branch
    with pytest.raises(ValueError, match="label mode 'probability'"):
        data.ferplus_targets(votes, "probability")


def test_draw_labels_follow_the_distribution():
    dist = torch.tensor([[0.0, 0.75, 0.25, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1.0]]).repeat(2000, 1)
    drawn = data.draw_labels(dist, torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and set(drawn[1::2].tolist()) == {7}
    share = (drawn[0::2] == 1).double().mean().item()
    assert set(drawn[0::2].tolist()) == {1, 2} and 0.72 < share < 0.78, share
    assert torch.equal(drawn, data.draw_labels(dist, torch.Generator().manual_seed(0)))  # seeded: reproducible

# -----------------------------------------------------------------------------
# the real FER+ file


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FERPLUS_CSV), reason="needs ../shared/data/fer2013new.csv")
def test_real_ferplus_privatetest_majority():
    fp = data.load_ferplus_votes(FERPLUS_CSV)
    assert fp.votes.shape == (35887, 10) and int(fp.dropped.sum()) == 173
    private = (fp.split == "test") & ~fp.dropped
    keep, y = data.ferplus_targets(torch.from_numpy(fp.votes[private]), "majority")
    assert len(y) == 3153
    counts = dict(zip(data.FERPLUS_CLASS_NAMES, torch.bincount(y, minlength=8).tolist()))
    assert counts == {"neutral": 1090, "happiness": 893, "surprise": 396, "sadness": 384, "anger": 273,
                      "fear": 83, "disgust": 18, "contempt": 16}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FER2013_NPZ) or not os.path.exists(FERPLUS_CSV),
                    reason="needs ../shared/data/fer2013.npz and fer2013new.csv")
def test_real_npz_join_matches_the_aligned_votes():
    splits = data.load_fer2013(FER2013_NPZ, ferplus=FERPLUS_CSV)
    with np.load(FER2013_NPZ) as npz, np.load(os.path.join(os.path.dirname(FER2013_NPZ), "ferplus_votes.npz")) as ref:
        for name, prefix in (("train", "train"), ("val", "public_test"), ("test", "private_test")):
            aligned = ref[f"{prefix}_ferplus_votes"]
            joined = aligned[:, 0] >= 0
            assert torch.equal(splits[name][1], torch.from_numpy(aligned[joined].astype(np.int64)))
            assert torch.equal(splits[name][0], torch.from_numpy(npz[f"{prefix}_x"][joined]))
    # one PrivateTest face FER+ kept has no known fer2013.csv row in the npz: 3,152 of the file's 3,153
    _, y = data.ferplus_targets(splits["test"][1], "majority")
    assert len(y) == 3152


# -----------------------------------------------------------------------------
# mixup, cutmix, random erasing

def test_mix_is_the_stated_mix_of_two_faces_and_two_targets():
    g = torch.Generator().manual_seed(0)
    x, partner = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    y, partner_y = data.soft_targets(torch.tensor([0, 1, 2, 3]), 7), data.soft_targets(torch.tensor([3, 3, 1, 0]), 7)
    mixed, targets = data.mix(x, y, partner, partner_y, 0.7)
    assert torch.equal(mixed, x * 0.7 + partner * 0.3) and torch.equal(targets, y * 0.7 + partner_y * 0.3)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    cut, targets = data.mix(x, y, partner, partner_y, 0.75, (2, 4, 8, 4))  # an 8x4 box: a quarter... of 16x16: 1/8
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:10, 4:8] = True
    assert torch.equal(cut[..., inside], partner[..., inside]) and torch.equal(cut[..., ~inside], x[..., ~inside])
    assert torch.equal(targets, y * 0.75 + partner_y * 0.25)
    soft = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0, 0]])  # FER+ distributions stay as they are
    assert torch.equal(data.soft_targets(soft, 8), soft)


def test_draw_mix_follows_its_flags():
    def draws(n=400, **kw):
        g = torch.Generator().manual_seed(1)
        return [data.draw_mix(g, 32, **kw) for _ in range(n)]
    assert draws(5) == [None] * 5  # both off
    mixups = draws(mixup=0.4)
    assert all(box is None for _, box in mixups) and abs(np.mean([lam for lam, _ in mixups]) - 0.5) < 0.05
    assert np.mean([min(lam, 1 - lam) < 0.1 for lam, _ in mixups]) > 0.4  # Beta(0.4, 0.4): mostly near 0 or 1
    for lam, (top, left, h, w) in draws(cutmix=1.0):
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
        assert lam == 1 - h * w / 32 ** 2  # the share of the face left, the box clipped to it
    both = draws(mixup=1.0, cutmix=1.0, switch_prob=0.25)
    assert abs(np.mean([box is not None for _, box in both]) - 0.25) < 0.06
    assert abs(np.mean([d is None for d in draws(mixup=1.0, prob=0.3)]) - 0.7) < 0.06
    assert draws(7, mixup=1.0, cutmix=1.0) == draws(7, mixup=1.0, cutmix=1.0)  # from the generator alone


def test_random_erase_puts_one_box_of_noise_in_the_chosen_faces_and_draws_for_the_whole_batch():
    x = torch.full((64, 1, 24, 24), 7.0)
    assert torch.equal(data.random_erase(x, 0.0, torch.Generator().manual_seed(2)), x)
    out = data.random_erase(x, 1.0, torch.Generator().manual_seed(2))
    for face in (out != 7.0)[:, 0]:
        rows, cols = face.any(1).nonzero()[:, 0], face.any(0).nonzero()[:, 0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1  # one box: its bounding box is all noise
        assert face[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all() and face.sum() == h * w
        assert 0.3 * 0.02 * 24 ** 2 <= h * w <= 1.2 * 24 ** 2 / 3 and 1 / 3.4 <= h / w <= 3.4
    half = data.random_erase(x, 0.5, torch.Generator().manual_seed(3))
    assert 16 < (half != 7.0).flatten(1).any(1).sum() < 48
    part = data.random_erase(x[10:20], 0.5, torch.Generator().manual_seed(3), rows=(10, 64))
    assert torch.equal(part, half[10:20])  # a process's rows of the global batch get the global draws
