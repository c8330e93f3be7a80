"""
Pictures in: an image file, a binary stream or image bytes -> the whole picture as uint8 grey (H, W), with Pillow
and numpy alone (no torch), for data.py's image folders, predict.py and serve.py. The faces in it are a detector's
to find, or (a face crop) emonext.grey_faces's to bring to 48x48.

Bad input ends in one ValueError whose message starts with what was read (its path, or the name given).
"""
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
MEAN_GREY = 129  # round(255 x emonext.FER2013_MEAN) (tested equal): the grey transparency is laid on
MODE_TOP = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # PIL's 16-bit
#                                                              and float modes (16-bit PNG/TIFF open as I;16 or I)


class PixelLimitError(ValueError):
    """A picture over PIL's pixel limit (Image.MAX_IMAGE_PIXELS): a decompression bomb, or just too large."""


def as_grey_image(im, name):
    """Any PIL image -> mode "L". 16-bit and float images are scaled by their mode's range (convert("L") would
    clip them: a 16-bit 1000 becomes 255). Transparent parts are laid on FER2013's mean grey, which normalises
    to about 0: the value the model sees wherever there is no picture (the STN samples 0 outside the frame too), so
    neither a white nor a black background adds an edge the faces it learnt from never had."""
    if im.mode in MODE_TOP:
        top, a = MODE_TOP[im.mode], np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > top:
            raise ValueError(f"{name}: {im.mode} image with values {a.min():g}..{a.max():g}, expected 0..{top:g}")
        return Image.fromarray(np.round(a * (255 / top)).astype(np.uint8))
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:  # RGBA, LA, PA, P/RGB with tRNS
        background = Image.new("RGBA", im.size, (MEAN_GREY,) * 3 + (255,))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("L")


def read_grey(source, name=None) -> np.ndarray:
    """An image (a path, a binary file or its bytes; any size, mode or depth) -> the whole picture as uint8 grey
    (H, W), upright (EXIF orientation applied), read once. An animated file gives its first frame and a warning
    saying so. ValueError in one line starting with name (default: the source, as str() gives it): missing,
    unreadable, values outside its mode's range, or over PIL's pixel limit (PixelLimitError)."""
    name = str(source) if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                frames = getattr(im, "n_frames", 1)
                im = as_grey_image(ImageOps.exif_transpose(im), name)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        pixels = int(re.search(r"\d+", str(e)).group())
        raise PixelLimitError(f"{name}: {pixels / 1e6:.3g} MP, over PIL's limit of "
                              f"{Image.MAX_IMAGE_PIXELS / 1e6:.3g} MP (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError) as e:
        why = re.sub(r" <_io\.BytesIO object at \w+>", "", str(e))  # PIL names a buffer by its address
        raise ValueError(f"{name}: not a readable image ({why})") from None
    if frames > 1:
        warnings.warn(f"{name}: animated ({frames} frames): read the first", stacklevel=2)
    return np.array(im, dtype=np.uint8)
