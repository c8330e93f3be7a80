"""
The emotions of faces in image files with an EmoNeXt checkpoint: one line of probabilities per face, with the
checkpoint's classes (FER2013's 7 or FER+'s 8). Face crops are classified whole; in photos the faces are found
first (OpenCV's Haar cascade: pip install 'opencv-python-headless<5') and drawn in <name>.faces.png.

    python predict.py weights/emonext_atto_fer2013.pt face.jpg faces/   # face crops and folders of them
    python predict.py out/best.pt photo.jpg                            # one line per face found, photo.faces.png
    python predict.py out/best.pt photo.jpg --detect off --tta none      # the whole photo as one face, no ten-crop
"""
import argparse
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
from emonext import FACE_SIDE, EmoNeXt, grey_faces, write_atomically

DETECT_MIN_SIDE = 2 * FACE_SIDE  # --detect auto: an image whose shorter side is below this is taken as a face crop
ANNOTATED = ".faces.png"  # suffix of the annotated photos; image_files() leaves them out of folders
OPENCV_HINT = "pip install 'opencv-python-headless<5'"


def image_files(paths):
    """The files of paths, folders replaced by their image files in name order (annotated photos left out)."""
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                if name.lower().endswith(data.IMAGE_EXTENSIONS) and not name.endswith(ANNOTATED):
                    yield os.path.join(p, name)
        else:
            yield p


def face_detector():
    """OpenCV's bundled Haar cascade for frontal faces: a function uint8 grey (H, W) -> [(x, y, w, h), ...] sorted
    left to right. RuntimeError saying what to install when OpenCV or its cascade is missing."""
    try:
        import cv2
    except ImportError:
        raise RuntimeError(f"finding faces in photos needs OpenCV: {OPENCV_HINT}") from None
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out of opencv-python
        raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar face detector: {OPENCV_HINT}")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(f"OpenCV {cv2.__version__} lacks haarcascade_frontalface_default.xml: {OPENCV_HINT}")

    def detect(grey):
        boxes = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32))
        return sorted(tuple(int(v) for v in box) for box in boxes)
    return detect


def find_faces(files, mode):
    """Per image file: (path, boxes, uint8 faces (k, 48, 48), whether it was searched for faces). mode is --detect:
    "auto" searches the images whose shorter side is at least DETECT_MIN_SIDE when OpenCV is installed, "on"
    every image (OpenCV required), "off" none; an image not searched, or with no face found, is one whole face."""
    detect, missing, unsearched = None, None, []
    if mode != "off":
        try:
            detect = face_detector()
        except RuntimeError as e:
            if mode == "on":
                sys.exit(f"predict.py: --detect on: {e}")
            missing = e
    found = []
    for f in files:
        try:
            grey = data.read_grey(f)
        except ValueError as e:
            sys.exit(f"predict.py: {e}")
        search = mode == "on" or (mode == "auto" and min(grey.shape) >= DETECT_MIN_SIDE)
        boxes = detect(grey) if search and detect else []
        if search and detect is None:
            unsearched.append(f)
        elif search and not boxes:
            print(f"predict.py: {f}: no face found; classified the whole image", file=sys.stderr)
        boxes = boxes or [(0, 0, grey.shape[1], grey.shape[0])]  # the whole image: its centre square is the face
        faces = grey_faces([grey[y:y + h, x:x + w] for x, y, w, h in boxes])
        found.append((f, boxes, faces, search and detect is not None))
    if unsearched:
        print(f"predict.py: {len(unsearched)} image(s) larger than a face crop (first: {unsearched[0]}) were "
              f"classified whole: {missing}", file=sys.stderr)
    return found


def save_annotated(path, boxes, probs, names, out_dir=None):
    """The picture at path with each face's box and top emotion drawn on it, saved as <name>.faces.png beside it
    or in out_dir. Returns the PNG's path."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    draw = ImageDraw.Draw(im)
    line, font = max(2, min(im.size) // 200), ImageFont.load_default(size=max(12, min(im.size) // 30))
    for (x, y, w, h), p in zip(boxes, probs.tolist()):
        label = f"{names[p.index(max(p))]} {100 * max(p):.0f}%"
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        shift = min(y, bottom - top + 2 * line)  # the label sits on the box's top edge, inside the picture
        draw.rectangle((left - line, top - shift - line, right + line, bottom - shift + line), fill=(255, 40, 40))
        draw.text((x, y - shift), label, fill="white", font=font)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ANNOTATED)
    write_atomically(out, lambda tmp: im.save(tmp, format="PNG"))
    return out


def classify(model, args):
    """One line of probabilities per face (with its box when faces were searched for), and the searched photos
    annotated. Returns the probabilities (faces, num_classes)."""
    files = list(image_files(args.inputs))
    if not files:
        sys.exit(f"predict.py: no image files in {args.inputs}")
    found = find_faces(files, args.detect)
    faces = torch.cat([faces for _, _, faces, _ in found])
    probs = model.predict_logits(faces, args.tta, args.batch_size, args.amp).softmax(-1)
    names = model.config.class_names
    with_boxes = any(searched for *_, searched in found)
    print("file  " + ("box  " if with_boxes else "") + "top  " + " ".join(f"{n:>8}" for n in names))
    start, pictures = 0, []
    for f, boxes, _, searched in found:
        face_probs, start = probs[start:start + len(boxes)], start + len(boxes)
        for box, pr in zip(boxes, face_probs):
            where = ",".join(map(str, box)) + "  " if with_boxes else ""
            print(f"{f}  {where}{names[pr.argmax()]}  " + " ".join(f"{v:8.3f}" for v in pr.tolist()))
        if searched:
            pictures.append(save_annotated(f, boxes, face_probs, names, args.out_dir))
    for png in pictures:
        print(f"faces drawn: {png}")
    return probs


def build_parser():
    p = argparse.ArgumentParser(description="The emotions of the faces in image files, with an EmoNeXt checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of them")
    p.add_argument("--detect", choices=("auto", "on", "off"), default="auto",
                   help=f"find the faces in photos first (OpenCV's Haar cascade: {OPENCV_HINT}), one line per face, "
                        f"and draw them in <name>{ANNOTATED} beside the photo or in --out-dir. auto: in images whose "
                        f"shorter side is >= {DETECT_MIN_SIDE} px, if OpenCV is installed (smaller images are face "
                        "crops); on: in every image; off: never (each image is one face, its centre square)")
    p.add_argument("--out-dir", default=None, help="where the annotated photos go (default: beside each photo)")
    p.add_argument("--tta", choices=("tencrop", "none"), default="tencrop")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPUs with AVX512-BF16 or AMX, GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with weight freezing (EmoNeXt.for_inference): minutes on a small CPU")
    p.add_argument("--channels-last", action="store_true", help="conv weights in channels-last memory format")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model = EmoNeXt.from_checkpoint(args.checkpoint).to(args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"predict.py: {e}")
    return classify(model.for_inference(channels_last=args.channels_last, compile=args.compile), args)


if __name__ == "__main__":
    main()
