"""The fused affine sampler (kernels/sampler.py, kernels/csrc/) against affine_grid + grid_sample.

CPU tests run the extension's C++ loop (built once per fresh environment, a few seconds to a minute), which
shares its per-pixel math with the CUDA kernels; the .cu is compiled with nvcc for sm_80/sm_90 when nvcc is
present; the CUDA tests run where a GPU is.

Bilinear sampling has a kink at integer pixel coordinates, and the reference's grid differs from the kernel's
by an ulp (affine_grid's batched matmul, CPU grid_sample's fused multiply-add): a sample within an ulp of an
integer may take the slope of the other side. Theta-gradient comparisons therefore avoid transforms that put
samples on integers (e.g. the identity) and use smooth images, whose slope barely changes across a pixel.
"""
import math
import os
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

from kernels import sampler
from kernels.sampler import affine_sample, affine_sample_backward, affine_sample_reference

CU = os.path.join(os.path.dirname(sampler.__file__), "csrc", "affine_sampler.cu")


def rotation(deg, scale=1.0, tx=0.0, ty=0.0):
    a = math.radians(deg)
    return [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]]


THETAS = {
    "shifted_identity": rotation(0, tx=0.013, ty=-0.021),  # sub-pixel shift: every sample between pixels
    "rotate_30": rotation(30, tx=0.05, ty=-0.03),
    "rotate_-75": rotation(-75, scale=0.8, tx=-0.1, ty=0.07),
    "zoom_out_outside": rotation(10, scale=1.7, tx=0.4, ty=-0.3),  # many samples fall outside: zero padding
    "shear_flip": [[-0.9, 0.35, 0.011], [0.2, 1.2, -0.33]],
}


def image(shape, device="cpu", fade=False):
    """Random smooth images: bicubic upsampling of random 6x6 ones. fade: multiplied by a window that is flat 0 at
    the border, so that zero padding adds no cliff there. A sample on the last row or column is a kink as high
    as the image; among the millions of samples of a training-size batch, one or two land there (within an ulp)."""
    low = torch.randn(*shape[:2], 6, 6, device=device)
    x = torch.nn.functional.interpolate(low, size=shape[2:], mode="bicubic", align_corners=True)
    if fade:
        rows, cols = (torch.sin(torch.linspace(0, math.pi, n, device=device)) ** 2 for n in shape[2:])
        x = x * rows[:, None] * cols
    return x


def batch_theta(name, n, dtype=torch.float32, device="cpu"):
    """n transforms around THETAS[name], each slightly different, so samples do not share one theta."""
    base = torch.tensor(THETAS[name], dtype=torch.float64)
    wobble = 0.01 * torch.arange(n, dtype=torch.float64).view(n, 1, 1)
    return (base + wobble * torch.tensor([[1.0, -0.5, 0.3], [0.7, 0.2, -0.4]], dtype=torch.float64)).to(device, dtype)


def run(fn, x, theta, grad_y, x_grad):
    """Output and gradients (theta, and x when x_grad) of fn(x, theta) backpropagating grad_y."""
    x = x.detach().clone().requires_grad_(x_grad)
    theta = theta.detach().clone().requires_grad_()
    y = fn(x, theta)
    y.backward(grad_y)
    return y.detach(), theta.grad, x.grad


def close(actual, expected, rtol):
    """Tolerance relative to the largest magnitude of `expected` (theta gradients are sums with cancellation)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def theta_rtol(dtype):
    """Theta-gradient tolerance: fp32 summation, plus the rare sample on a kink (module doc), which costs more
    on a half-precision image: rounding leaves it rough at the pixel level (slopes jump by ~eps)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps / 4


def test_the_extension_builds_and_is_used():
    # Otherwise every other CPU test would compare the reference with itself.
    assert sampler.load_extension(), "the C++ extension must build here"
    assert sampler._use_extension(torch.empty(0))


@pytest.mark.parametrize("name", THETAS)
@pytest.mark.parametrize("shape", [(2, 3, 37, 53), (1, 1, 16, 16), (3, 1, 9, 4)])
def test_forward_and_gradients_match_reference_fp32(name, shape):
    torch.manual_seed(0)
    x = image(shape)
    theta = batch_theta(name, shape[0])
    grad_y = torch.randn(shape)
    y, g_theta, g_x = run(affine_sample, x, theta, grad_y, x_grad=True)
    y_ref, g_theta_ref, g_x_ref = run(affine_sample_reference, x, theta, grad_y, x_grad=True)
    close(y, y_ref, 1e-5)
    close(g_theta, g_theta_ref, 1e-4)
    close(g_x, g_x_ref, 1e-5)


def test_identity_forward_and_image_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 53)
    theta = torch.eye(2, 3).expand(2, 2, 3)
    grad_y = torch.randn_like(x)
    y, _, g_x = run(affine_sample, x, theta, grad_y, x_grad=True)
    close(y, x, 1e-5)
    close(g_x, grad_y, 1e-5)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")
