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
from conftest import FER2013_NPZ

USAGES = ["Training", "Training", "Training", "PublicTest", "PrivateTest", "PrivateTest"]


def faces(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


def pixel_string(face):
    return " ".join(map(str, face.ravel().tolist()))


def write_csv(path, header, rows):
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def fer_csv(tmp_path, rows=None):
    """A fer2013.csv in Kaggle's layout; `rows` replaces its data lines."""
    x = faces(len(USAGES))
    y = np.arange(len(USAGES)) % 7
    default = [f"{c},{pixel_string(f)},{u}" for c, f, u in zip(y, x, USAGES)]
    return write_csv(tmp_path / "fer2013.csv", "emotion,pixels,Usage", default if rows is None else rows), x, y


def check_splits(splits, sizes):
    assert set(splits) == {"train", "val", "test"}
    for name, n in zip(("train", "val", "test"), sizes):
        x, y = splits[name]
        assert x.shape == (n, 48, 48) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64


def assert_error(path, where, **kwargs):
    """The loader raises one ValueError whose message names the file and the place in it."""
    with pytest.raises(ValueError) as e:
        data.load_fer2013(path, **kwargs)
    assert str(e.value).startswith(str(where)), str(e.value)
    return str(e.value)

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
    x = faces(3)
    rows = [f'{c},{u},"{pixel_string(f)}"' for c, f, u in zip((3, 0, 6), x, ("Training", "PublicTest", "PrivateTest"))]
    splits = data.load_fer2013(write_csv(tmp_path / "icml_face_data.csv", "emotion, Usage, pixels", rows))
    check_splits(splits, (1, 1, 1))
    assert [splits[s][1].item() for s in ("train", "val", "test")] == [3, 0, 6]
    assert torch.equal(splits["val"][0][0], torch.from_numpy(x[1]))


def test_competition_train_csv_is_all_train(tmp_path):
    rows = [f"{c},{pixel_string(f)}" for c, f in zip((1, 2, 5), faces(3))]
    check_splits(data.load_fer2013(write_csv(tmp_path / "train.csv", "emotion,pixels", rows)), (3, 0, 0))


def test_competition_test_csv_is_refused(tmp_path):
    path = write_csv(tmp_path / "test.csv", "pixels", [pixel_string(f) for f in faces(2)])
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
    face = faces(1)[0]
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
    good = pixel_string(faces(1)[0])
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
    good = pixel_string(faces(1)[0])
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
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = faces(n), (np.arange(n) % 7).astype(np.uint8)
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
    np.savez(half, train_x=faces(2))
    assert_error(half, half)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK not really a zip")
    assert "not a readable .npz" in assert_error(garbage, garbage)


def quadrants(side, levels):
    """A (side, side) uint8 square of four flat quadrants: top left, top right, bottom left, bottom right."""
    q = np.empty((side, side), np.uint8)
    h = side // 2
    q[:h, :h], q[:h, h:], q[h:, :h], q[h:, h:] = levels
    return q


def assert_quadrants(img, levels, margin=3):
    """A 48x48 face that is four flat quadrants of these grey levels, away from the seams (resampling blurs them)."""
    a, h = img.numpy().astype(int), 24
    for (rows, cols), level in zip([(slice(0, h - margin), slice(0, h - margin)), (slice(0, h - margin), slice(h + margin, 48)),
                                    (slice(h + margin, 48), slice(0, h - margin)), (slice(h + margin, 48), slice(h + margin, 48))],
                                   levels):
        assert (np.abs(a[rows, cols] - level) <= 1).all(), (level, a[rows, cols].min(), a[rows, cols].max())


def test_load_image_any_mode_and_size(tmp_path):
    # a wide and a tall picture: the centre square (four quadrants) is the face, the white margins are cut off
    levels = (40, 90, 160, 220)
    for name, size in (("wide.png", (120, 80)), ("tall.png", (80, 120))):
        canvas = np.full(size[::-1], 255, np.uint8)
        top, left = (size[1] - 80) // 2, (size[0] - 80) // 2
        canvas[top:top + 80, left:left + 80] = quadrants(80, levels)
        Image.fromarray(canvas).convert("RGB").save(tmp_path / name)
        img = data.load_image(tmp_path / name)
        assert img.shape == (48, 48) and img.dtype == torch.uint8
        assert_quadrants(img, levels)
        assert img.max() < 230  # no margin left in
    (tmp_path / "x.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="x.jpg"):
        data.load_image(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="nothere.png"):
        data.load_image(tmp_path / "nothere.png")


LEVELS = (0, 85, 170, 255)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF")])
def test_load_image_scales_16_bit_and_float_by_the_mode_range(tmp_path, mode, fmt):
    top = 1.0 if mode == "F" else 65535
    values = [level / 255 * top for level in LEVELS]
    values[1] = 1000 / 65535 * top  # a dark 16-bit value that convert("L") would clip to white
    square = np.empty((48, 48), np.float64)
    square[:24, :24], square[:24, 24:], square[24:, :24], square[24:, 24:] = values
    if mode == "F":
        im = Image.fromarray(square.astype(np.float32))
    elif mode == "I":
        im = Image.fromarray(square.round().astype(np.int32))
    else:
        im = Image.frombytes(mode, (48, 48), square.round().astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    path = tmp_path / f"deep.{fmt.lower()}"
    im.save(path, fmt)
    with Image.open(path) as check:
        assert check.mode == mode  # the file really opens in the mode under test
    expected = (0, round(1000 / 257), 170, 255)
    img = data.load_image(path)
    assert_quadrants(img, expected, margin=0)


def test_load_image_refuses_values_outside_the_mode_range(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match=r"i32.tif: I image with values 70000..70000, expected 0..65535"):
        data.load_image(tmp_path / "i32.tif")
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f.tif: F image with values 200..200, expected 0..1"):
        data.load_image(tmp_path / "f.tif")


GREY_BACKGROUND = round(255 * emonext.FER2013_MEAN)  # 129, transparent parts


def test_load_image_lays_transparency_on_mean_grey(tmp_path):
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[:24, :24] = (255, 0, 0, 255)  # opaque red: 0.299 * 255
    rgba[:24, 24:] = (0, 0, 0, 0)  # transparent black: the background, not black
    rgba[24:, :24] = (255, 255, 255, 0)  # transparent white: the background, not white
    rgba[24:, 24:] = (255, 255, 255, 128)  # half-transparent white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    half = GREY_BACKGROUND + (255 - GREY_BACKGROUND) * 128 / 255
    assert_quadrants(data.load_image(tmp_path / "rgba.png"), (76, GREY_BACKGROUND, GREY_BACKGROUND, half), margin=0)

    la = np.zeros((48, 48, 2), np.uint8)
    la[:, :24], la[:, 24:] = (200, 255), (200, 0)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert_quadrants(data.load_image(tmp_path / "la.png"), (200, GREY_BACKGROUND, 200, GREY_BACKGROUND), margin=0)

    # palette: index 0 red, 1 blue, 2 green but transparent (tRNS)
    p = Image.fromarray(quadrants(48, (0, 1, 2, 0)), "L").convert("P")
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    p.save(tmp_path / "p.png", transparency=2)
    assert_quadrants(data.load_image(tmp_path / "p.png"), (76, 29, GREY_BACKGROUND, 76), margin=0)


def test_load_image_palette_cmyk_and_exif_rotation(tmp_path):
    p = Image.fromarray(quadrants(48, (0, 1, 2, 3)), "L").convert("P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])  # red, green, blue, white
    p.save(tmp_path / "p.gif")
    assert_quadrants(data.load_image(tmp_path / "p.gif"), (76, 150, 29, 255), margin=0)  # ITU-R 601 luma

    cmyk = np.zeros((48, 48, 4), np.uint8)
    cmyk[:24, :24], cmyk[:24, 24:], cmyk[24:, :24] = (255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)  # cyan, black, white
    cmyk[24:, 24:] = (0, 0, 0, 128)  # half black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    assert_quadrants(data.load_image(tmp_path / "cmyk.tif"), (179, 0, 255, 127), margin=0)

    # stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to show"): the stored left column is
    # the shown top row; a wide stored picture is a tall shown one, so the crop takes its middle rows
    stored = np.full((48, 80), 200, np.uint8)
    stored[:, 16:40] = 30  # shown: rows 16..39 of the 80 dark, i.e. the top half of the centre square
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    img = data.load_image(tmp_path / "sideways.jpg").numpy().astype(int)
    assert np.abs(img[2:20] - 30).max() <= 6 and np.abs(img[28:46] - 200).max() <= 6

# -----------------------------------------------------------------------------
# synthetic set and load_dataset


def test_synthetic_faces():
    a = synthetic.synthetic_faces(n_train=140, n_val=14, n_test=70, seed=1)
    check_splits(a, (140, 14, 70))
    assert torch.bincount(a["train"][1], minlength=7).tolist() == [20] * 7
    b = synthetic.synthetic_faces(n_train=70, n_val=14, n_test=70, seed=1)
    assert torch.equal(a["test"][0], b["test"][0])  # each split has its own stream
    c = synthetic.synthetic_faces(n_train=140, n_val=14, n_test=70, seed=2)
    assert not torch.equal(a["train"][0], c["train"][0])
    assert a["train"][0].float().std() > 30  # real contrast, not a blank canvas


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


def test_iterate_batches():
    x, y = torch.arange(10).view(10, 1, 1).expand(10, 48, 48).to(torch.uint8), torch.arange(10)
    seen = torch.cat([yb for _, yb in data.iterate_batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    again = torch.cat([yb for _, yb in data.iterate_batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)
    batches = list(data.iterate_batches(x, y, 4, shuffle=False, drop_last=True))
    assert [len(yb) for _, yb in batches] == [4, 4] and torch.equal(batches[1][0][:, 0, 0], batches[1][1].to(torch.uint8))


def test_augment_shape_determinism_and_identity():
    x = torch.from_numpy(faces(8))
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
    x = torch.from_numpy(faces(5))
    kw = dict(rotate=7, scale=(0.75, 1.25), translate=0.03, vflip=True)
    torch.testing.assert_close(data.augment(x, 64, torch.Generator().manual_seed(3), **kw),
                               data.warp(x, 64, **data.random_pose(5, torch.Generator().manual_seed(3), **kw)),
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
