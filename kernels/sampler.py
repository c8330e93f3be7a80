"""The STN's affine sampler as one fused op: affine grid + bilinear sampling, forward and backward.

`affine_sample(x, theta)` is `torch.ops.emonext.affine_sample`, equal to `affine_sample_reference`. It never
materialises the (N, H, W, 2) grid: each output pixel computes its source position from theta in registers.
Backward gives d/d theta always (per-block partial sums and a second pass, so bit-identical over runs) and d/d x
only when x requires grad (EmoNeXt's STN warps the raw image, so it normally does no image-gradient work).

Implementations: CUDA tensors run kernels/csrc/affine_sampler.cu, CPU tensors the extension's C++ loop over the
same per-pixel math (kernels/csrc/affine_sampler.h). The extension is built with ninja on first use and cached
by torch (TORCH_EXTENSIONS_DIR); on a CPU-only torch it is built without the .cu. If it does not build, the op
runs the PyTorch reference, after one warning.
"""
import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# nvcc's flags for the .cu in torch's extension build (its common flags, C++20, -O3): the static checks reuse them
NVCC_FLAGS = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O3"]

_loaded = None  # None: not tried yet; then whether torch.ops.emonext_sampler is usable
_with_cuda = False  # whether the loaded build contains the CUDA kernels
_cuda_ok = None  # cuda_available()'s cached answer


def affine_sample_reference(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def load_extension() -> bool:
    """Builds (first call only; later processes reuse torch's build cache) and loads the extension; returns
    whether it is usable. A failed build warns once and leaves the op on the PyTorch reference."""
    global _loaded, _with_cuda
    if _loaded is None:
        # cpp_extension refuses .cu sources on a CPU-only torch or without nvcc: build the CPU loop alone then.
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
        sources = [os.path.join(CSRC, "affine_sampler.cpp")]
        if with_cuda:
            sources.append(os.path.join(CSRC, "affine_sampler.cu"))
        try:
            cpp_extension.load(
                name="emonext_affine_sampler" + ("_cuda" if with_cuda else "_cpu"),
                sources=sources,
                extra_cflags=["-O3"] + (["-DAFFINE_SAMPLER_WITH_CUDA"] if with_cuda else []),
                extra_cuda_cflags=["-O3"],
                is_python_module=False,  # registers torch.ops.emonext_sampler; no pybind to compile
            )
            _loaded, _with_cuda = True, with_cuda
        except Exception as e:  # a compiler or loader failure of any kind must not break the model
            warnings.warn(f"kernels.sampler: the C++/CUDA extension did not build ({str(e)[-2000:]}); "
                          "affine_sample runs the PyTorch reference")
            _loaded = False
    return _loaded


def cuda_available() -> bool:
    """True when the CUDA kernels are built and loaded (builds the extension on the first call)."""
    global _cuda_ok
    if _cuda_ok is None:
        _cuda_ok = torch.cuda.is_available() and load_extension() and _with_cuda
    return _cuda_ok


# A traced forward reads cuda_available's answer as a constant and never builds inside: the mark that
# torch.compiler.assume_constant_result sets, set here without it, as that import loads torch._dynamo (most of
# `import emonext`'s time) into every process, compiling or not. tests/test_sampler.py checks both agree.
cuda_available._dynamo_marked_constant = True


def _use_extension(x: torch.Tensor) -> bool:
    return load_extension() and (x.device.type == "cpu" or (x.is_cuda and _with_cuda))


def _check(x: torch.Tensor, theta: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"affine_sample: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3) or theta.shape[0] != x.shape[0]:
        raise ValueError(f"affine_sample: theta must be (N, 2, 3) with N = x.shape[0]; "
                         f"got theta {tuple(theta.shape)} for x {tuple(x.shape)}")
    if x.device != theta.device:
        raise ValueError(f"affine_sample: x is on {x.device} but theta on {theta.device}")
    if x.dtype not in _DTYPES or not theta.dtype.is_floating_point:
        raise TypeError(f"affine_sample: x must be one of {_DTYPES} and theta floating point; "
                        f"got x {x.dtype}, theta {theta.dtype}")


@torch.library.custom_op("emonext::affine_sample", mutates_args=())
def affine_sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    _check(x, theta)
    if _use_extension(x):
        return torch.ops.emonext_sampler.forward(x, theta)
    return affine_sample_reference(x, theta.to(x.dtype)).contiguous()


@affine_sample.register_fake
def _(x, theta):
    _check(x, theta)
    return x.new_empty(x.shape)


@torch.library.custom_op("emonext::affine_sample_backward", mutates_args=())
def affine_sample_backward(grad_y: torch.Tensor, x: torch.Tensor, theta: torch.Tensor,
                           x_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss/d theta, d loss/d x); the second is an empty tensor when x_grad is False."""
    if _use_extension(x):
        return torch.ops.emonext_sampler.backward(grad_y, x, theta, x_grad)
    # The reference's backward, spelled out: autograd is off below a custom op, so no torch.autograd.grad here.
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    grad_x, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad_y, x, grid, 0, 0, True, [x_grad, True])  # 0, 0: bilinear, zeros; True: align_corners
    grad_theta = torch.ops.aten.affine_grid_generator_backward(grad_grid, list(x.shape), True)
    return grad_theta.to(theta.dtype).contiguous(), grad_x.contiguous() if x_grad else x.new_empty(0)


@affine_sample_backward.register_fake
def _(grad_y, x, theta, x_grad):
    return theta.new_empty(theta.shape), x.new_empty(x.shape if x_grad else (0,))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    x, theta = ctx.saved_tensors
    x_grad = ctx.needs_input_grad[0]
    grad_theta, grad_x = affine_sample_backward(grad_y, x, theta, x_grad)
    return (grad_x if x_grad else None), grad_theta


affine_sample.register_autograd(_backward, setup_context=_setup_context)
