"""
Evaluates an EmoNeXt checkpoint, or an ONNX file of export.py, on a dataset: accuracy, per-class precision/recall/F1
and the confusion matrix (text + PNG), with the model's classes (FER2013's 7 or FER+'s 8). The files to ship:
export.py. Emotions of face images and photos: predict.py.

    python eval.py out/best.pt                          # the test split of the data it was trained on, ten-crop
                                                        # (its confusion matrix: out/best_confusion_test.png)
    python eval.py out/best.pt --data ../shared/data/fer2013.npz --split val --tta none
    python eval.py weights/emonext_atto_fer2013_int8.onnx --data ../shared/data/fer2013.npz   # onnxruntime, plain
    python eval.py weights/emonext_atto_ferplus.pt --data DIR/fer2013.npz --ferplus ELSEWHERE/fer2013new.csv
"""
import argparse
import json
import os
import sys
import tempfile

import torch

import cli
import data
import figures
from emonext import DEFAULT_TTA, TTA_MODES, EmoNeXt, read_checkpoint, write_atomically


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


def load_model(src, device, name=None):
    """(model with the EMA weights when the checkpoint has them, the train.py arguments it was made with).
    src: a path or a checkpoint dict; name: what errors call it (default: the path)."""
    ckpt = read_checkpoint(src)
    name = name or (src if isinstance(src, str) else None)
    return EmoNeXt.from_checkpoint(ckpt, name=name).to(device).eval(), ckpt.get("args", {})


def onnx_scorer(path, batch_size):
    """(faces -> probabilities (N, C), class names, the train.py arguments) of an ONNX file of export.py: onnxruntime
    on the CPU, uint8 grey faces (N, 48, 48) in, batch_size at a time; names and arguments from its metadata."""
    try:
        session = cli.onnx_session(path, torch.get_num_threads())  # as many threads as a checkpoint gets
    except ImportError:
        sys.exit("eval.py: an .onnx file is scored by onnxruntime: pip install -r requirements-extra.txt")
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    meta = session.get_modelmeta().custom_metadata_map
    if "emonext.class_names" not in meta:
        sys.exit(f"eval.py: {path}: not an ONNX file of export.py (no emonext.class_names in its metadata)")

    def probs(x):
        return torch.cat([torch.from_numpy(session.run(["probs"], {"faces": xb.numpy()})[0])
                          for xb in x.split(batch_size)])
    return probs, tuple(json.loads(meta["emonext.class_names"])), json.loads(meta.get("emonext.args", "{}"))


def load_scorer(args):
    """(uint8 faces -> predicted classes, class names, the train.py arguments) of the model file: a checkpoint's
    weights (EMA when it has them) through EmoNeXt.predict_logits, or an .onnx file through onnxruntime."""
    if cli.is_onnx(args.checkpoint):
        probs, names, ckpt_args = onnx_scorer(args.checkpoint, args.batch_size)
        return (lambda x: probs(x).argmax(-1)), names, ckpt_args
    try:
        model, ckpt_args = load_model(args.checkpoint, args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
    model = model.for_inference(channels_last=args.channels_last, compile=args.compile)
    return (lambda x: model.predict_logits(x, args.tta, args.batch_size, args.amp).argmax(-1),
            model.config.class_names, ckpt_args)


def check_onnx_flags(args):
    """An .onnx file holds the plain inference path and is run as written: it is scored on --data, without
    ten-crop and without the options of a torch model."""
    if not args.data:
        sys.exit("eval.py: an .onnx file is scored on the data given with --data PATH")
    if args.tta == "tencrop":
        sys.exit("eval.py: --tta tencrop: an .onnx file holds the plain path only (export.py); use --tta none")
    for dest in ("compile", "channels_last", "amp"):
        if getattr(args, dest):
            sys.exit(f"eval.py: {cli.flag(dest)}: an option of a checkpoint; an .onnx file runs in onnxruntime as "
                     "exported")


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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (.pt) or an ONNX file of export.py (.onnx, run by onnxruntime)")
    p.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on; "
                   "required for an .onnx file)")
    p.add_argument("--ferplus", default=None, help="FER+'s fer2013new.csv, for a FER+ model (default: the one it was "
                   "trained with, or with --data the one beside it)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split to score (default: test)")
    p.add_argument("--tta", choices=TTA_MODES, default=None,
                   help=f"test-time augmentation (default: {DEFAULT_TTA} for a checkpoint; none, the only choice, "
                        "for an .onnx file, which holds the plain path)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed csv rows (counted) instead of failing; without --data, on when the run was")
    p.add_argument("--batch-size", type=int, default=256, help="faces per forward pass (default: 256)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model with weight freezing (EmoNeXt.for_inference): compiling takes minutes "
                        "on a small CPU, worth it for large sets only")
    p.add_argument("--channels-last", action="store_true", help="conv weights in channels-last memory format")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast: about twice the faces/s on CPUs with AVX512-BF16 or AMX (and on GPUs), "
                        "logits within bf16 rounding of fp32's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where a checkpoint runs (an .onnx file runs on the CPU; default: cuda if available, else "
                        "cpu)")
    p.add_argument("--out-dir", default="out", help="where the confusion matrix picture goes, "
                   "<checkpoint name>_confusion_<split>.png, created if need be (default: out)")
    return p


