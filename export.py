"""
Writes the files to ship from a checkpoint of train.py (or a shipped .pt): the slim checkpoint, or the whole inference
path as one ONNX file that onnxruntime runs without torch: uint8 grey faces (N, 48, 48) -> emonext.preprocess -> the
model -> softmax -> probabilities (N, num_classes), class names and config in its metadata.

    python export.py out/best.pt weights/emonext_atto_fer2013.pt       # EMA weights in fp16, config, class names
    python export.py --average a/best.pt b/best.pt soup.pt              # their weights averaged (a uniform soup)
    python export.py weights/emonext_atto_fer2013.pt model.onnx        # ONNX, fp32
    python export.py weights/emonext_atto_fer2013.pt weights/emonext_atto_fer2013_int8.onnx \\
        --int8 ../shared/data/fer2013.npz                               # static int8, calibrated on 1,000 train faces

Each file written is checked (ONNX: onnxruntime against EmoNeXt.predict on 64 faces) and its size and sha256 printed.
ONNX needs the optional packages: pip install -r requirements-extra.txt
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import os
import sys
import tempfile

import torch
import torch.nn as nn

import cli
import data
import emonext
from emonext import (FACE_SIDE, EmoNeXt, check_writable, config_dict, export_checkpoint, read_checkpoint,
                     write_atomically)

EXTRAS_HINT = "pip install -r requirements-extra.txt"
INT8_OPS = ("Conv", "MatMul", "Gemm")  # quantised; the depthwise convs among the Convs are left fp32 (below)
CHECK_FACES = 64
# what checkpoints must share to be averaged; the training-only fields (drop path, layer scale init, loss weights)
# may differ, and the average takes the first checkpoint's
SOUP_FIELDS = ("depths", "dims", "img_size", "in_chans", "num_classes", "pixel_mean", "pixel_std", "class_names")


class FacesToProbs(nn.Module):
    """What the ONNX file computes: uint8 grey faces (N, 48, 48) -> (N, num_classes) probabilities, through
    emonext.preprocess with the model's config, the model and a softmax: EmoNeXt.predict on 48x48 grey faces."""

    def __init__(self, model: EmoNeXt):
        super().__init__()
        self.model = model

    def forward(self, faces):
        c = self.model.config
        return self.model(emonext.preprocess(faces, c.img_size, c.pixel_mean, c.pixel_std)).float().softmax(-1)


def _affine_grid(theta, size, align_corners: bool = False):
    """aten.affine_grid_generator as ONNX's AffineGrid (opset 20): without this entry the dynamo exporter
    decomposes it into a constant base grid, Mul and ReduceSum."""
    from onnxscript import opset20 as op
    return op.AffineGrid(theta, size, align_corners=int(align_corners))


def onnx_graph(model: EmoNeXt):
    """The ONNX ModelProto of FacesToProbs(model), input "faces" of any batch size, output "probs". The exporter
    traces the fast eval path (an eval copy under no_grad: the STN's BatchNorms folded) with the plain PyTorch ops,
    whatever the kernels backend."""
    wrapper = FacesToProbs(model.for_inference()).eval()
    faces = torch.zeros(2, FACE_SIDE, FACE_SIDE, dtype=torch.uint8)  # N=2: not specialised as 0 or 1
    with contextlib.ExitStack() as restore:
        if emonext.kernels is not None:
            restore.callback(emonext.kernels.set_backend, emonext.kernels.get_backend())
            emonext.kernels.set_backend("torch")
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (faces,), dynamo=True, opset_version=20, input_names=["faces"], output_names=["probs"],
                dynamic_shapes=({0: torch.export.Dim("N")},), external_data=False, verbose=False,
                custom_translation_table={torch.ops.aten.affine_grid_generator.default: _affine_grid})
    return program.model_proto


def load_models(paths):
    """(model, provenance) of one checkpoint or of several averaged. provenance: what the written file says of where
    its weights came from: the checkpoint's train.py arguments, iteration and best val accuracy (or, for a soup, the
    paths it averaged); for several, the first one's arguments and the paths averaged ("averaged_from")."""
    models, ckpts = [], []
    for path in paths:
        ckpts.append(read_checkpoint(path))
        models.append(EmoNeXt.from_checkpoint(ckpts[-1], name=path).eval())
    if len(models) == 1:
        return models[0], {k: ckpts[0].get(k) for k in ("args", "iter", "best_val_acc", "averaged_from")}
    return average_weights(models, paths), {"args": ckpts[0].get("args"), "averaged_from": list(paths)}


