"""The one dispatch point between emonext.py and the hand-written kernels.

emonext.py imports this package inside a try/except and asks, once per hot path, whether a fused op
applies to a tensor (`use_dwconv_layernorm(x)`, `use_affine_sample(x)`); if not, its own plain PyTorch runs.

Backends (`set_backend`, train.py's --kernels):
    auto   plain PyTorch, except a fused op on a CUDA tensor of a shape at which a GPU benchmark measured it faster
           than PyTorch (MEASURED_FASTER; none yet, so today auto is PyTorch everywhere) (default)
    torch  plain PyTorch everywhere
    fused  always the registered ops: Triton / CUDA on CUDA tensors; on CPU they run their CPU implementations
           (the PyTorch reference, or the sampler's C++ loop), which is how CPU tests prove the op registration
           and that torch.compile traces them without graph breaks

The ops are registered with torch.library as `torch.ops.emonext.dwconv_layernorm` and
`torch.ops.emonext.affine_sample` (fake implementation + autograd), so a compiled model keeps each as
one node.
"""
import torch

from . import dwconv_ln, sampler
from .dwconv_ln import dwconv_layernorm
from .sampler import affine_sample

__all__ = ["BACKENDS", "MEASURED_FASTER", "set_backend", "get_backend", "auto_uses_fused", "use_dwconv_layernorm",
           "use_affine_sample", "describe", "dwconv_layernorm", "affine_sample"]

BACKENDS = ("auto", "torch", "fused")
_backend = "auto"

# Where `auto` runs a fused op on CUDA: per op, the input shapes (C, H, W) and dtypes (of x as the op receives it)
# at which a GPU benchmark recorded in BENCHMARKS.md timed the fused op's forward+backward faster than PyTorch's
# (bench.py's dwconv and sampler sections, batch 128, run by .ci/gpu's stage c). Entries are added only
# from such a measured row, naming it; none exists yet, so `auto` is plain PyTorch. `fused` forces the ops.
MEASURED_FASTER: dict[str, frozenset] = {
    "dwconv_layernorm": frozenset(),
    "affine_sample": frozenset(),
}


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def auto_uses_fused(op: str, device_type: str, shape, dtype: torch.dtype) -> bool:
    """`auto`'s rule: the fused op only on CUDA, at an (N, C, H, W) input of a (C, H, W, dtype) in MEASURED_FASTER."""
    return device_type == "cuda" and (*shape[1:], dtype) in MEASURED_FASTER[op]


def use_dwconv_layernorm(x: torch.Tensor) -> bool:
    if _backend == "auto":  # the table first: it is empty today, and availability may build things
        return auto_uses_fused("dwconv_layernorm", x.device.type, x.shape, x.dtype) and dwconv_ln.triton_available()
    return _backend == "fused"


def use_affine_sample(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return auto_uses_fused("affine_sample", x.device.type, x.shape, x.dtype) and sampler.cuda_available()
    return _backend == "fused"


def _describe_op(op: str, kernel: str, available, device_type: str) -> str:
    """What one hot path runs on device_type; available() says whether its kernel can run there."""
    if _backend == "torch" or (_backend == "auto" and device_type != "cuda"):
        return "torch"
    if _backend == "fused":
        return "op:cpu" if device_type == "cpu" else kernel if available() else "op:reference"
    if not MEASURED_FASTER[op]:
        return "torch (auto: no shape measured faster on a GPU yet; --kernels fused forces the kernel)"
    if not available():
        return f"torch ({kernel} not available here)"
    shapes = ", ".join(f"{c}x{h}x{w} {str(dtype)[6:]}" for c, h, w, dtype in sorted(MEASURED_FASTER[op], key=str))
    return f"{kernel} at {shapes} (measured faster), torch elsewhere"


def describe(device) -> str:
    """One line saying which implementation each hot path runs on `device` (for train.py's log)."""
    device_type = torch.device(device).type
    conv = _describe_op("dwconv_layernorm", "triton", dwconv_ln.triton_available, device_type)
    stn = _describe_op("affine_sample", "cuda", sampler.cuda_available, device_type)
    return f"kernels={_backend}: dwconv+layernorm -> {conv}, stn sampler -> {stn}"
