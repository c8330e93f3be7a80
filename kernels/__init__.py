"""The one dispatch point between emonext.py and the hand-written kernels.

emonext.py imports this package inside a try/except and asks, once per hot path, whether a fused op
applies to a tensor (`use_dwconv_layernorm(x)`, `use_affine_sample(x)`); if not, its own plain PyTorch runs.

Backends (`set_backend`, train.py's --kernels):
    auto   fused ops on CUDA tensors when their kernel is available, plain PyTorch elsewhere (default)
    torch  plain PyTorch everywhere
    fused  always the registered ops; on CPU they run their CPU implementations (the PyTorch reference,
           or the sampler's C++ loop), which is how CPU tests prove the op registration and that
           torch.compile traces them without graph breaks

The ops are registered with torch.library as `torch.ops.emonext.dwconv_layernorm` and
`torch.ops.emonext.affine_sample` (fake implementation + autograd), so a compiled model keeps each as
one node.
"""
import torch

from . import dwconv_ln, sampler
from .dwconv_ln import dwconv_layernorm
from .sampler import affine_sample

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_dwconv_layernorm", "use_affine_sample",
           "describe", "dwconv_layernorm", "affine_sample"]

BACKENDS = ("auto", "torch", "fused")
_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def use_dwconv_layernorm(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return x.is_cuda and dwconv_ln.triton_available()
    return _backend == "fused"


def use_affine_sample(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return x.is_cuda and sampler.cuda_available()
    return _backend == "fused"


def describe(device: torch.device) -> str:
    """One line saying which implementation each hot path runs on `device` (for train.py's log)."""
    x = torch.empty(0, device=device)
    conv = "triton" if use_dwconv_layernorm(x) and x.is_cuda else ("op:cpu" if use_dwconv_layernorm(x) else "torch")
    stn = "cuda" if use_affine_sample(x) and x.is_cuda else ("op:cpu" if use_affine_sample(x) else "torch")
    return f"kernels={_backend}: dwconv+layernorm -> {conv}, stn sampler -> {stn}"