def average_weights(models, paths) -> EmoNeXt:
    """A uniform soup (Wortsman et al. 2022): the first model with every floating-point weight and BatchNorm
    statistic replaced by the mean over the models (integer counters are the first's). It pays for models that
    share a basin, such as fine-tunes of one model; averaging models trained apart gives noise."""
    first = config_dict(models[0])
    for model, path in zip(models[1:], paths[1:]):
        other = config_dict(model)
        differ = [f"{k} {other[k]} against {first[k]}" for k in SOUP_FIELDS if other[k] != first[k]]
        if differ:
            raise ValueError(f"{path}: not the model of {paths[0]} ({'; '.join(differ)}): only checkpoints of one "
                             "architecture, input and classes average")
    states = [m.state_dict() for m in models]
    mean = {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}
    models[0].load_state_dict(mean)
    return models[0]


def metadata(model: EmoNeXt, provenance: dict) -> dict:
    """The ONNX file's metadata_props (str -> str, every value JSON, strings too): class names, config, and the training
    arguments, iteration and best val accuracy of the checkpoint when it has them (the paths averaged for a soup)."""
    meta = {"emonext.class_names": list(model.config.class_names), "emonext.config": config_dict(model),
            "emonext.input": f"faces: uint8 (N, {FACE_SIDE}, {FACE_SIDE}) grey faces, levels 0..255 "
                             "(emonext.grey_faces makes them of any image)",
            "emonext.output": f"probs: float32 (N, {model.config.num_classes}) softmax probabilities, "
                              "columns as emonext.class_names",
            "emonext.precision": "fp32"}
    meta.update({f"emonext.{k}": v for k, v in provenance.items() if v is not None})
    return {k: json.dumps(v) for k, v in meta.items()}


def set_metadata(proto, meta: dict):
    """Replaces a ModelProto's metadata_props by meta (str -> str)."""
    import onnx
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name, proto.doc_string = "EmoNeXt export.py", json.loads(meta["emonext.output"])


class FacesReader:
    """quantize_static's calibration data: uint8 faces (N, 48, 48) as the file's input, `batch` at a time."""

    def __init__(self, faces, batch: int = 100):
        self.batches = iter(faces.split(batch))

    def get_next(self):
        faces = next(self.batches, None)
        return None if faces is None else {"faces": faces.numpy()}