@pytest.mark.parametrize("shape", [(2, 2, 1, 5), (2, 1, 4, 1)])
def test_size_one_axes_sit_at_the_centre_like_affine_grid(shape):
    torch.manual_seed(0)
    x, grad_y = image(shape), torch.randn(shape)
    theta = batch_theta("shear_flip", shape[0])
    got, want = run(affine_sample, x, theta, grad_y, True), run(affine_sample_reference, x, theta, grad_y, True)
    for got, want in zip(got, want):
        close(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_uses_fp32_math(dtype):
    # Same rounded inputs through the fp32 reference: the kernel differs by the rounding of its outputs, and its
    # theta gradient (accumulated in fp32 from the same values) only by summation order and kinks.
    torch.manual_seed(0)
    x = image((2, 3, 37, 53)).to(dtype)
    grad_y = torch.randn(2, 3, 37, 53).to(dtype)
    theta = batch_theta("rotate_30", 2)
    y, g_theta, g_x = run(affine_sample, x, theta, grad_y, x_grad=True)
    y_ref, g_theta_ref, g_x_ref = run(affine_sample_reference, x.float(), theta, grad_y.float(), x_grad=True)
    assert y.dtype == dtype and g_x.dtype == dtype and g_theta.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    close(y.float(), y_ref, eps)
    close(g_x.float(), g_x_ref, eps)
    close(g_theta, g_theta_ref, theta_rtol(dtype))


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    theta = batch_theta("zoom_out_outside", 2, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(affine_sample, (x, theta))
    assert torch.autograd.gradcheck(lambda t: affine_sample(x.detach(), t), (theta,))


def test_no_image_gradient_unless_x_requires_it():
    x = torch.randn(2, 1, 8, 8)
    theta = batch_theta("rotate_30", 2)
    g_theta, g_x = affine_sample_backward(torch.ones_like(x), x, theta, False)
    assert g_theta.shape == (2, 2, 3) and g_x.numel() == 0
    _, g_theta_run, g_x_run = run(affine_sample, x, theta, torch.ones_like(x), x_grad=False)
    assert g_x_run is None and torch.equal(g_theta_run, g_theta)


def test_theta_gradient_is_bit_identical_over_runs():
    torch.manual_seed(0)
    x, grad_y = torch.randn(4, 3, 37, 53), torch.randn(4, 3, 37, 53)
    theta = batch_theta("rotate_-75", 4)
    first = run(affine_sample, x, theta, grad_y, x_grad=False)[1]
    assert torch.equal(first, run(affine_sample, x, theta, grad_y, x_grad=False)[1])


def test_theta_in_another_float_dtype_gets_its_gradient_in_that_dtype():
    torch.manual_seed(0)
    x, grad_y = image((2, 1, 12, 10)), torch.randn(2, 1, 12, 10)
    theta = batch_theta("rotate_30", 2, torch.float64)
    y, g_theta, _ = run(affine_sample, x, theta, grad_y, x_grad=False)
    y_ref, g_theta_ref, _ = run(affine_sample_reference, x, theta.float(), grad_y, x_grad=False)
    assert y.dtype == torch.float32 and g_theta.dtype == torch.float64
    close(y, y_ref, 1e-5)
    close(g_theta.float(), g_theta_ref, 1e-4)


def test_reference_fallback_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(sampler, "_loaded", False)
    torch.manual_seed(0)
    x, grad_y = torch.randn(2, 3, 9, 11), torch.randn(2, 3, 9, 11)
    theta = batch_theta("rotate_30", 2)
    for x_grad in (True, False):
        for got, want in zip(run(affine_sample, x, theta, grad_y, x_grad),
                             run(affine_sample_reference, x, theta, grad_y, x_grad)):
            assert (got is None and want is None) or torch.equal(got, want)


def test_cuda_available_carries_the_mark_torch_compiler_assume_constant_result_sets():
    """cuda_available is marked by hand (the decorator's import loads torch._dynamo): the same mark, the same value."""
    marks = vars(torch.compiler.assume_constant_result(lambda: None))
    assert marks and {k: getattr(sampler.cuda_available, k, None) for k in marks} == marks


def test_torch_compile_keeps_the_op_as_one_node():
    def f(x, theta):
        return affine_sample(x, theta * 1.5).sin() if not sampler.cuda_available() else x

    x, theta = torch.randn(2, 1, 8, 8), batch_theta("rotate_30", 2)
    explain = torch._dynamo.explain(f)(x, theta)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    assert "emonext.affine_sample" in explain.graphs[0].code

    # fullgraph=True fails on any break; aot_eager also traces the backward through the ops' fake implementations.
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grad_y = torch.randn(2, 1, 8, 8)
    for got, want in zip(run(compiled, x, theta, grad_y, True), run(f, x, theta, grad_y, True)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("x_shape, theta_shape, dtype, error, match", [
    ((2, 8, 8), (2, 2, 3), torch.float32, ValueError, r"\(N, C, H, W\), got shape \(2, 8, 8\)"),
    ((2, 1, 8, 8), (2, 3, 3), torch.float32, ValueError, r"got theta \(2, 3, 3\) for x \(2, 1, 8, 8\)"),
    ((2, 1, 8, 8), (3, 2, 3), torch.float32, ValueError, r"got theta \(3, 2, 3\) for x \(2, 1, 8, 8\)"),
    ((2, 1, 8, 8), (2, 6), torch.float32, ValueError, r"got theta \(2, 6\)"),
    ((2, 1, 8, 8), (2, 2, 3), torch.int32, TypeError, r"got x torch.int32"),
])
def test_clear_errors(x_shape, theta_shape, dtype, error, match):
    with pytest.raises(error, match=match):
        affine_sample(torch.zeros(x_shape, dtype=dtype), torch.zeros(theta_shape))


def test_error_when_devices_differ():
    with pytest.raises(ValueError, match="x is on cpu but theta on meta"):
        affine_sample(torch.zeros(2, 1, 8, 8), torch.zeros(2, 2, 3, device="meta"))


def test_error_when_a_sample_is_too_large_for_32_bit_indexing():
    x = torch.zeros(1, 1, 1, 1).expand(1, 2**15, 2**8, 2**8)  # 2^31 elements, never materialised
    with pytest.raises(RuntimeError, match="too large for 32-bit indexing"):
        affine_sample(x, torch.zeros(1, 2, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_available_is_false_without_a_gpu():
    assert sampler.cuda_available() is False


def nvcc(*args):
    done = subprocess.run(["nvcc", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def symbols(obj, kind):
    """The launcher symbols (affine_sample_*_cuda) an object file defines ("T") or needs ("U")."""
    out = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout.split("\n")
    return {line.split()[-1] for line in out if "affine_sample_" in line and f" {kind} " in line}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_build_compiles_for_sm80_and_sm90_and_links(tmp_path):
    # The .cu with the flags torch's extension build gives nvcc (they switch off the half types' implicit
    # conversions), so a CUDA error fails here rather than on the GPU machine.
    kernels_o, binding_o = str(tmp_path / "affine_sampler_cu.o"), str(tmp_path / "affine_sampler.o")
    nvcc(*sampler.NVCC_FLAGS, "-Werror", "all-warnings",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-c", CU, "-o", kernels_o)
    # The .cpp's CUDA branch. A CPU-only torch ships the c10/cuda headers but not their generated build-config
    # header, which a one-line stand-in provides.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{tmp_path}"]
    nvcc("-std=c++20", "-O0", "-DAFFINE_SAMPLER_WITH_CUDA", *includes, "-c", CU.replace(".cu", ".cpp"), "-o", binding_o)
    needed = symbols(binding_o, "U")
    assert len(needed) == 2 and needed <= symbols(kernels_o, "T"), "launcher declarations and definitions differ"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_cuda_kernels_are_loaded():
    assert sampler.cuda_available()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["rotate_30", "zoom_out_outside"])
def test_cuda_matches_reference_at_training_size(name, channels, dtype):
    torch.manual_seed(0)
    shape = (64, channels, 224, 224)
    x = image(shape, "cuda", fade=True).to(dtype)
    grad_y = torch.randn(shape, device="cuda").to(dtype)
    theta = batch_theta(name, 64, device="cuda")
    y, g_theta, _ = run(affine_sample, x, theta, grad_y, x_grad=False)
    y_ref, g_theta_ref, _ = run(affine_sample_reference, x.float(), theta, grad_y.float(), x_grad=False)
    close(y.float(), y_ref, max(torch.finfo(dtype).eps, 1e-5))
    # Among 64 x 224 x 224 samples one or two sit within an ulp of a kink: each costs up to ~3e-4 of the largest
    # entry here. A CUDA indexing or reduction error (a lost block, warp or channel) costs percents.
    close(g_theta, g_theta_ref, max(1e-3, theta_rtol(dtype)))
    assert torch.equal(g_theta, run(affine_sample, x, theta, grad_y, x_grad=False)[1])  # deterministic


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_image_gradient_matches_reference(dtype):
    torch.manual_seed(0)
    x = image((4, 3, 37, 53), "cuda").to(dtype)
    grad_y = torch.randn(4, 3, 37, 53, device="cuda").to(dtype)
    theta = batch_theta("zoom_out_outside", 4, device="cuda")
    y, g_theta, g_x = run(affine_sample, x, theta, grad_y, x_grad=True)
    y_ref, g_theta_ref, g_x_ref = run(affine_sample_reference, x.double(), theta.double(), grad_y.double(), True)
    rtol = max(torch.finfo(dtype).eps, 1e-5)
    close(y.double(), y_ref, rtol)
    close(g_x.double(), g_x_ref, rtol)
    if dtype == torch.float64:  # same sample positions to ~1e-16, no kink ambiguity (fp32: the test above)
        close(g_theta.double(), g_theta_ref, 1e-5)


@cuda
def test_cuda_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    theta = batch_theta("zoom_out_outside", 2, torch.float64, "cuda").requires_grad_()
    assert torch.autograd.gradcheck(affine_sample, (x, theta))
