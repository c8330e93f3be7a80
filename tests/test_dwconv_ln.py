"""kernels/dwconv_ln.py: the Triton kernels (interpreter on CPU, natively on CUDA), the op registration, compile.

Ground truth is the reference in float64; a low-precision result must be about as close to it as the reference
run in that same precision is.
"""
import os
import subprocess
import sys

import pytest
import torch

from kernels import dwconv_ln

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run natively on a GPU, else interpreted


def make_inputs(N, C, H, W, dtype, layout="contiguous", device="cpu", seed=0):
    """x (N, C, H, W) in `layout` (contiguous / channels_last / sliced: a strided view), the block's parameters, dy."""
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        x = torch.randn(N, C, H + 1, 2 * W, generator=g)[:, :, 1:, ::2]
    else:
        x = torch.randn(N, C, H, W, generator=g)
    params = [torch.randn(C, 1, 7, 7, generator=g) * 0.2, torch.randn(C, generator=g),
              1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)]
    dy = torch.randn(N, H, W, C, generator=g)
    x = x.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, [p.to(device, dtype) for p in params], dy.to(device, dtype)


def run(fn, x, params, dy):
    """Output and the five gradients (x, conv weight, conv bias, ln weight, ln bias) of fn."""
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    y = fn(*leaves, eps=1e-6)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def assert_close_to_reference(fn, x, params, dy, tol):
    """fn's output and grads vs the float64 reference: max error / max |truth| <= tol, and for fp16/bf16 at most
    2x the error of the reference computed in that dtype."""
    to64 = lambda ts: [t.double() for t in ts]
    truth = run(dwconv_ln.dwconv_layernorm_reference, x.double(), to64(params), dy.double())
    got = run(fn, x, params, dy)
    low = x.dtype != torch.float32
    ref = run(dwconv_ln.dwconv_layernorm_reference, x, params, dy) if low else None
    for i, name in enumerate(["y", "dx", "d conv_weight", "d conv_bias", "d ln_weight", "d ln_bias"]):
        assert got[i].shape == truth[i].shape and got[i].dtype == x.dtype, name
        scale = truth[i].abs().max().item()
        err = (got[i].double() - truth[i]).abs().max().item() / scale
        bound = tol if not low else max(tol, 2 * (ref[i].double() - truth[i]).abs().max().item() / scale)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("N,C,H,W,dtype,layout", [
    (2, 40, 9, 11, torch.float32, "contiguous"),  # H, W not multiples of any tile; C not a power of two
    (1, 96, 5, 6, torch.float32, "channels_last"),  # H, W < 7: every tap clipped; batch 1
    (2, 40, 8, 3, torch.float32, "sliced"),  # non-contiguous input
    pytest.param(1, 40, 20, 5, torch.float32, "contiguous", marks=pytest.mark.slow),  # several row tiles and
    #                                                                                   weight-grad bands
    pytest.param(2, 40, 9, 11, torch.bfloat16, "channels_last", marks=pytest.mark.slow),
    (1, 96, 5, 6, torch.float16, "contiguous"),
])
def test_triton_matches_reference(N, C, H, W, dtype, layout):
    x, params, dy = make_inputs(N, C, H, W, dtype, layout, device=DEV)
    assert_close_to_reference(dwconv_ln.dwconv_layernorm_triton, x, params, dy,
                              tol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """CUDA's tile policy (2-D tiles, not the interpreter's whole rows) with a tile budget of 512 values, so that
    tiny shapes get the tile grids, weight-gradient bands and channel blocks the ConvNeXt shapes get on a GPU."""
    monkeypatch.setattr(dwconv_ln, "_FULL_ROW_TILES", False)
    monkeypatch.setattr(dwconv_ln, "_TILE_ELEMS", 512)


@pytest.mark.parametrize("C,H,W,dtype,tiles", [
    # (BLOCK_H, BLOCK_W) of the forward and LayerNorm-backward kernels (all channels), dx (128 channels at most)
    # and the weight gradient (32 channels)
    (40, 5, 9, torch.float32, [(2, 4), (2, 4), (4, 4)]),  # 3 x 3 tiles, partial at the right and bottom edges;
    #                                                       dw: 2 bands of 3 tiles each, 2 channel blocks
    pytest.param(136, 3, 5, torch.bfloat16, [(1, 4), (1, 4), (2, 8)], marks=pytest.mark.slow),  # 3 x 2 tiles;
    #                                   dx: 2 channel blocks (the second masked), dw: 2 bands, 5 channel blocks
])
def test_triton_with_gpu_tiles_matches_reference(gpu_tiles, C, H, W, dtype, tiles):
    block_c = dwconv_ln.triton.next_power_of_2(C)
    assert [dwconv_ln._tile(H, W, bc)[:2] for bc in (block_c, min(block_c, 128), 32)] == tiles
    x, params, dy = make_inputs(1, C, H, W, dtype, "channels_last", device=DEV)
    assert_close_to_reference(dwconv_ln.dwconv_layernorm_triton, x, params, dy,
                              tol=1e-4 if dtype == torch.float32 else 1e-2)


def test_tile_policy_keeps_registers_per_thread_and_the_tile_budget(monkeypatch):
    monkeypatch.setattr(dwconv_ln, "_FULL_ROW_TILES", False)  # CUDA's policy, with its budget of 4096 values
    # 8 values per thread (with 16, ptxas spilled: tools.static); a tile of a wide stage (768 channels at 7 x 7)
    # narrows to 4 pixels rather than exceed the budget
    assert dwconv_ln._tile(56, 56, 128) == (4, 8, 16) and dwconv_ln._tile(7, 7, 1024) == (1, 4, 16)
    assert dwconv_ln._tile(3, 3, 64) == (4, 4, 4)  # small images: small tiles, at least 4 warps


def test_triton_saves_no_conv_output():
    x, params, _ = make_inputs(1, 40, 5, 6, torch.float32, device=DEV)
    leaves = [t.requires_grad_() for t in (x, *params)]
    y = dwconv_ln.dwconv_layernorm_triton(*leaves)
    saved = y.grad_fn.saved_tensors
    # x, conv weight, conv bias, ln weight and the two (N*H*W,) stats: nothing activation-sized but x
    assert sum(t.numel() for t in saved) == x.numel() + 40 * 49 + 2 * 40 + 2 * 30


def grads_twice(device, shape):
    x, params, dy = make_inputs(*shape, torch.float32, "channels_last", device=device)
    return run(dwconv_ln.dwconv_layernorm_triton, x, params, dy), run(dwconv_ln.dwconv_layernorm_triton, x, params, dy)


@pytest.mark.slow
def test_triton_grads_bit_identical():
    first, second = grads_twice(DEV, (1, 40, 20, 5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_op_on_cpu_matches_reference():
    x, params, dy = make_inputs(2, 40, 9, 11, torch.float32)
    assert_close_to_reference(dwconv_ln.dwconv_layernorm, x, params, dy, tol=1e-5)
    leaves = [t.requires_grad_() for t in (x, *params)]
    torch.library.opcheck(torch.ops.emonext.dwconv_layernorm.default, (*leaves, 1e-6))
    _, mean, rstd = torch.ops.emonext.dwconv_layernorm(x, *params, 1e-6)
    x, w, b, lnw, _ = [t.detach() for t in leaves]  # no double backward: only the forward op has a formula
    torch.library.opcheck(torch.ops.emonext.dwconv_layernorm_backward.default,
                          (dy, x, w, b, lnw, mean.detach(), rstd.detach(), 1e-6))


class Block(torch.nn.Module):
    """The first half of a ConvNeXt block around the op, so compile has neighbours to fuse and break between."""

    def __init__(self, C):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = torch.nn.LayerNorm(C, eps=1e-6)
        self.fc = torch.nn.Linear(C, 2 * C)

    def forward(self, x):
        x = x * 2
        y = dwconv_ln.dwconv_layernorm(x, self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias)
        return torch.nn.functional.gelu(self.fc(y)).sum(-1)


def assert_compiled_matches_eager(device, backend):
    torch._dynamo.reset()
    block = Block(40).to(device)
    x = torch.randn(2, 40, 9, 11, device=device)  # NCHW: the Triton backward returns a channels-last dx
    assert torch._dynamo.explain(block)(x).graph_break_count == 0
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = block(eager_x)
    eager.sum().backward()
    eager_grads = [eager_x.grad] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, backend=backend, fullgraph=True)(compiled_x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip([compiled_x.grad] + [p.grad for p in block.parameters()], eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_has_no_graph_breaks_and_matches_eager():
    assert_compiled_matches_eager("cpu", "aot_eager")  # aot_eager: fake kernels and autograd, no C++ build


@pytest.mark.slow
def test_imports_and_runs_without_triton():
    code = (
        "import sys, importlib.util, torch\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        f"spec = importlib.util.spec_from_file_location('dwconv_ln', {dwconv_ln.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not m.triton_available()\n"
        "x = torch.randn(1, 8, 5, 5); w = torch.randn(8, 1, 7, 7); b = torch.randn(8)\n"
        "torch.testing.assert_close(m.dwconv_layernorm(x, w, b, b, b), m.dwconv_layernorm_reference(x, w, b, b, b))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- CUDA, no interpreter: run on a GPU machine ---


# each (H, W, C, dtype) compiles the four kernels anew (a few seconds each), so the list stays short
@cuda
@pytest.mark.parametrize("N,C,H,W,dtype", [
    (4, 96, 56, 56, torch.bfloat16), (8, 192, 28, 28, torch.bfloat16), (8, 384, 14, 14, torch.bfloat16),
    (16, 768, 7, 7, torch.bfloat16), (3, 2048, 7, 7, torch.bfloat16), (2, 80, 5, 3, torch.bfloat16),
    (4, 96, 56, 56, torch.float32), (16, 768, 7, 7, torch.float32), (2, 40, 9, 11, torch.float32),
])
def test_cuda_matches_reference(N, C, H, W, dtype):
    x, params, dy = make_inputs(N, C, H, W, dtype, "channels_last", device="cuda")
    assert_close_to_reference(dwconv_ln.dwconv_layernorm_triton, x, params, dy,
                              tol=1e-4 if dtype == torch.float32 else 1e-2)


@cuda
def test_cuda_noncontiguous_fp16():
    x, params, dy = make_inputs(2, 96, 13, 17, torch.float16, "sliced", device="cuda")
    assert_close_to_reference(dwconv_ln.dwconv_layernorm_triton, x, params, dy, tol=1e-2)


@cuda
def test_cuda_grads_bit_identical():
    first, second = grads_twice("cuda", (16, 192, 28, 28))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@cuda
def test_cuda_inductor_matches_eager():
    assert_compiled_matches_eager("cuda", "inductor")  # the fake kernels' strides match the Triton outputs'


@cuda
def test_cuda_op_runs_triton():
    assert dwconv_ln.triton_available()
    x, params, dy = make_inputs(4, 96, 14, 14, torch.bfloat16, "channels_last", device="cuda")
    op = run(dwconv_ln.dwconv_layernorm, x, params, dy)
    triton_path = run(dwconv_ln.dwconv_layernorm_triton, x, params, dy)
    assert all(torch.equal(a, b) for a, b in zip(op, triton_path))
