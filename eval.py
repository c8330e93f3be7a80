"""
Evaluates an EmoNeXt checkpoint: accuracy, per-class precision/recall/F1 and the confusion matrix (text + PNG),
or the 7 emotion probabilities of face image files.

    python eval.py out/best.pt                          # the test split of the data it was trained on, ten-crop
    python eval.py out/best.pt --data ../shared/data/fer2013.npz --split val --tta none
    python eval.py out/best.pt --images face.jpg faces/
"""
import argparse
import os
import sys

import torch
from PIL import Image, ImageDraw

import data
from emonext import EmoNeXt, read_checkpoint


@torch.no_grad()
def predict(model, x, img_size, tta="none", batch_size=256, amp=False):
    """Logits (N, num_classes) of uint8 faces x (N, 48, 48); tta="tencrop" averages the 10 crops' logits."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            if tta == "tencrop":
                crops = data.ten_crop(xb, img_size)  # (B, 10, 1, S, S)
                logits = model(crops.flatten(0, 1)).view(len(xb), 10, -1).float().mean(1)
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


def load_model(path, device):
    """(model with the EMA weights when the checkpoint has them, the train.py arguments it was made with)."""
    ckpt = read_checkpoint(path)
    return EmoNeXt.from_checkpoint(ckpt).to(device).eval(), ckpt.get("args", {})


def image_files(paths):
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                if name.lower().endswith(data.IMAGE_EXTENSIONS):
                    yield os.path.join(p, name)
        else:
            yield p


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an EmoNeXt checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--tta", choices=("tencrop", "none"), default="tencrop")
    p.add_argument("--images", nargs="+", help="face image files or folders: print each one's emotion probabilities")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None, help="where the confusion matrix PNG goes (default: beside the checkpoint)")
    args = p.parse_args(argv)

    try:
        model, ckpt_args = load_model(args.checkpoint, args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
    img_size, names = model.config.img_size, data.CLASS_NAMES

    if args.images:
        files = list(image_files(args.images))
        if not files:
            sys.exit(f"eval.py: no image files in {args.images}")
        try:
            faces = torch.stack([data.load_image(f) for f in files])
        except ValueError as e:
            sys.exit(f"eval.py: {e}")
        probs = predict(model, faces, img_size, args.tta, args.batch_size).softmax(-1)
        print("file  top  " + " ".join(f"{n:>8}" for n in names))
        for f, pr in zip(files, probs):
            print(f"{f}  {names[pr.argmax()]}  " + " ".join(f"{v:8.3f}" for v in pr.tolist()))
        return probs

    try:
        splits, description = data.load_dataset(args.data if args.data else ckpt_args.get("data"))
        if len(splits["val"][1]) == 0 and "val_fraction" in ckpt_args:  # the val split train.py held out of train
            splits = data.hold_out(splits, ckpt_args["val_fraction"], ckpt_args["seed"])
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    x, y = splits[args.split]
    if len(y) == 0:
        sys.exit(f"eval.py: {description} has no {args.split} split")
    preds = predict(model, x, img_size, args.tta, args.batch_size).argmax(-1)
    cm = confusion_matrix(preds, y, len(names))
    acc = (preds == y).double().mean().item()
    print(f"{description}\n{args.split} accuracy ({args.tta}): {100 * acc:.2f}% of {len(y)}\n")
    print(report(cm, names))
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    png = os.path.join(out_dir, f"confusion_{args.split}.png")
    save_confusion_png(cm, names, png)
    print(f"\nconfusion matrix picture: {png}")
    return acc


if __name__ == "__main__":
    main()
