"""
FER2013 data for EmoNeXt: readers for every form the dataset ships in (the built-in synthetic faces are
synthetic.py's), and batched augmentation that runs on the training device.

Every loader returns {"train": (x, y), "val": (x, y), "test": (x, y)} with x a uint8 tensor (N, 48, 48)
and y an int64 tensor (N,). FER2013's splits map as Training -> train, PublicTest -> val,
PrivateTest -> test (the split papers report). The whole dataset stays in memory as uint8 (83 MB);
augmentation and normalisation happen later, on whole batches, wherever the model runs.

FER+ (Microsoft's 10-annotator relabelling of the same faces) comes as vote counts, y int64 (N, 10), either joined
to FER2013 by fer2013.csv row (`ferplus=".../fer2013new.csv"`) or read from Microsoft's FER+ folder tree;
`ferplus_targets` turns votes into the 8-class majority labels or vote distributions of Barsoum et al. 2016.

Bad input ends in one ValueError whose message starts with the file (and line or row) it is about.
"""

import contextlib
import csv
import math
import os
import warnings
import zipfile
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import emonext
import pictures
import synthetic

# FER2013's class names, face side (48) and grey-level mean / std are emonext.py's (FER2013_CLASS_NAMES, FACE_SIDE,
# FER2013_MEAN, FER2013_STD): the model's config records them
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
ROOT = os.path.dirname(os.path.abspath(__file__))

# FER+: the vote columns of fer2013new.csv and label.csv; the first 8 are its classes
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                   "unknown", "NF")
FERPLUS_CLASS_NAMES = FERPLUS_COLUMNS[:8]
FERPLUS_FOLDERS = {"FER2013Train": "train", "FER2013Valid": "val", "FER2013Test": "test"}
# training labels: FER2013's own, or FER+ as majority labels, vote distributions, or a label drawn from the
# distribution each time a face is seen ("probabilistic label drawing"); val and test are FER+ majority labels
LABELS = ("fer2013", "ferplus-majority", "ferplus-soft", "ferplus-draw")
# how predict.py's crops of faces the detector finds in photos frame them, against the faces' own squares (FER2013's
# framing), as `python -m studies --only crop-geometry` measures it: (mean, sd) of the crop's side over the face's,
# and of its centre's offset from the face's centre in face sides (x right, y down); --framing draws from these
DETECTOR_CROP = {"side": (0.965, 0.154), "x": (-0.005, 0.055), "y": (0.012, 0.058)}
DETECTOR_CROP_SIDES = (0.6, 1.5)  # the side ratios drawn are clipped to these


def _empty_split(label_shape=()):
    side = emonext.FACE_SIDE
    return torch.zeros(0, side, side, dtype=torch.uint8), torch.zeros(0, *label_shape, dtype=torch.int64)


def _splits(label_shape=(), **parts):
    """Fill in the splits a source lacks with empty tensors of the right shape and dtype."""
    return {name: parts.get(name) or _empty_split(label_shape) for name in ("train", "val", "test")}


def _as_tensors(x, y):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(np.asarray(y, dtype=np.int64))

# -----------------------------------------------------------------------------
# loaders

def load_fer2013(path, skip_bad_rows=False, ferplus=None):
    """Read FER2013 from a csv file, an image-folder tree or an .npz (format chosen from the path).

    With ferplus (the path of FER+'s fer2013new.csv) each split's y is instead the FER+ vote counts, int64
    (N, 10) in FERPLUS_COLUMNS order, joined by fer2013.csv row (a csv: its row order; an .npz: its
    <split>_csv_index arrays); faces FER+ dropped or that cannot be joined are left out, the pixels stay
    FER2013's. Microsoft's FER+ folder tree (FER2013Train/ ...) always gives vote counts."""
    return _load_fer2013(path, skip_bad_rows, ferplus)[0]


