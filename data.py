"""
FER2013 data for EmoNeXt: readers for every form the dataset ships in, a built-in synthetic face set,
and batched augmentation that runs on the training device.

Every loader returns {"train": (x, y), "val": (x, y), "test": (x, y)} with x a uint8 tensor (N, 48, 48)
and y an int64 tensor (N,). FER2013's splits map as Training -> train, PublicTest -> val,
PrivateTest -> test (the split papers report). The whole dataset stays in memory as uint8 (83 MB);
augmentation and normalisation happen later, on whole batches, wherever the model runs.

Bad input ends in one ValueError whose message starts with the file (and line or row) it is about.
"""

import csv
import math
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# mean and std of the grey levels (scaled to 0..1) over the 28,709 faces of FER2013's Training split
MEAN, STD = 0.5077, 0.2551

IMG = 48  # FER2013 faces are 48x48 grey
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
ROOT = os.path.dirname(os.path.abspath(__file__))


def _empty_split():
    return torch.zeros(0, IMG, IMG, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)


def _splits(**parts):
    """Fill in the splits a source lacks with empty tensors of the right shape and dtype."""
    return {name: parts.get(name) or _empty_split() for name in ("train", "val", "test")}


def _as_tensors(x, y):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(np.asarray(y, dtype=np.int64))

# -----------------------------------------------------------------------------
# loaders

def load_fer2013(path, skip_bad_rows=False):
    """Read FER2013 from a csv file, an image-folder tree or an .npz (format chosen from the path)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _load_folders(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    if path.lower().endswith(".npz"):
        return _load_npz(path)
    return _load_csv(path, skip_bad_rows)


def _load_csv(path, skip_bad_rows):
    """Kaggle fer2013.csv (emotion,pixels,Usage), icml_face_data.csv (same columns, other order, names with
    leading spaces) and the competition's train.csv (no Usage: all rows are train)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip().lower() for name in next(reader, [])]
            if not header:
                raise ValueError(f"{path}: empty file")
            if "pixels" not in header:
                raise ValueError(f"{path}, line 1: missing column 'pixels' (header is {','.join(header)!r}; "
                                 "expected a header like emotion,pixels,Usage)")
            if "emotion" not in header:
                raise ValueError(f"{path}: no 'emotion' column, so these faces are unlabelled (like the competition's "
                                 "test.csv) and cannot be used for training or evaluation; use fer2013.csv, "
                                 "icml_face_data.csv or train.csv")
            i_label, i_pixels = header.index("emotion"), header.index("pixels")
            i_usage = header.index("usage") if "usage" in header else None
            rows = [(reader.line_num, row) for row in reader if row]  # line_num: the row's last physical line
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text csv file (it does not decode as UTF-8)") from None
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: unreadable csv ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")

    # pixels go straight into one uint8 array; np.fromstring parses each 2304-int row in C
    x = np.empty((len(rows), IMG * IMG), dtype=np.uint8)
    y = np.empty(len(rows), dtype=np.int64)
    split = []  # split name of each kept row
    bad = []  # (line, reason) of each rejected row
    for line, row in rows:
        reason = None
        if len(row) != len(header):
            reason = f"expected {len(header)} fields, got {len(row)}"
        else:
            label, usage = row[i_label].strip(), row[i_usage].strip() if i_usage is not None else "Training"
            try:
                pixels = np.fromstring(row[i_pixels], dtype=np.int64, sep=" ")
            except ValueError:
                pixels = None
            if label not in ("0", "1", "2", "3", "4", "5", "6"):
                reason = f"label {label!r} is not an integer in 0..6"
            elif usage not in USAGE_TO_SPLIT:
                reason = f"Usage {usage!r} is not one of Training, PublicTest, PrivateTest"
            elif pixels is None:
                reason = f"pixels must be {IMG * IMG} space-separated integers in 0..255, got other text"
            elif pixels.size != IMG * IMG:
                reason = f"pixels must be {IMG * IMG} space-separated integers in 0..255, got {pixels.size} values"
            elif pixels.min() < 0 or pixels.max() > 255:
                reason = f"pixels must be {IMG * IMG} space-separated integers in 0..255, got {pixels.min()}..{pixels.max()}"
        if reason:
            bad.append((line, reason))
            continue
        x[len(split)], y[len(split)] = pixels, int(label)
        split.append(USAGE_TO_SPLIT[usage])

    if bad:
        first_line, first_reason = bad[0]
        if not skip_bad_rows:
            more = f" ({len(bad) - 1} more bad rows; skip_bad_rows=True skips them)" if len(bad) > 1 else ""
            raise ValueError(f"{path}, line {first_line}: {first_reason}{more}")
        print(f"{path}: skipped {len(bad)} bad rows of {len(rows)} (first: line {first_line}: {first_reason})")
        if not split:
            raise ValueError(f"{path}: every row is bad, nothing left to load")
    x, y, split = x[:len(split)].reshape(-1, IMG, IMG), y[:len(split)], np.array(split)
    return _splits(**{name: _as_tensors(x[split == name], y[split == name]) for name in set(split)})


