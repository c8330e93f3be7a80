"""
What the scripts share: their flags checked the same way in train.py, eval.py and predict.py (each script keeps a
table of its numeric flags' limits, and a value that cannot work, or a device that is not there, ends the script in one
line naming the flag and what it expects, before anything is loaded), the one test of what is an ONNX file and the one
onnxruntime session set-up.
Imports no torch at module level, so that a process that runs an .onnx file without torch can use it.
"""
import os
import sys


def flag(dest: str) -> str:
    """argparse's dest -> the flag as typed: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def check_limits(prog: str, args, limits: dict) -> None:
    """limits: {dest: (test, what to tell the user)}; a None value (a default worked out later) always passes."""
    for dest, (ok, expected) in limits.items():
        value = getattr(args, dest)
        if value is not None and not ok(value):
            sys.exit(f"{prog}: {flag(dest)}: expected {expected}, got {value}")


def check_device(prog: str, name: str):
    """--device as a torch.device that this machine has."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"{prog}: --device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{prog}: --device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                 "use --device cpu")
    return device


def is_onnx(path) -> bool:
    """Whether a model file is ONNX, by its name or its first byte (ONNX opens with its ir_version's field tag; a
    checkpoint is a zip or a pickle). An unreadable file is not: from_checkpoint then says what is wrong."""
    if str(path).lower().endswith(".onnx"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def onnx_session(path, threads=None):
    """An onnxruntime InferenceSession of the ONNX file at path on the CPU, `threads` intra-op threads (None:
    onnxruntime's own choice), one node at a time. ImportError where onnxruntime is not installed (the caller says
    what to install); ValueError in one line where the file is not there or onnxruntime cannot load it."""
    import onnxruntime
    if not os.path.isfile(path):
        raise ValueError(f"not found: {path}")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads, options.execution_mode = 1, onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base class but Exception
        raise ValueError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
