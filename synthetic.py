"""
The built-in synthetic faces: 48x48 grey faces of FER2013's 7 expressions (angry, disgust, fear, happy, sad,
surprise, neutral: the label is the index), drawn with pillow under random pose and lighting. They are train.py's
default data when FER2013 is not around, and the test suite's and the tools' faces.

    splits = synthetic_faces()   # {"train": (x, y), "val": (x, y), "test": (x, y)}: uint8 (N, 48, 48), int64 (N,)

And scenes and clips of such 48x48 faces (FER2013's, in the tests, bench.py and studies.py) pasted at known places
into larger pictures (these need OpenCV, opencv-python-headless):

    grey, truth = make_scene(np.random.default_rng(0), faces)   # uint8 (480, 640), [(x, y, side, side)]
    truth = video_clip("clip.mp4", 30, [(face, 120, 0, 360)], rng)   # a 640x360 clip, boxes per frame
"""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from emonext import FACE_SIDE as SIDE


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
    a, b, c = np.cos(angle) / zoom, np.sin(angle) / zoom, SIDE / 2
    im = im.reduce(2).transform((SIDE, SIDE), Image.AFFINE, (a, b, c - a * c - b * c + tx, -b, a, c + b * c - a * c + ty),
                                resample=Image.BILINEAR, fillcolor=int(bg))
    return np.asarray(im, dtype=np.uint8)


def _synthetic_split(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(_EXPRESSIONS))  # balanced classes
    x = np.stack([_draw_face(rng, int(c)) for c in y]).astype(np.float32) if n else np.zeros((0, SIDE, SIDE), np.float32)
    # lighting: a linear gradient in a random direction, contrast and brightness, then sensor noise
    ramp = np.linspace(-1, 1, SIDE, dtype=np.float32)
    phi = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    x *= 1 + rng.uniform(0, 0.4, (n, 1, 1)).astype(np.float32) * (np.cos(phi) * ramp + np.sin(phi) * ramp[:, None])
    x = (x - 128) * rng.uniform(0.6, 1.2, (n, 1, 1)).astype(np.float32) + 128 + rng.uniform(-30, 30, (n, 1, 1)).astype(np.float32)
    x += rng.standard_normal((n, SIDE, SIDE), dtype=np.float32) * rng.uniform(0, 8, (n, 1, 1)).astype(np.float32)
    return torch.from_numpy(np.clip(np.round(x), 0, 255).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))


def synthetic_faces(n_train=7000, n_val=700, n_test=1400, seed=0):
    """Procedurally drawn 48x48 grey faces of the 7 FER2013 expressions, with random pose and lighting.
    Each split has its own random stream, so changing one split's size leaves the others unchanged."""
    return {name: _synthetic_split(n, [seed, i]) for i, (name, n) in enumerate(
        (("train", n_train), ("val", n_val), ("test", n_test)))}


# scenes: 48x48 faces pasted into larger pictures

def background(rng, w, h, kind):
    """float32 (h, w): "noise" (smooth noise at several scales) or "gradient" (a ramp plus noise)."""
    import cv2
    if kind == "noise":
        img = np.zeros((h, w), np.float32)
        for cell, amp in ((64, 60), (16, 30), (4, 15), (1, 8)):
            small = rng.normal(0, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
            img += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        return img + rng.uniform(70, 180)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy) / max(w, h) - 0.5
    return rng.uniform(60, 190) + rng.uniform(30, 90) * ramp + rng.normal(0, 6, (h, w)).astype(np.float32)


def paste_face(canvas, face48, x, y, side, angle=0.0):
    """A 48x48 face upscaled (bicubic) to side, turned by angle degrees, blended into canvas at (x, y) with its
    border feathered over 8% of its side."""
    import cv2
    f = cv2.resize(face48.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    if angle:
        m = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, 1.0)
        f = cv2.warpAffine(f, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    d = np.minimum(np.arange(side), side - 1 - np.arange(side))
    ramp = np.clip((d + 1) / (0.08 * side), 0, 1)
    alpha = np.minimum(ramp[:, None], ramp[None, :])
    canvas[y:y + side, x:x + side] = alpha * f + (1 - alpha) * canvas[y:y + side, x:x + side]


def make_scene(rng, fer_x, w=640, h=480, n_faces=3, sides=(80, 200), max_angle=10.0, kind="noise"):
    """A grey uint8 (h, w) scene with n_faces PrivateTest faces at random places (8 px apart at least) and their
    pasted squares (x, y, side, side), left to right; n_faces=0: a face-free scene."""
    canvas, truth = background(rng, w, h, kind), []
    for _ in range(n_faces):
        side = int(rng.integers(sides[0], sides[1] + 1))
        for _ in range(200):
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            if all(x + side + 8 <= a or a + s + 8 <= x or y + side + 8 <= b or b + s + 8 <= y for a, b, s, _ in truth):
                break
        else:
            continue
        paste_face(canvas, fer_x[int(rng.integers(len(fer_x)))], x, y, side, rng.uniform(-max_angle, max_angle))
        truth.append((x, y, side, side))
    canvas += rng.normal(0, 3, canvas.shape)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), sorted(truth)


def video_clip(path, frames, faces, rng):
    """Writes a 640x360 mp4v clip at 30 fps of faces [(48x48 face, side, top, bottom)] drifting over smooth noise,
    each across the width and between rows top and bottom, face k a phase of k radians later (paste_face).
    Returns per frame the pasted squares (x, y, side, side)."""
    import cv2
    background = sum(amp * cv2.resize(rng.normal(0, 1, (360 // cell + 2, 640 // cell + 2)).astype(np.float32),
                                      (640, 360), interpolation=cv2.INTER_CUBIC) for cell, amp in ((64, 60), (8, 20)))
    writer, truth = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 360)), []
    for t in range(frames):
        canvas, boxes = background + 128, []
        for k, (face, side, top, bottom) in enumerate(faces):
            x = int((640 - side) / 2 * (1 + 0.9 * math.sin(t / 25 + k)))
            y = int(top + (bottom - top - side) / 2 * (1 + 0.8 * math.sin(t / 33 + k)))
            paste_face(canvas, face, x, y, side)
            boxes.append((x, y, side, side))
        writer.write(cv2.cvtColor(np.clip(canvas, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
        truth.append(boxes)
    writer.release()
    return truth