def _load_folders(path):
    """Image folders train/<class>/* and test/<class>/* (and val/<class>/* if present), as in Kaggle's
    image release; test files named PublicTest_* go to val, the rest of test/ is the test split."""
    split_dirs = [name for name in ("train", "val", "test") if os.path.isdir(os.path.join(path, name))]
    if not split_dirs:
        raise ValueError(f"{path}: no train/, val/ or test/ folder (expected train/<class>/*.jpg and "
                         f"test/<class>/*.jpg with <class> one of {', '.join(CLASS_NAMES)})")
    files = {"train": [], "val": [], "test": []}
    for split in split_dirs:
        split_dir, found = os.path.join(path, split), 0
        for cls in sorted(os.listdir(split_dir)):
            cls_dir = os.path.join(split_dir, cls)
            if cls.startswith(".") or not os.path.isdir(cls_dir):
                continue
            if cls.lower() not in CLASS_NAMES:
                raise ValueError(f"{cls_dir}: unknown class folder {cls!r} (expected one of {', '.join(CLASS_NAMES)})")
            for name in sorted(os.listdir(cls_dir)):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                target = "val" if split == "test" and name.startswith("PublicTest_") else split
                files[target].append((os.path.join(cls_dir, name), CLASS_NAMES.index(cls.lower())))
                found += 1
        if not found:
            raise ValueError(f"{split_dir}: no images (expected {split}/<class>/*.jpg with <class> one of "
                             f"{', '.join(CLASS_NAMES)})")
    return _splits(**{
        split: (torch.stack([load_image(f) for f, _ in items]), torch.tensor([c for _, c in items], dtype=torch.int64))
        for split, items in files.items() if items})


def _load_npz(path):
    """The arrays of ../shared/data/fer2013.npz: train_*, public_test_* (val), private_test_* (test);
    test_* (public + private together) stands in for test when the private split is absent."""
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    prefixes = {"train": "train", "val": "public_test", "test": "private_test" if "private_test_x" in arrays else "test"}
    parts = {}
    for split, prefix in prefixes.items():
        kx, ky = f"{prefix}_x", f"{prefix}_y"
        if kx not in arrays and ky not in arrays:
            continue
        if kx not in arrays or ky not in arrays:
            raise ValueError(f"{path}: has {kx if kx in arrays else ky} but not {ky if kx in arrays else kx}")
        x, y = arrays[kx], arrays[ky]
        if x.ndim != 3 or x.shape[1:] != (IMG, IMG) or y.shape != (len(x),):
            raise ValueError(f"{path}: {kx} {x.shape} and {ky} {y.shape} should be (N, 48, 48) and (N,)")
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: {kx} is {x.dtype}, expected uint8 grey levels")
        bad = np.flatnonzero((y < 0) | (y > 6)) if np.issubdtype(y.dtype, np.integer) else np.arange(len(y))
        if len(bad):
            raise ValueError(f"{path}: {ky} row {bad[0]}: label {y[bad[0]]} is not an integer in 0..6")
        parts[split] = _as_tensors(x, y)
    if not parts:
        raise ValueError(f"{path}: none of the arrays train_x/y, public_test_x/y, private_test_x/y "
                         f"(found {', '.join(arrays) or 'no arrays'})")
    return _splits(**parts)


