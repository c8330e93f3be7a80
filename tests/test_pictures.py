"""pictures.py: any image file, stream or bytes read whole as uint8 grey (every mode and depth, transparency, EXIF
rotation, animated files, PIL's pixel limit), then cut to a face as an image folder of FER2013 is read."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import emonext
import pictures


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


def face(path):
    """The 48x48 face of an image file: the whole grey picture (pictures.read_grey), its centre square cut out and
    resized to 48 (emonext.grey_faces), the way an image folder of FER2013 is read."""
    return emonext.grey_faces(pictures.read_grey(path))[0]


def test_read_grey_any_mode_and_size_then_grey_faces(tmp_path):
    # a wide and a tall picture, read whole; the face: the centre square (four quadrants), white margins cut off
    levels = (40, 90, 160, 220)
    for name, size in (("wide.png", (120, 80)), ("tall.png", (80, 120))):
        canvas = np.full(size[::-1], 255, np.uint8)
        top, left = (size[1] - 80) // 2, (size[0] - 80) // 2
        canvas[top:top + 80, left:left + 80] = quadrants(80, levels)
        Image.fromarray(canvas).convert("RGB").save(tmp_path / name)
        whole = pictures.read_grey(tmp_path / name)
        assert whole.shape == size[::-1] and whole.dtype == np.uint8 and (whole == canvas).all()
        img = face(tmp_path / name)
        assert img.shape == (48, 48) and img.dtype == torch.uint8
        assert_quadrants(img, levels)
        assert img.max() < 230  # no margin left in
    (tmp_path / "x.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="x.jpg"):
        face(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="nothere.png"):
        face(tmp_path / "nothere.png")


LEVELS = (0, 85, 170, 255)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF")])
def test_read_grey_scales_16_bit_and_float_by_the_mode_range(tmp_path, mode, fmt):
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
    img = face(path)
    assert_quadrants(img, expected, margin=0)


def test_read_grey_refuses_values_outside_the_mode_range(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match=r"i32.tif: I image with values 70000..70000, expected 0..65535"):
        face(tmp_path / "i32.tif")
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f.tif: F image with values 200..200, expected 0..1"):
        face(tmp_path / "f.tif")


GREY_BACKGROUND = round(255 * emonext.FER2013_MEAN)  # 129, transparent parts


def test_the_mean_grey_is_fer2013s():
    assert pictures.MEAN_GREY == GREY_BACKGROUND


def test_read_grey_lays_transparency_on_mean_grey(tmp_path):
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[:24, :24] = (255, 0, 0, 255)  # opaque red: 0.299 * 255
    rgba[:24, 24:] = (0, 0, 0, 0)  # transparent black: the background, not black
    rgba[24:, :24] = (255, 255, 255, 0)  # transparent white: the background, not white
    rgba[24:, 24:] = (255, 255, 255, 128)  # half-transparent white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    half = GREY_BACKGROUND + (255 - GREY_BACKGROUND) * 128 / 255
    assert_quadrants(face(tmp_path / "rgba.png"), (76, GREY_BACKGROUND, GREY_BACKGROUND, half), margin=0)

    la = np.zeros((48, 48, 2), np.uint8)
    la[:, :24], la[:, 24:] = (200, 255), (200, 0)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert_quadrants(face(tmp_path / "la.png"), (200, GREY_BACKGROUND, 200, GREY_BACKGROUND), margin=0)

    # palette: index 0 red, 1 blue, 2 green but transparent (tRNS)
    p = Image.fromarray(quadrants(48, (0, 1, 2, 0)), "L").convert("P")
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    p.save(tmp_path / "p.png", transparency=2)
    assert_quadrants(face(tmp_path / "p.png"), (76, 29, GREY_BACKGROUND, 76), margin=0)


def test_read_grey_refuses_a_picture_over_pils_pixel_limit_in_one_line(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(tmp_path / "big.png")
    for limit in (2000, 1000):  # over the limit (PIL's warning) and over twice it (PIL's error)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError) as e:
            pictures.read_grey(tmp_path / "big.png")
        assert str(e.value) == (f"{tmp_path / 'big.png'}: 0.003 MP, over PIL's limit of {limit / 1e6:.3g} MP "
                                "(PIL.Image.MAX_IMAGE_PIXELS)")


def test_read_grey_gives_an_animated_files_first_frame_and_says_so(tmp_path):
    frames = [Image.fromarray(np.full((20, 30), level, np.uint8)) for level in (10, 200, 90)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r"anim.gif: animated \(3 frames\): read the first$"):
        grey = pictures.read_grey(tmp_path / "anim.gif")
    assert grey.shape == (20, 30) and (grey == 10).all()


def test_read_grey_palette_cmyk_and_exif_rotation(tmp_path):
    p = Image.fromarray(quadrants(48, (0, 1, 2, 3)), "L").convert("P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])  # red, green, blue, white
    p.save(tmp_path / "p.gif")
    assert_quadrants(face(tmp_path / "p.gif"), (76, 150, 29, 255), margin=0)  # ITU-R 601 luma

    cmyk = np.zeros((48, 48, 4), np.uint8)
    cmyk[:24, :24], cmyk[:24, 24:], cmyk[24:, :24] = (255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)  # cyan, black, white
    cmyk[24:, 24:] = (0, 0, 0, 128)  # half black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    assert_quadrants(face(tmp_path / "cmyk.tif"), (179, 0, 255, 127), margin=0)

    # stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to show"): the stored left column is
    # the shown top row; a wide stored picture is a tall shown one, so the crop takes its middle rows
    stored = np.full((48, 80), 200, np.uint8)
    stored[:, 16:40] = 30  # shown: rows 16..39 of the 80 dark, i.e. the top half of the centre square
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    img = face(tmp_path / "sideways.jpg").numpy().astype(int)
    assert np.abs(img[2:20] - 30).max() <= 6 and np.abs(img[28:46] - 200).max() <= 6


def test_bytes_and_streams_read_as_the_file_does_and_errors_carry_the_name_given(tmp_path):
    levels = (40, 90, 160, 220)
    Image.fromarray(quadrants(64, levels)).convert("RGB").save(tmp_path / "q.png")
    whole = pictures.read_grey(tmp_path / "q.png")
    blob = (tmp_path / "q.png").read_bytes()
    assert np.array_equal(pictures.read_grey(blob), whole)
    assert np.array_equal(pictures.read_grey(io.BytesIO(blob)), whole)
    with pytest.raises(ValueError, match=r"^the upload: not a readable image \(cannot identify image file\)$"):
        pictures.read_grey(b"not an image", "the upload")
    with pytest.raises(ValueError, match=r"^the upload: not a readable image"):
        pictures.read_grey(blob[:len(blob) // 2], "the upload")  # a truncated PNG


def test_the_pixel_limit_is_its_own_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(pictures.PixelLimitError, match=r"^the upload: 0.003 MP, over PIL's limit"):
        pictures.read_grey((tmp_path / "big.png").read_bytes(), "the upload")