# what each numeric flag accepts: (test, what to tell the user)
LIMITS = {"batch_size": (lambda v: v >= 1, "at least 1")}


def split_to_score(args, ckpt_args):
    """(faces, labels, description) of --split of the data to score (data_to_score); a FER+ model is scored on
    FER+'s majority labels, from the vote file it was trained with unless --data."""
    try:
        spec, skip_bad_rows = data_to_score(args, ckpt_args)
        ferplus = args.ferplus or (None if args.data else ckpt_args.get("ferplus"))
        splits, description = data.load_dataset(spec, skip_bad_rows, labels=ckpt_args.get("labels", "fer2013"),
                                                 ferplus=ferplus)
        if args.split == "val" and len(splits["val"][1]) == 0 and "val_fraction" in ckpt_args:  # held out of train
            splits = data.hold_out(splits, ckpt_args["val_fraction"], ckpt_args["seed"])
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    x, y = splits[args.split]
    if len(y) == 0:
        sys.exit(f"eval.py: {description} has no {args.split} split")
    return x, y, description


def check_out_dir(out_dir):
    """The out-dir, made if need be and proved writable before anything is scored."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        sys.exit(f"eval.py: --out-dir {out_dir}: cannot write there ({e.strerror})")


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_limits("eval.py", args, LIMITS)
    cli.check_device("eval.py", args.device)
    onnx = cli.is_onnx(args.checkpoint)
    if onnx:
        check_onnx_flags(args)
    args.tta = args.tta or ("none" if onnx else DEFAULT_TTA)
    check_out_dir(args.out_dir)
    predict, names, ckpt_args = load_scorer(args)

    x, y, description = split_to_score(args, ckpt_args)
    preds = predict(x)
    cm = confusion_matrix(preds, y, len(names))
    acc = (preds == y).double().mean().item()
    print(f"{description}\n{args.split} accuracy ({args.tta}): {100 * acc:.2f}% of {len(y)}\n")
    print(report(cm, names))
    if acc < 0.5 / len(names):  # far under chance: the labels, not the model, are the likely cause
        print(f"\neval.py: {100 * acc:.2f}% is far under chance ({100 / len(names):.1f}%): the classes "
              f"({', '.join(names)}) or the faces this model learnt (on {ckpt_args.get('data', 'unknown data')}) are "
              f"likely not those of {description.rsplit(': ', 1)[0]}")
    png = os.path.join(args.out_dir, f"{os.path.splitext(os.path.basename(args.checkpoint))[0]}_confusion_"
                                     f"{args.split}.png")
    img = figures.confusion_matrix(cm.tolist(), names)
    try:
        write_atomically(png, lambda tmp: img.save(tmp, format="PNG"))
    except OSError as e:
        sys.exit(f"eval.py: the confusion matrix picture: {e.strerror}")
    print(f"\nconfusion matrix picture: {png}")
    return acc


if __name__ == "__main__":
    main()