def load_image(path):
    """Any image file (any size or mode) -> uint8 (48, 48) grey face, prepared like FER2013's crops."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("L")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if im.size != (IMG, IMG):
        side = min(im.size)  # centre square, so faces keep their proportions
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.resize((IMG, IMG), Image.BILINEAR, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.array(im, dtype=np.uint8))

# -----------------------------------------------------------------------------
# synthetic faces: the default dataset when FER2013 is not around

# per class: brow (inner, outer) heights above the eye, eye half-height, mouth kind
_EXPRESSIONS = {
    0: dict(brow=(1, 13), eye=2.0, mouth="grimace"),  # angry: brows pulled down to a V, narrowed eyes, bared teeth
    1: dict(brow=(5, 7), eye=2.5, mouth="sneer"),  # disgust: low brows, one side of the upper lip raised
    2: dict(brow=(16, 10), eye=6.0, mouth="wide"),  # fear: raised, inner-up brows, wide eyes, stretched open mouth
    3: dict(brow=(10, 10), eye=3.5, mouth="smile"),  # happy: U-shaped smile
    4: dict(brow=(15, 4), eye=3.0, mouth="frown"),  # sad: inner brow ends raised, downturned mouth
    5: dict(brow=(18, 18), eye=6.0, mouth="o"),  # surprise: high brows, wide eyes, round open mouth
    6: dict(brow=(9, 9), eye=3.5, mouth="flat"),  # neutral: level brows, straight mouth
}


def _draw_face(rng, label):
    """One face drawn on a 96x96 canvas (2x, for smooth edges), reduced to 48x48 and posed.
    The expression lives in brows, eyes and mouth; everything else is nuisance for the model to ignore."""
    draws = iter(rng.random(32).tolist())  # one numpy call per face: scalar rng calls would dominate the time

    def u(lo=0.0, hi=1.0):
        return lo + (hi - lo) * next(draws)

    e = _EXPRESSIONS[label]
    bg, skin = u(0, 255), u(120, 230)
    ink = skin * u(0.05, 0.4)  # features are darker than skin
    im = Image.new("L", (96, 96), int(bg))
    d = ImageDraw.Draw(im)
    cx, cy, fw, fh = 48 + u(-2, 2), 50 + u(-2, 2), u(27, 33), u(33, 39)
    d.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=int(skin))
    if u() < 0.6:  # hair: a dark cap over the forehead
        d.chord((cx - fw - 1, cy - fh - 2, cx + fw + 1, cy - fh * u(0.6, 0.9)), 180, 360, fill=int(skin * u(0, 0.5)))
    ey, dx, ew, bw = cy - u(7, 11), u(11, 14), u(4.5, 6), int(u(4, 6))
    for side in (-1, 1):
        ex = cx + side * dx
        eh = e["eye"] * u(0.85, 1.15)
        d.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), fill=int(min(255, skin + 40)))
        r = min(eh, 2.5)
        d.ellipse((ex - r, ey - r, ex + r, ey + r), fill=int(ink))
        inner, outer = (h * u(0.85, 1.15) for h in e["brow"])
        d.line((ex - side * 7, ey - eh - inner, ex + side * 9, ey - eh - outer), fill=int(ink), width=bw)
    d.line((cx, ey + 4, cx - 2, cy + 8, cx + 2, cy + 9), fill=int(ink), width=1)  # nose
    my, mw, lw = cy + u(18, 22), u(10, 14), int(u(3, 5))
    kind = e["mouth"]
    if kind == "flat":
        d.line((cx - mw, my, cx + mw, my), fill=int(ink), width=lw)
    elif kind == "grimace":
        d.rectangle((cx - mw * 0.8, my - 3, cx + mw * 0.8, my + 4), fill=int(ink))
        d.line((cx - mw * 0.7, my, cx + mw * 0.7, my), fill=int(min(255, skin + 40)), width=2)  # teeth
    elif kind == "smile":
        d.arc((cx - mw, my - 10, cx + mw, my + u(6, 9)), 10, 170, fill=int(ink), width=lw)
    elif kind == "frown":
        d.arc((cx - mw, my - 2, cx + mw, my + u(10, 14)), 190, 350, fill=int(ink), width=lw)
    elif kind == "sneer":
        s = 1 if u() < 0.5 else -1  # which side of the lip is raised
        d.line((cx - s * mw, my + 2, cx, my + 1, cx + s * mw * 0.6, my - 3, cx + s * mw, my - 5), fill=int(ink), width=lw)
        d.line((cx + s * 4, cy - 2, cx + s * 8, cy + 2), fill=int(ink), width=1)  # wrinkled nose
    elif kind == "wide":
        d.ellipse((cx - mw - 2, my - u(3.5, 4.5), cx + mw + 2, my + u(3.5, 4.5)), fill=int(ink))
    else:  # "o"
        r = u(5, 7)
        d.ellipse((cx - r, my - r * 1.5, cx + r, my + r * 1.5), fill=int(ink))
    # pose: rotate, scale and shift about the centre (PIL's matrix maps output pixels to input pixels)
    angle, zoom, tx, ty = np.radians(u(-15, 15)), u(0.9, 1.1), u(-3, 3), u(-3, 3)
    a, b, c = np.cos(angle) / zoom, np.sin(angle) / zoom, IMG / 2
    im = im.reduce(2).transform((IMG, IMG), Image.AFFINE, (a, b, c - a * c - b * c + tx, -b, a, c + b * c - a * c + ty),
                                resample=Image.BILINEAR, fillcolor=int(bg))
    return np.asarray(im, dtype=np.uint8)


def _synthetic_split(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASS_NAMES))  # balanced classes
    x = np.stack([_draw_face(rng, int(c)) for c in y]).astype(np.float32) if n else np.zeros((0, IMG, IMG), np.float32)
    # lighting: a linear gradient in a random direction, contrast and brightness, then sensor noise
    ramp = np.linspace(-1, 1, IMG, dtype=np.float32)
    phi = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    x *= 1 + rng.uniform(0, 0.4, (n, 1, 1)).astype(np.float32) * (np.cos(phi) * ramp + np.sin(phi) * ramp[:, None])
    x = (x - 128) * rng.uniform(0.6, 1.2, (n, 1, 1)).astype(np.float32) + 128 + rng.uniform(-30, 30, (n, 1, 1)).astype(np.float32)
    x += rng.standard_normal((n, IMG, IMG), dtype=np.float32) * rng.uniform(0, 8, (n, 1, 1)).astype(np.float32)
    return _as_tensors(np.clip(np.round(x), 0, 255), y)


def synthetic_faces(n_train=7000, n_val=700, n_test=1400, seed=0):
    """Procedurally drawn 48x48 grey faces of the 7 FER2013 expressions, with random pose and lighting.
    Each split has its own random stream, so changing one split's size leaves the others unchanged."""
    return {name: _synthetic_split(n, [seed, i]) for i, (name, n) in enumerate(
        (("train", n_train), ("val", n_val), ("test", n_test)))}


