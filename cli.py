"""
What the scripts' flags accept, checked the same way in train.py, eval.py and predict.py: each script keeps a table
of its numeric flags' limits, and a value that cannot work, or a device that is not there, ends the script in one
line naming the flag and what it expects, before anything is loaded.
"""
import sys

import torch


def flag(dest: str) -> str:
    """argparse's dest -> the flag as typed: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def check_limits(prog: str, args, limits: dict) -> None:
    """limits: {dest: (test, what to tell the user)}; a None value (a default worked out later) always passes."""
    for dest, (ok, expected) in limits.items():
        value = getattr(args, dest)
        if value is not None and not ok(value):
            sys.exit(f"{prog}: {flag(dest)}: expected {expected}, got {value}")


def check_device(prog: str, name: str) -> torch.device:
    """--device as a torch.device that this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"{prog}: --device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{prog}: --device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                 "use --device cpu")
    return device