def _load_fer2013(path, skip_bad_rows, ferplus):
    """(splits, note), the note saying what a FER+ join left out ("" without one)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if is_ferplus_tree(path):
            if ferplus is not None:
                raise ValueError(f"{path}: a FER+ folder tree holds its own votes; do not also give {ferplus}")
            return _load_ferplus_folders(path), ""
        if ferplus is not None:
            raise ValueError(f"{path}: image folders do not say which fer2013.csv row each face is, so they cannot "
                             "be joined with FER+ votes; use fer2013.csv, fer2013.npz or Microsoft's FER+ folders")
        return _load_folders(path), ""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    splits, csv_rows, n_rows = _load_npz(path) if path.lower().endswith(".npz") else _load_csv(path, skip_bad_rows)
    if ferplus is None:
        return splits, ""
    return _join_ferplus(splits, csv_rows, n_rows, path, os.fspath(ferplus))


@contextlib.contextmanager
def _unparsed_text_is_an_error():
    """numpy 1.18 to 2.2 only warn when np.fromstring meets text it cannot parse, and return the numbers before it
    (a row ending in "255 x" would pass as 2304 pixels): inside this, that warning is raised as an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "string or file could not be read", DeprecationWarning)
        yield


def _read_csv(path):
    """[(line, fields)] of a csv file's non-empty rows; line is the row's last physical line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if row]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a csv file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text csv file (it does not decode as UTF-8)") from None
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: unreadable csv ({e})") from None


def _csv_columns(path, rows):
    """The header of a FER2013 csv, taken off `rows` -> (its number of fields, the emotion, pixels and Usage
    columns; Usage None when absent)."""
    header_line, header = rows.pop(0) if rows else (1, [])
    header = [name.strip().lower() for name in header]
    if not header:
        raise ValueError(f"{path}: empty file")
    if "pixels" not in header:
        raise ValueError(f"{path}, line {header_line}: missing column 'pixels' (header is {','.join(header)!r}; "
                         "expected a header like emotion,pixels,Usage)")
    if "emotion" not in header:
        raise ValueError(f"{path}: no 'emotion' column, so these faces are unlabelled (like the competition's "
                         "test.csv) and cannot be used for training or evaluation; use fer2013.csv, "
                         "icml_face_data.csv or train.csv")
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    i_usage = header.index("usage") if "usage" in header else None
    return len(header), header.index("emotion"), header.index("pixels"), i_usage


@_unparsed_text_is_an_error()
def _load_csv(path, skip_bad_rows):
    """Kaggle fer2013.csv (emotion,pixels,Usage), icml_face_data.csv (same columns, other order, names with
    leading spaces) and the competition's train.csv (no Usage: all rows are train).
    Returns (splits, the fer2013.csv row of each face per split, the number of data rows)."""
    rows = _read_csv(path)
    n_fields, i_label, i_pixels, i_usage = _csv_columns(path, rows)

    # pixels go straight into one uint8 array; np.fromstring parses each 2304-int row in C
    side = emonext.FACE_SIDE
    x = np.empty((len(rows), side * side), dtype=np.uint8)
    y = np.empty(len(rows), dtype=np.int64)
    split, kept = [], []  # split name and data-row number of each kept row
    bad = []  # (line, reason) of each rejected row
    for i, (line, row) in enumerate(rows):
        reason = None
        if len(row) != n_fields:
            reason = f"expected {n_fields} fields, got {len(row)}"
        else:
            label, usage = row[i_label].strip(), row[i_usage].strip() if i_usage is not None else "Training"
            try:
                pixels = np.fromstring(row[i_pixels], dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):  # numpy >= 2.3 raises; 1.18 to 2.2 warn (an error here)
                pixels = None
            if label not in ("0", "1", "2", "3", "4", "5", "6"):
                reason = f"label {label!r} is not an integer in 0..6"
            elif usage not in USAGE_TO_SPLIT:
                reason = f"Usage {usage!r} is not one of Training, PublicTest, PrivateTest"
            elif pixels is None:
                reason = f"pixels must be {side * side} space-separated integers in 0..255, got other text"
            elif pixels.size != side * side:
                reason = f"pixels must be {side * side} space-separated integers in 0..255, got {pixels.size} values"
            elif pixels.min() < 0 or pixels.max() > 255:
                reason = (f"pixels must be {side * side} space-separated integers in 0..255, "
                          f"got {pixels.min()}..{pixels.max()}")
        if reason:
            bad.append((line, reason))
            continue
        x[len(split)], y[len(split)] = pixels, int(label)
        split.append(USAGE_TO_SPLIT[usage])
        kept.append(i)

    if bad:
        first_line, first_reason = bad[0]
        if not skip_bad_rows:
            more = f" ({len(bad) - 1} more bad rows; skip_bad_rows=True skips them)" if len(bad) > 1 else ""
            raise ValueError(f"{path}, line {first_line}: {first_reason}{more}")
        print(f"{path}: skipped {len(bad)} bad rows of {len(rows)} (first: line {first_line}: {first_reason})")
        if not split:
            raise ValueError(f"{path}: every row is bad, nothing left to load")
    x, y, split, kept = x[:len(split)].reshape(-1, side, side), y[:len(split)], np.array(split), np.array(kept)
    splits = _splits(**{name: _as_tensors(x[split == name], y[split == name]) for name in set(split)})
    return splits, {name: kept[split == name] for name in splits}, len(rows)


def _load_folders(path):
    """Image folders train/<class>/* and test/<class>/* (and val/<class>/* if present), as in Kaggle's
    image release; test files named PublicTest_* go to val, the rest of test/ is the test split."""
    split_dirs = [name for name in ("train", "val", "test") if os.path.isdir(os.path.join(path, name))]
    if not split_dirs:
        raise ValueError(f"{path}: no train/, val/ or test/ folder (expected train/<class>/*.jpg and "
                         f"test/<class>/*.jpg with <class> one of {', '.join(emonext.FER2013_CLASS_NAMES)})")
    files = {"train": [], "val": [], "test": []}
    for split in split_dirs:
        split_dir, found = os.path.join(path, split), 0
        for cls in sorted(os.listdir(split_dir)):
            cls_dir = os.path.join(split_dir, cls)
            if cls.startswith(".") or not os.path.isdir(cls_dir):
                continue
            if cls.lower() not in emonext.FER2013_CLASS_NAMES:
                raise ValueError(f"{cls_dir}: unknown class folder {cls!r} "
                                 f"(expected one of {', '.join(emonext.FER2013_CLASS_NAMES)})")
            for name in sorted(os.listdir(cls_dir)):
                if name.startswith(".") or not name.lower().endswith(pictures.IMAGE_EXTENSIONS):
                    continue
                target = "val" if split == "test" and name.startswith("PublicTest_") else split
                files[target].append((os.path.join(cls_dir, name), emonext.FER2013_CLASS_NAMES.index(cls.lower())))
                found += 1
        if not found:
            raise ValueError(f"{split_dir}: no images (expected {split}/<class>/*.jpg with <class> one of "
                             f"{', '.join(emonext.FER2013_CLASS_NAMES)})")
    return _splits(**{split: (emonext.grey_faces([pictures.read_grey(f) for f, _ in items]),
                              torch.tensor([c for _, c in items], dtype=torch.int64))
                       for split, items in files.items() if items})


def _load_npz(path):
    """The arrays of ../shared/data/fer2013.npz: train_*, public_test_* (val), private_test_* (test);
    test_* (public + private together) stands in for test when the private split is absent.
    Returns (splits, each split's <prefix>_csv_index (None where absent), None: the fer2013.csv size is unknown)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    prefixes = {"train": "train", "val": "public_test", "test": "private_test" if "private_test_x" in arrays else "test"}
    parts, csv_rows = {}, {}
    for split, prefix in prefixes.items():
        kx, ky, ki = f"{prefix}_x", f"{prefix}_y", f"{prefix}_csv_index"
        if kx not in arrays and ky not in arrays:
            continue
        if kx not in arrays or ky not in arrays:
            raise ValueError(f"{path}: has {kx if kx in arrays else ky} but not {ky if kx in arrays else kx}")
        x, y = arrays[kx], arrays[ky]
        if x.ndim != 3 or x.shape[1:] != (emonext.FACE_SIDE,) * 2 or y.shape != (len(x),):
            raise ValueError(f"{path}: {kx} {x.shape} and {ky} {y.shape} should be (N, 48, 48) and (N,)")
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: {kx} is {x.dtype}, expected uint8 grey levels")
        bad = np.flatnonzero((y < 0) | (y > 6)) if np.issubdtype(y.dtype, np.integer) else np.arange(len(y))
        if len(bad):
            raise ValueError(f"{path}: {ky} row {bad[0]}: label {y[bad[0]]} is not an integer in 0..6")
        if ki in arrays and (arrays[ki].shape != (len(x),) or not np.issubdtype(arrays[ki].dtype, np.integer)):
            raise ValueError(f"{path}: {ki} is {arrays[ki].dtype} {arrays[ki].shape}, expected integers ({len(x)},)")
        parts[split] = _as_tensors(x, y)
        csv_rows[split] = arrays[ki].astype(np.int64) if ki in arrays else None
    if not parts:
        raise ValueError(f"{path}: none of the arrays train_x/y, public_test_x/y, private_test_x/y "
                         f"(found {', '.join(arrays) or 'no arrays'})")
    return _splits(**parts), csv_rows, None


# -----------------------------------------------------------------------------
# FER+: 10 crowd votes per face over 8 emotions + unknown + not-a-face (NF)

class FerPlusVotes(NamedTuple):
    """fer2013new.csv, one entry per data row (= per fer2013.csv row)."""
    votes: np.ndarray  # int64 (R, 10), FERPLUS_COLUMNS order
    split: np.ndarray  # str (R,): train / val / test, from the Usage column
    dropped: np.ndarray  # bool (R,): FER+ names no image, it dropped the face
    line: np.ndarray  # int64 (R,): the row's line in the file, for messages


def _parse_votes(fields, where):
    """10 vote fields -> list of ints; anything but a non-negative integer is an error naming `where`."""
    for name, v in zip(FERPLUS_COLUMNS, fields):
        if not (v.strip().isascii() and v.strip().isdigit()):
            raise ValueError(f"{where}: {name} vote {v!r} is not a non-negative integer")
    return [int(v) for v in fields]


def load_ferplus_votes(path):
    """Microsoft's fer2013new.csv (header Usage,Image name,<FERPLUS_COLUMNS>) -> FerPlusVotes."""
    path = os.fspath(path)
    rows = _read_csv(path)
    expected = ["usage", "image name"] + [c.lower() for c in FERPLUS_COLUMNS]
    if not rows or [h.strip().lower() for h in rows[0][1]] != expected:
        got = ",".join(rows[0][1]) if rows else "an empty file"
        raise ValueError(f"{path}, line 1: not FER+'s header (expected Usage,Image name,{','.join(FERPLUS_COLUMNS)}; "
                         f"got {got!r})")
    votes, split, dropped, lines = [], [], [], []
    for line, row in rows[1:]:
        if len(row) != 2 + len(FERPLUS_COLUMNS):
            raise ValueError(f"{path}, line {line}: expected {2 + len(FERPLUS_COLUMNS)} fields, got {len(row)}")
        if row[0].strip() not in USAGE_TO_SPLIT:
            raise ValueError(f"{path}, line {line}: Usage {row[0]!r} is not one of Training, PublicTest, PrivateTest")
        votes.append(_parse_votes(row[2:], f"{path}, line {line}"))
        split.append(USAGE_TO_SPLIT[row[0].strip()])
        dropped.append(not row[1].strip())
        lines.append(line)
    if not votes:
        raise ValueError(f"{path}: no data rows after the header")
    return FerPlusVotes(np.array(votes, dtype=np.int64), np.array(split), np.array(dropped), np.array(lines))


def _join_ferplus(splits, csv_rows, n_rows, path, ferplus):
    """FER2013 splits + the fer2013.csv row of each face -> (vote splits, note on what was left out)."""
    fp = load_ferplus_votes(ferplus)
    if n_rows is not None and n_rows != len(fp.votes):
        raise ValueError(f"{ferplus}: {len(fp.votes)} data rows, but {path} has {n_rows}; FER+ votes join "
                         "fer2013.csv row by row, so the two files must have the same rows")
    parts, notes = {}, []
    for name, (x, _) in splits.items():
        rows = csv_rows.get(name, np.zeros(0, np.int64))
        if rows is None:
            raise ValueError(f"{path}: no csv_index array for its {name} split, so its faces cannot be joined "
                             "with FER+ votes")
        if len(rows) and rows.max() >= len(fp.votes):
            raise ValueError(f"{path}: {name} face {rows.argmax()} is fer2013.csv row {rows.max()}, beyond the "
                             f"{len(fp.votes)} rows of {ferplus}")
        joined, r = rows >= 0, rows.clip(min=0)
        wrong = np.flatnonzero(joined & (fp.split[r] != name))
        if len(wrong):
            i = wrong[0]
            raise ValueError(f"{ferplus}, line {fp.line[r[i]]}: a {fp.split[r[i]]} row, but it is the row of {name} "
                             f"face {i} of {path}; the two files do not match row for row")
        keep = joined & ~fp.dropped[r]
        parts[name] = (x[torch.from_numpy(keep)], torch.from_numpy(fp.votes[r[keep]]))
        notes.append(f"{name} {int((joined & fp.dropped[r]).sum())} + {int((~joined).sum())}")
    return parts, (f"FER+ votes from {ferplus}; left out (dropped by FER+ + of unknown fer2013.csv row): "
                   + ", ".join(notes))


def is_ferplus_tree(path):
    return any(os.path.isdir(os.path.join(path, folder)) for folder in FERPLUS_FOLDERS)


def _load_ferplus_folders(path):
    """Microsoft's FER+ layout: FER2013Train/, FER2013Valid/, FER2013Test/, each with a label.csv of rows
    `ferXXXXXXX.png,"(x, y, w, h)",<10 votes>` (no header) and those PNGs beside it. The box is not used:
    the PNGs are FER2013's 48x48 crops (Microsoft's training code uses the whole image too)."""
    parts = {}
    for folder, split in FERPLUS_FOLDERS.items():
        label_csv = os.path.join(path, folder, "label.csv")
        if not os.path.isdir(os.path.dirname(label_csv)):
            continue
        faces, votes = [], []
        for line, row in _read_csv(label_csv):
            if len(row) != 2 + len(FERPLUS_COLUMNS):
                raise ValueError(f"{label_csv}, line {line}: expected {2 + len(FERPLUS_COLUMNS)} fields "
                                 f"(file name, face box, {len(FERPLUS_COLUMNS)} votes), got {len(row)}")
            votes.append(_parse_votes(row[2:], f"{label_csv}, line {line}"))
            faces.append(pictures.read_grey(os.path.join(path, folder, row[0].strip())))
        if not faces:
            raise ValueError(f"{label_csv}: no rows")
        parts[split] = emonext.grey_faces(faces), torch.tensor(votes, dtype=torch.int64)
    return _splits(label_shape=(len(FERPLUS_COLUMNS),), **parts)


def ferplus_targets(votes, mode):
    """Barsoum et al. 2016's targets from vote counts (N, 10) -> (keep bool (N,), targets of the kept faces).

    Votes of 1 are dropped as outliers first. "majority": int64 (K,) class of the emotion with more than half
    of the remaining votes; a face without one, or whose majority is unknown / not-a-face, is dropped.
    "soft": float32 (K, 8) the remaining votes over the 8 emotions, normalised; a face is dropped when no
    emotion has more votes than unknown and than not-a-face (a tie with either drops it too)."""
    v = torch.where(votes > 1, votes, 0)
    if mode == "majority":
        top, winner = v.max(1)
        keep = (2 * top > v.sum(1)) & (winner < len(FERPLUS_CLASS_NAMES))
        return keep, winner[keep]
    if mode == "soft":
        emotions = v[:, :len(FERPLUS_CLASS_NAMES)]
        keep = emotions.max(1).values > v[:, len(FERPLUS_CLASS_NAMES):].max(1).values
        kept = emotions[keep].float()
        return keep, kept / kept.sum(1, keepdim=True)
    raise ValueError(f"unknown FER+ label mode {mode!r}: expected majority or soft")


def ferplus_labels(splits, labels):
    """Vote splits -> (splits with the targets `labels` asks for, note on the faces left out). The train split
    gets majority labels (ferplus-majority) or vote distributions (ferplus-soft, ferplus-draw); val and test
    always get majority labels, the protocol FER+ results are reported with."""
    parts, notes = {}, []
    for name, (x, votes) in splits.items():
        mode = "soft" if name == "train" and labels in ("ferplus-soft", "ferplus-draw") else "majority"
        keep, y = ferplus_targets(votes, mode)
        parts[name] = x[keep], y
        notes.append(f"{name} {int((~keep).sum())} ({mode})")
    return parts, "left out by the label rule: " + ", ".join(notes)


def draw_labels(dist, generator=None):
    """One class per face drawn from its distribution (B, C) -> int64 (B,), on the CPU generator's stream."""
    return torch.multinomial(dist.cpu(), 1, generator=generator).squeeze(1).to(dist.device)


def class_names(labels):
    """The class names of a LABELS choice: FER2013's 7 or FER+'s 8."""
    return emonext.FER2013_CLASS_NAMES if labels == "fer2013" else FERPLUS_CLASS_NAMES


def target_classes(y):
    """Classes (N,) of targets: classes as they are, distributions (N, C) (FER+ soft) their most likely class."""
    return y.argmax(-1) if y.ndim == 2 else y


def hold_out(splits, fraction, seed):
    """The splits with a seeded `fraction` of train moved to val, class by class (each class gives
    round(fraction * its count) faces, so val keeps train's class balance); test is untouched. For sources
    without a val split (the competition's train.csv, a train-only .npz or folder tree): models are then
    selected on faces of their own, never on the test split."""
    x, y = splits["train"]
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(y), dtype=torch.bool)
    classes = target_classes(y)  # FER+ soft targets: stratified by their most-voted emotion
    for c in classes.unique().tolist():
        faces = torch.nonzero(classes == c).flatten()
        faces = faces[torch.randperm(len(faces), generator=generator)]
        is_val[faces[:round(fraction * len(faces))]] = True
    if not is_val.any() or is_val.all():
        raise ValueError(f"holding out {fraction:g} of {len(y)} training faces, class by class, leaves "
                         f"{'no val' if not is_val.any() else 'no train'} faces")
    return {**splits, "train": (x[~is_val], y[~is_val]), "val": (x[is_val], y[is_val])}

def find_default_data():
    """data/fer2013.csv or data/fer2013.npz under the repo if present, else "synthetic"."""
    for name in ("fer2013.csv", "fer2013.npz"):
        path = os.path.join(ROOT, "data", name)
        if os.path.exists(path):
            return path
    return "synthetic"


def load_dataset(spec=None, skip_bad_rows=False, labels="fer2013", ferplus=None):
    """spec: None (the default data), "synthetic", or a path for load_fer2013; labels: one of LABELS; ferplus:
    FER+'s fer2013new.csv for the FER+ labels (default: beside spec; not used with FER+'s own folder tree).
    Returns (splits, description)."""
    spec = find_default_data() if spec is None else spec
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r}: expected one of {', '.join(LABELS)}")
    if labels == "fer2013" and ferplus is not None:
        raise ValueError(f"{ferplus}: FER+ votes are read only for FER+ labels ({', '.join(LABELS[1:])})")
    if spec == "synthetic":
        if labels != "fer2013":
            raise ValueError(f"synthetic faces have FER2013's 7 classes and no FER+ votes; labels {labels} "
                             "needs FER2013 faces with FER+ votes")
        splits, what = synthetic.synthetic_faces(), "synthetic faces (built in; put FER2013 at data/fer2013.csv or .npz to use it)"
    elif labels == "fer2013":
        splits, what = load_fer2013(spec, skip_bad_rows), f"FER2013 from {spec}"
        if splits["train"][1].ndim != 1:
            raise ValueError(f"{spec}: holds FER+ votes, not FER2013 labels; choose FER+ labels "
                             f"({', '.join(LABELS[1:])})")
    else:
        if ferplus is None and not (os.path.isdir(spec) and is_ferplus_tree(spec)):
            ferplus = os.path.join(os.path.dirname(os.path.abspath(spec)), "fer2013new.csv")
        splits, join_note = _load_fer2013(spec, skip_bad_rows, ferplus)
        splits, label_note = ferplus_labels(splits, labels)
        what = "; ".join(filter(None, [f"faces from {spec} with FER+ labels ({labels})", join_note, label_note]))
    sizes = " / ".join(f"{name} {len(splits[name][1])}" for name in ("train", "val", "test"))
    return splits, f"{what}: {sizes}"

# -----------------------------------------------------------------------------
# batches and augmentation, on whole uint8 batches wherever they live

def augment(x, img_size, generator=None, rotate=10.0, scale=(0.9, 1.1), translate=0.05, hflip=True, vflip=False,
            framing=0.0, rows=None, mean=emonext.FER2013_MEAN, std=emonext.FER2013_STD):
    """uint8 (B, H, W) -> normalised float (B, 1, img_size, img_size) through ONE affine warp per sample:
    rotation up to `rotate` degrees, zoom in `scale`, shift up to `translate` of the image (or, for a share
    `framing` of the faces, the zoom and shift of a detector's crop: random_pose), random flips,
    and the resize to img_size, all folded into one matrix for affine_grid + grid_sample; then (x - mean) / std.
    rows=(start, total): x is rows start..start+B of a batch of `total` faces (one process's share of a global
    batch); the parameters of all `total` are drawn and x takes its rows', so any split augments each face alike.
    The defaults are train.py's: up to 10 degrees, zoom 0.9 to 1.1, shift up to 0.05, horizontal flips."""
    start, total = rows or (0, x.shape[0])
    pose = random_pose(total, generator, rotate, scale, translate, hflip, vflip, framing)
    return warp(x, img_size, **{k: v[start:start + x.shape[0]] for k, v in pose.items()}, mean=mean, std=std)


def random_erase(x, p, generator=None, rows=None):
    """timm's RandomErasing (mode "pixel", one box): each normalised face of x (B, 1, S, S), with probability p, gets
    a box of 2% to 1/3 of its area, aspect ratio 0.3 to 3.3, filled with N(0, 1) noise. rows=(start, total) as in
    `augment`: the boxes and the noise of all `total` faces are drawn and x takes its rows'."""
    start, total = rows or (0, x.shape[0])
    b, s = x.shape[0], x.shape[-1]
    r = torch.rand(total, 5, generator=generator)[start:start + b]
    noise = torch.randn(total, 1, s, s, generator=generator)[start:start + b]
    area = (0.02 + (1 / 3 - 0.02) * r[:, 1]) * s * s
    aspect = torch.exp(math.log(0.3) + 2 * math.log(1 / 0.3) * r[:, 2])  # log-uniform in [0.3, 1 / 0.3]
    h, w = ((area * aspect).sqrt().round().clamp(1, s), (area / aspect).sqrt().round().clamp(1, s))
    top, left = ((s - h) * r[:, 3]).floor(), ((s - w) * r[:, 4]).floor()
    ys, xs = torch.arange(s)[None, :, None], torch.arange(s)[None, None, :]
    inside = (ys >= top[:, None, None]) & (ys < (top + h)[:, None, None]) & (xs >= left[:, None, None]) \
        & (xs < (left + w)[:, None, None])
    erase = (inside & (r[:, 0] < p)[:, None, None])[:, None]  # (b, 1, S, S)
    return torch.where(erase.to(x.device), noise.to(x.device, x.dtype), x)


def draw_mix(generator, side, mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5):
    """How a batch is mixed (timm's Mixup in "batch" mode): None (not mixed) or (lam, box). box None: mixup, each face
    lam * itself + (1 - lam) * its partner, lam ~ Beta(mixup, mixup); else cutmix: the partner's box (top, left, h,
    w) pasted into every face, of area about 1 - lam for lam ~ Beta(cutmix, cutmix), and lam the share of the face
    left (the box clipped to the face). With both on, a mixed batch is cut-mixed with probability switch_prob."""
    if not (mixup or cutmix):
        return None
    r = torch.rand(2, generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))  # for the Beta draw
    if r[0] >= prob:
        return None
    use_cutmix = cutmix > 0 and (mixup == 0 or r[1] < switch_prob)
    lam = float(rng.beta(*(2 * [cutmix if use_cutmix else mixup])))
    if not use_cutmix:
        return lam, None
    cut = side * math.sqrt(1 - lam)
    cy, cx = (torch.rand(2, generator=generator) * side).tolist()
    top, bottom = int(max(cy - cut / 2, 0)), int(min(cy + cut / 2, side))
    left, right = int(max(cx - cut / 2, 0)), int(min(cx + cut / 2, side))
    return 1 - (bottom - top) * (right - left) / side ** 2, (top, left, bottom - top, right - left)


def soft_targets(y, num_classes):
    """Targets as distributions (N, C): classes one-hot, distributions as they are."""
    return y.float() if y.ndim == 2 else F.one_hot(y, num_classes).float()


def mix(x, y, partner_x, partner_y, lam, box=None):
    """Faces x (b, 1, S, S) and their targets y (b, C) mixed with their partners' as draw_mix says: mixup
    x * lam + partner_x * (1 - lam), or cutmix with the partner's box pasted in; y * lam + partner_y * (1 - lam)."""
    if box is None:
        x = x * lam + partner_x * (1 - lam)
    else:
        top, left, h, w = box
        x = x.clone()
        x[..., top:top + h, left:left + w] = partner_x[..., top:top + h, left:left + w]
    return x, y * lam + partner_y * (1 - lam)


def random_pose(b, generator=None, rotate=10.0, scale=(0.9, 1.1), translate=0.05, hflip=True, vflip=False,
                framing=0.0):
    """`augment`'s random parameters of b faces, drawn on the CPU generator so that CPU and GPU runs draw the same:
    angle (radians, counter-clockwise on screen), zoom (> 1 enlarges), shift (b, 2) (x right, y down, as fractions
    of the side), flip_x and flip_y (-1: mirror). Defaults as `augment`'s (train.py's). framing: the probability
    that a face's zoom and shift are instead those of a crop framed like predict.py's of a detected face, its side
    and centre drawn from normal laws with DETECTOR_CROP's means and sds (the side clipped to DETECTOR_CROP_SIDES)."""
    r = torch.rand(b, 6, generator=generator)
    pose = dict(angle=(2 * r[:, 0] - 1) * math.radians(rotate), zoom=scale[0] + (scale[1] - scale[0]) * r[:, 1],
                shift=(1 - 2 * r[:, 2:4]) * translate, flip_x=torch.where((r[:, 4] < 0.5) & hflip, -1.0, 1.0),
                flip_y=torch.where((r[:, 5] < 0.5) & vflip, -1.0, 1.0))
    if framing:  # drawn after the rest, so that runs without it draw as they always did
        framed, z = torch.rand(b, generator=generator) < framing, torch.randn(b, 3, generator=generator)
        (side, side_sd), (cx, cx_sd), (cy, cy_sd) = (DETECTOR_CROP[k] for k in ("side", "x", "y"))
        side = (side + side_sd * z[:, 0]).clamp(*DETECTOR_CROP_SIDES)  # the crop's side / the face's
        centre = torch.stack([cx + cx_sd * z[:, 1], cy + cy_sd * z[:, 2]], 1)  # the crop's centre, in face sides
        # the crop enlarges the face by 1 / side and moves it opposite to its own offset
        pose["zoom"] = torch.where(framed, 1 / side, pose["zoom"])
        pose["shift"] = torch.where(framed[:, None], -centre, pose["shift"])
    return pose


def warp(x, img_size, angle, zoom, shift, flip_x, flip_y, mean=emonext.FER2013_MEAN, std=emonext.FER2013_STD):
    """uint8 (B, H, W) -> normalised float (B, 1, img_size, img_size), (x / 255 - mean) / std: each face mirrored by
    its flips, moved by its shift, then turned by its angle and scaled by its zoom about the centre (parameters as
    random_pose's)."""
    b = x.shape[0]
    # the matrix maps output to input, so every step is inverted: zoom in = shrink, shift = minus the move
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    move = -2 * shift  # grid coordinates span 2 across the image
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1) * flip_x[:, None],
                         torch.stack([sin, cos, move[:, 1]], 1) * flip_y[:, None]], 1)
    grid = F.affine_grid(theta.to(x.device), (b, 1, img_size, img_size), align_corners=False)
    # reflection padding: no black corners for the model to key on, and an identity warp equals emonext.preprocess
    out = F.grid_sample(x.unsqueeze(1).float() / 255, grid, padding_mode="reflection", align_corners=False)
    return (out - mean) / std