def find_default_data():
    """data/fer2013.csv or data/fer2013.npz under the repo if present, else "synthetic"."""
    for name in ("fer2013.csv", "fer2013.npz"):
        path = os.path.join(ROOT, "data", name)
        if os.path.exists(path):
            return path
    return "synthetic"


def load_dataset(spec=None, skip_bad_rows=False):
    """spec: None (the default data), "synthetic", or a path for load_fer2013. Returns (splits, description)."""
    spec = find_default_data() if spec is None else spec
    if spec == "synthetic":
        splits, what = synthetic_faces(), "synthetic faces (built in; put FER2013 at data/fer2013.csv or .npz to use it)"
    else:
        splits, what = load_fer2013(spec, skip_bad_rows), f"FER2013 from {spec}"
    sizes = " / ".join(f"{name} {len(splits[name][1])}" for name in ("train", "val", "test"))
    return splits, f"{what}: {sizes}"

# -----------------------------------------------------------------------------
# batches and augmentation, on whole uint8 batches wherever they live

def iterate_batches(x, y, batch_size, shuffle, generator=None, drop_last=False):
    """Yield (x, y) batches by index slicing; a seeded torch.Generator makes the order reproducible."""
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if drop_last and start + batch_size > n:
            break
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def _normalise(x):
    return (x - MEAN) / STD


