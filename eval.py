"""
Evaluates an EmoNeXt checkpoint: accuracy, per-class precision/recall/F1 and the confusion matrix (text + PNG),
or the emotion probabilities of face image files; the classes are the checkpoint's (FER2013's 7 or FER+'s 8).

    python eval.py out/best.pt                          # the test split of the data it was trained on, ten-crop
    python eval.py out/best.pt --data ../shared/data/fer2013.npz --split val --tta none
    python eval.py out/best.pt --images face.jpg faces/
    python eval.py out/best.pt --images photo.jpg      # finds the faces first (pip install 'opencv-python-headless<5')
"""
import argparse
import hashlib
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
from emonext import EmoNeXt, grey_faces, read_checkpoint

DETECT_MIN_SIDE = 2 * data.IMG  # --detect auto: an image whose shorter side is below this is taken as a face crop
ANNOTATED = ".faces.png"  # suffix of the annotated photos; image_files() leaves them out of folders
OPENCV_HINT = "pip install 'opencv-python-headless<5'"


@torch.inference_mode()
def predict(model, x, img_size, tta="none", batch_size=256, amp=False):
    """Logits (N, num_classes) of uint8 faces x (N, 48, 48); tta="tencrop" averages the 10 crops' logits.
    The model runs in eval mode under inference mode: EmoNeXt's fast path (EmoNeXt._fast_eval), weights untouched."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            if tta == "tencrop":
                crops = data.ten_crop(xb, img_size).flatten(0, 1)  # (B * 10, 1, S, S)
                # batch_size crops per forward, not 10x that: smaller activations, no page-fault storm on CPUs
                logits = torch.cat([model(c) for c in crops.split(batch_size)]).view(len(xb), 10, -1).float().mean(1)
            else:
                logits = model(data.preprocess(xb, img_size)).float()
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.num_classes)


def confusion_matrix(preds, targets, num_classes):
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    return torch.bincount(targets * num_classes + preds, minlength=num_classes ** 2).view(num_classes, num_classes)


def report(cm, class_names):
    """Accuracy and per-class precision/recall/F1 of a confusion matrix, as text."""
    cm = cm.double()
    tp, true, pred = cm.diag(), cm.sum(1), cm.sum(0)
    precision, recall = tp / pred.clamp(min=1), tp / true.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    width = max(len(n) for n in class_names)
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  {precision[i]:9.3f}  {recall[i]:6.3f}  {f1[i]:5.3f}  {int(true[i]):7d}")
    lines.append(f"{'macro avg':<{width}}  {precision.mean():9.3f}  {recall.mean():6.3f}  {f1.mean():5.3f}  "
                 f"{int(true.sum()):7d}")
    lines.append("\nconfusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (width + 2) + " ".join(f"{n[:5]:>5}" for n in class_names))
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  " + " ".join(f"{int(v):5d}" for v in cm[i]))
    return "\n".join(lines)


def save_checkpoint(state, path):
    """torch.save through a temporary file: a kill leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_weights(model, ckpt, class_names, path):
    """Writes the checkpoint to ship: `model` (loaded from `ckpt`, so its EMA weights when it has them) in half
    precision on the CPU, the config, the class names and the train.py arguments that made it; no optimizer, no
    online weights. It loads with torch.load(weights_only=True), EmoNeXt.from_checkpoint (weights back in fp32)
    and eval.py."""
    state = {k: v.cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    slim = {"config": ckpt["config"], "ema": state, "class_names": list(class_names),
            "args": ckpt.get("args", {}), "iter": ckpt.get("iter"), "best_val_acc": ckpt.get("best_val_acc")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint({k: v for k, v in slim.items() if v is not None}, path)


def _save_png(image, path):
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


def save_confusion_png(cm, class_names, path, cell=64):
    """The row-normalised confusion matrix as a heat map with counts, made with pillow."""
    k = len(class_names)
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    margin = 80
    img = Image.new("RGB", (margin + k * cell + 10, margin + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    for i in range(k):
        draw.text((4, margin + i * cell + cell // 2 - 5), class_names[i], fill="black")
        draw.text((margin + i * cell + 4, margin - 28 + (i % 2) * 12), class_names[i], fill="black")
        for j in range(k):
            shade = int(255 * (1 - rates[i, j]))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            text = f"{int(cm[i, j])}\n{100 * rates[i, j]:.0f}%"
            draw.multiline_text((box[0] + 6, box[1] + 14), text, fill="black" if shade > 110 else "white")
    draw.text((4, 4), "true (rows) vs predicted (columns)", fill="black")
    _save_png(img, path)


@torch.no_grad()
def save_stn_picture(model, x, img_size, path):
    """Faces (uint8 (B, 48, 48)) beside what the STN makes of them: pairs of columns, input | warped."""
    model.eval()
    device = next(model.parameters()).device
    inputs = data.preprocess(x.to(device), img_size).expand(-1, model.config.in_chans, -1, -1)
    warped, _ = model.stn(inputs)
    pairs = torch.stack([inputs[:, :1], warped[:, :1].float()], 1)  # (B, 2, 1, S, S), first channel
    pixels = (pairs * data.STD + data.MEAN).clamp(0, 1).mul(255).round().byte().cpu()
    b, s, cols = len(x), img_size, 4
    rows = (b + cols - 1) // cols
    img = Image.new("L", (cols * (2 * s + 8), rows * (s + 4)), 255)
    for i in range(b):
        r, c = divmod(i, cols)
        for k in range(2):
            img.paste(Image.fromarray(pixels[i, k, 0].numpy()), (c * (2 * s + 8) + k * s, r * (s + 4)))
    _save_png(img, path)


def load_model(src, device, name=None):
    """(model with the EMA weights when the checkpoint has them, the train.py arguments it was made with).
    src: a path or a checkpoint dict; name: what errors call it (default: the path)."""
    ckpt = read_checkpoint(src)
    name = name or (src if isinstance(src, str) else None)
    return EmoNeXt.from_checkpoint(ckpt, name=name).to(device).eval(), ckpt.get("args", {})


def data_to_score(args, ckpt_args):
    """(dataset spec, skip_bad_rows): --data as given, else the data the checkpoint was trained on, read the way
    its run read it (a run trained with --skip-bad-rows skips the same rows here)."""
    if args.data:
        return args.data, args.skip_bad_rows
    spec = ckpt_args.get("data")
    if spec not in (None, "synthetic") and not os.path.exists(spec):
        raise ValueError(f"{args.checkpoint} was trained on {spec}, which is not there any more"
                         f"{'' if os.path.isabs(spec) else f' (from {os.getcwd()})'}; give the data with --data PATH")
    return spec, args.skip_bad_rows or ckpt_args.get("skip_bad_rows", False)


def checkpoint_class_names(ckpt, num_classes, path="checkpoint"):
    """The class names a train.py checkpoint stores; FER2013's 7 for checkpoints from before they were stored."""
    names = tuple(ckpt.get("class_names") or data.CLASS_NAMES)
    if len(names) != num_classes:
        raise ValueError(f"{path}: {len(names)} class names ({', '.join(names)}) for a model of {num_classes} classes")
    return names


def image_files(paths):
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
    _save_png(im, out)
    return out


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
                sys.exit(f"eval.py: --detect on: {e}")
            missing = e
    found = []
    for f in files:
        try:
            grey = data.read_grey(f)
        except ValueError as e:
            sys.exit(f"eval.py: {e}")
        search = mode == "on" or (mode == "auto" and min(grey.shape) >= DETECT_MIN_SIDE)
        boxes = detect(grey) if search and detect else []
        if search and detect is None:
            unsearched.append(f)
        elif search and not boxes:
            print(f"eval.py: {f}: no face found; classified the whole image", file=sys.stderr)
        boxes = boxes or [(0, 0, grey.shape[1], grey.shape[0])]  # the whole image: its centre square is the face
        faces = grey_faces([grey[y:y + h, x:x + w] for x, y, w, h in boxes])
        found.append((f, boxes, faces, search and detect is not None))
    if unsearched:
        print(f"eval.py: {len(unsearched)} image(s) larger than a face crop (first: {unsearched[0]}) were classified "
              f"whole: {missing}", file=sys.stderr)
    return found


def classify_images(model, args, names):
    """--images: one line of probabilities per face (with its box when faces were searched for), and the searched
    photos annotated. Returns the probabilities (faces, num_classes)."""
    files = list(image_files(args.images))
    if not files:
        sys.exit(f"eval.py: no image files in {args.images}")
    found = find_faces(files, args.detect)
    faces = torch.cat([faces for _, _, faces, _ in found])
    probs = predict(model, faces, model.config.img_size, args.tta, args.batch_size, args.amp).softmax(-1)
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an EmoNeXt checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--tta", choices=("tencrop", "none"), default="tencrop")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed csv rows (counted) instead of failing; without --data, on when the run was")
    p.add_argument("--images", nargs="+", help="face image files or folders: print each one's emotion probabilities")
    p.add_argument("--detect", choices=("auto", "on", "off"), default="auto",
                   help="with --images, find the faces in photos first (OpenCV's Haar cascade: "
                        f"{OPENCV_HINT}), one line per face, and draw them in <name>{ANNOTATED} beside the photo or "
                        f"in --out-dir. auto: in images whose shorter side is >= {DETECT_MIN_SIDE} px, if OpenCV is "
                        "installed (smaller images are face crops); on: in every image; off: never (each image is "
                        "one face, its centre square)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with weight freezing (EmoNeXt.for_inference): compiling takes minutes "
                        "on a small CPU, worth it for large sets only")
    p.add_argument("--channels-last", action="store_true", help="conv weights in channels-last memory format")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast: about twice the faces/s on CPUs with AVX512-BF16 or AMX (and on GPUs), "
                        "logits within bf16 rounding of fp32's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--export", metavar="PATH",
                   help="write the checkpoint to ship to PATH instead of evaluating: EMA weights in half precision, "
                        "config, class names (a few MB for atto), and print its size and sha256")
    p.add_argument("--out-dir", default=None,
                   help="where the confusion matrix PNG goes, created if need be (default: beside the checkpoint)")
    args = p.parse_args(argv)

    try:
        ckpt = read_checkpoint(args.checkpoint)
        model, ckpt_args = load_model(ckpt, args.device, name=args.checkpoint)
        names = checkpoint_class_names(ckpt, model.config.num_classes, args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
    if args.export:
        try:
            export_weights(model, ckpt, names, args.export)
        except OSError as e:
            sys.exit(f"eval.py: --export {args.export}: {e.strerror or e}")
        with open(args.export, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        print(f"{args.export}: {os.path.getsize(args.export) / 2**20:.1f} MiB, sha256 {digest}")
        return digest
    model = model.for_inference(channels_last=args.channels_last, compile=args.compile)
    img_size = model.config.img_size

    if args.images:
        return classify_images(model, args, names)

    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"eval.py: --out-dir {out_dir}: cannot create it ({e.strerror})")
    try:
        spec, skip_bad_rows = data_to_score(args, ckpt_args)
        # a FER+ model is scored on FER+'s majority labels, from the vote file it was trained with unless --data
        splits, description = data.load_dataset(spec, skip_bad_rows, labels=ckpt_args.get("labels", "fer2013"),
                                                 ferplus=None if args.data else ckpt_args.get("ferplus"))
        if len(splits["val"][1]) == 0 and "val_fraction" in ckpt_args:  # the val split train.py held out of train
            splits = data.hold_out(splits, ckpt_args["val_fraction"], ckpt_args["seed"])
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    x, y = splits[args.split]
    if len(y) == 0:
        sys.exit(f"eval.py: {description} has no {args.split} split")
    preds = predict(model, x, img_size, args.tta, args.batch_size, args.amp).argmax(-1)
    cm = confusion_matrix(preds, y, len(names))
    acc = (preds == y).double().mean().item()
    print(f"{description}\n{args.split} accuracy ({args.tta}): {100 * acc:.2f}% of {len(y)}\n")
    print(report(cm, names))
    png = os.path.join(out_dir, f"confusion_{args.split}.png")
    save_confusion_png(cm, names, png)
    print(f"\nconfusion matrix picture: {png}")
    return acc


if __name__ == "__main__":
    main()