def quantize_int8(proto, faces, how: dict):
    """A static int8 (QDQ) copy of an fp32 ModelProto, calibrated (MinMax) on uint8 faces (N, 48, 48): weights per
    output channel in 7 bits (reduce_range: x86 CPUs without VNNI sum pairs of u8 x s8 products in int16, which
    full 8-bit weights overflow), activations int8, only INT8_OPS quantised and among them the depthwise convs left
    fp32 (the recipe that kept the shipped model's accuracy when it was worked out); LayerNorm, GELU, the STN's
    sampling and the softmax stay fp32. quant_pre_process (shape inference, onnxruntime's basic graph optimisation)
    first, as onnxruntime recommends. how: what the metadata says about the calibration."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = (os.path.join(tmp, f"{name}.onnx") for name in ("fp32", "pre", "int8"))
        onnx.save(proto, fp32)
        quant_pre_process(fp32, pre)
        depthwise = [n.name for n in onnx.load(pre).graph.node
                     if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        quantize_static(pre, int8, FacesReader(faces), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS,
                        nodes_to_exclude=depthwise, calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
        quantized = onnx.load(int8)
    meta = {p.key: p.value for p in proto.metadata_props}
    meta["emonext.precision"] = json.dumps("int8")
    meta["emonext.quantization"] = json.dumps({
        "how": "onnxruntime quantize_static, QDQ, after quant_pre_process",
        "weights": "int8 in 7 bits (reduce_range), per output channel",
        "activations": "int8", "quantised": list(INT8_OPS),
        "fp32": f"the {len(depthwise)} depthwise convs, LayerNorm, GELU, the STN's sampling, softmax",
        "calibration": {"method": "MinMax", **how}})
    set_metadata(quantized, meta)
    return quantized


def calibration_faces(spec: str, n: int, seed: int):
    """(n faces of spec's train split drawn with seed for the calibration, CHECK_FACES others to check the file on:
    the last ones of the same draw), uint8 (N, 48, 48)."""
    try:
        splits, description = data.load_dataset(spec)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export.py: --int8: {e}")
    train = splits["train"][0]
    if len(train) == 0:
        sys.exit(f"export.py: --int8: {description}: no train faces to calibrate on")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    print(f"calibrating on {min(n, len(train))} train faces of {description} (seed {seed})")
    return train[order[:n]], train[order[-CHECK_FACES:]]


def check_onnx(path, model: EmoNeXt, faces, int8: bool) -> float:
    """Runs the written file in onnxruntime on faces and compares with EmoNeXt.predict; returns the max |prob diff|.
    An fp32 file that differs by more than 1e-4 ends the script."""
    session = cli.onnx_session(path, torch.get_num_threads())
    probs = torch.from_numpy(session.run(["probs"], {"faces": faces.numpy()})[0])
    expected = model.predict(faces)
    diff = (probs - expected).abs().max().item()
    agree = (probs.argmax(-1) == expected.argmax(-1)).sum().item()
    print(f"onnxruntime vs EmoNeXt.predict on {len(faces)} faces: max |prob diff| {diff:.2e}, "
          f"top class the same on {agree} of {len(faces)}")
    if not int8 and not diff <= 1e-4:
        sys.exit(f"export.py: {path}: onnxruntime's probabilities differ from EmoNeXt.predict's by {diff:.2e} "
                 "(over 1e-4): the export is wrong")
    return diff


def export_onnx(model: EmoNeXt, provenance: dict, path, args):
    """The ONNX file at path (fp32, or int8 with --int8), checked and reported."""
    for package in ("onnx", "onnxscript", "onnxruntime"):  # each step below needs one of them
        try:
            importlib.import_module(package)
        except ImportError:
            sys.exit(f"export.py: an .onnx file needs onnx, onnxscript and onnxruntime ({package} is missing): "
                     f"{EXTRAS_HINT}")
    import onnx
    check = torch.randint(0, 256, (CHECK_FACES, FACE_SIDE, FACE_SIDE), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(args.seed))  # noise faces: numbers, not accuracy
    if args.int8:
        calib, check = calibration_faces(args.int8, args.calibration_faces, args.seed)
    proto = onnx_graph(model)
    set_metadata(proto, metadata(model, provenance))
    if args.int8:
        proto = quantize_int8(proto, calib, {"data": args.int8, "train faces": len(calib), "seed": args.seed})
    try:
        write_atomically(path, lambda tmp: onnx.save(proto, tmp, format="protobuf"), nbytes=proto.ByteSize())
    except OSError as e:
        sys.exit(f"export.py: {e.strerror}")
    check_onnx(path, model, check, int8=bool(args.int8))


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                   help="a checkpoint of train.py or a shipped .pt (several with --average)")
    p.add_argument("out", help="what to write: .pt (the checkpoint to ship: EMA weights in half precision, config, "
                   "class names, train.py's arguments) or .onnx (the whole inference path)")
    p.add_argument("--average", action="store_true",
                   help="average the weights of several checkpoints into one model, a uniform soup (fine-tunes "
                        "of one model; default: off, one checkpoint)")
    p.add_argument("--int8", metavar="DATA", default=None,
                   help=".onnx: quantise statically to int8, calibrated on faces of DATA's train split (a dataset "
                        "as train.py's --data reads it; default: none, fp32)")
    p.add_argument("--calibration-faces", type=int, default=1000, help="--int8: how many train faces (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="--int8: which train faces, and the faces of the "
                   "check (default: 0)")
    return p


# what each numeric flag accepts: (test, what to tell the user)
LIMITS = {"calibration_faces": (lambda v: v >= 1, "at least 1"), "seed": (lambda v: v >= 0, "at least 0")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_limits("export.py", args, LIMITS)
    kind = os.path.splitext(args.out)[1]
    if kind not in (".pt", ".onnx"):
        sys.exit(f"export.py: {args.out}: expected a .pt or an .onnx file to write")
    if len(args.checkpoints) > 1 and not args.average:
        sys.exit(f"export.py: {len(args.checkpoints)} checkpoints given: to write one model of their weights "
                 "averaged (a uniform soup), pass --average")
    if args.average and len(args.checkpoints) < 2:
        sys.exit("export.py: --average needs two checkpoints or more")
    if args.int8 and kind != ".onnx":
        sys.exit("export.py: --int8 quantises an .onnx file; a .pt is written in half precision")
    same = [c for c in args.checkpoints
            if os.path.exists(args.out) and os.path.exists(c) and os.path.samefile(c, args.out)]
    if same:  # by another name, a symlink or a hard link included (samefile: the same device and inode)
        sys.exit(f"export.py: {args.out} is the checkpoint {same[0]} it would be made of: write to another path")
    try:
        check_writable(args.out)
    except OSError as e:
        sys.exit(f"export.py: {e.strerror}")
    try:
        model, provenance = load_models(args.checkpoints)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export.py: {e}")
    if kind == ".onnx":
        export_onnx(model, provenance, args.out, args)
    else:
        try:
            export_checkpoint(model, args.out, extra={**provenance, "args": provenance["args"] or {}})
        except OSError as e:
            sys.exit(f"export.py: {e.strerror}")
    digest = sha256(args.out)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB, sha256 {digest}")
    return digest


if __name__ == "__main__":
    main()