def augment(x, img_size, generator=None, rotate=20.0, scale=(0.8, 1.2), translate=0.1, hflip=True, vflip=False,
            rows=None):
    """uint8 (B, H, W) -> normalised float (B, 1, img_size, img_size) through ONE affine warp per sample:
    rotation up to `rotate` degrees, zoom in `scale`, shift up to `translate` of the image, random flips,
    and the resize to img_size, all folded into one matrix for affine_grid + grid_sample.
    rows=(start, total): x is rows start..start+B of a batch of `total` faces (one process's share of a global
    batch); the parameters of all `total` are drawn and x takes its rows', so any split augments each face alike."""
    b = x.shape[0]
    start, total = rows or (0, b)
    # random numbers on the CPU generator, so CPU and GPU runs draw the same parameters
    r = torch.rand(total, 6, generator=generator)[start:start + b]
    angle = (2 * r[:, 0] - 1) * math.radians(rotate)
    zoom = scale[0] + (scale[1] - scale[0]) * r[:, 1]
    shift = (2 * r[:, 2:4] - 1) * 2 * translate  # grid coordinates span 2 across the image
    flip_x = torch.where((r[:, 4] < 0.5) & hflip, -1.0, 1.0)
    flip_y = torch.where((r[:, 5] < 0.5) & vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # the matrix maps output to input: zoom in = shrink
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1) * flip_x[:, None],
                         torch.stack([sin, cos, shift[:, 1]], 1) * flip_y[:, None]], 1)
    grid = F.affine_grid(theta.to(x.device), (b, 1, img_size, img_size), align_corners=False)
    # reflection padding: no black corners for the model to key on, and an identity warp equals preprocess()
    out = F.grid_sample(x.unsqueeze(1).float() / 255, grid, padding_mode="reflection", align_corners=False)
    return _normalise(out)


def preprocess(x, img_size):
    """Eval path: uint8 (B, H, W) -> normalised float (B, 1, img_size, img_size), bilinear resize."""
    x = x.unsqueeze(1).float() / 255
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return _normalise(x)


def ten_crop(x, img_size):
    """Test-time augmentation of the official recipe: resize to img_size * 236/224, take the 4 corner and the
    centre crops of img_size, and their horizontal flips. uint8 (B, H, W) -> float (B, 10, 1, S, S)."""
    big, s = round(img_size * 236 / 224), img_size
    x = preprocess(x, big)
    c = (big - s) // 2
    crops = [x[..., :s, :s], x[..., :s, -s:], x[..., -s:, :s], x[..., -s:, -s:], x[..., c:c + s, c:c + s]]
    crops = torch.stack(crops, 1)
    return torch.cat([crops, crops.flip(-1)], 1)
