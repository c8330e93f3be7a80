"""Fused depthwise 7x7 conv + LayerNorm (the first two layers of every ConvNeXt block), in Triton.

    y = LayerNorm_C(dwconv7x7(x).permute(0, 2, 3, 1))      x: (N, C, H, W) -> y: (N, H, W, C)

Unfused, PyTorch writes the conv output, permutes it and reads it again for LayerNorm; here one program owns
a tile of pixels with all C channels of each (LayerNorm needs the whole row), accumulates the 49 taps from
channels-last x in fp32 registers, normalises and writes y once. Forward saves only x, mean and rstd; the
backward recomputes the conv instead of keeping an activation:

    _bwd_ln_kernel   conv again -> LayerNorm backward -> d(conv out) into a buffer, plus per-tile partial sums
                     for the LayerNorm weight/bias and conv bias grads
    _dx_kernel       dx = transposed depthwise conv of that buffer (the same conv code, kernel flipped)
    _dw_kernel       conv weight grad: per (image, band of rows) partial sums, one reduction per tap
    then torch.sum over the partials: no float atomics, so gradients are bit-identical run to run.

Public functions:
    dwconv_layernorm_reference  the plain PyTorch expression (CPU path, tests, bench baseline)
    dwconv_layernorm_triton     the raw Triton path (autograd.Function, no dispatch); runs on CPU tensors under
                                TRITON_INTERPRET=1
    triton_forward/_backward    the launchers it runs (KERNELS: the Triton kernels they launch)
    dwconv_layernorm            the op `torch.ops.emonext.dwconv_layernorm` (torch.library: fake + autograd),
                                Triton on CUDA, the reference elsewhere, so torch.compile keeps it as one node
    triton_available            whether the Triton path can run on CUDA tensors
"""
import os
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # CPU-only installs: the module still imports and the op runs its reference
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # only so the kernel signatures below evaluate

    def _jit(fn):
        return fn

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Read on every block's forward (also under torch.compile), so it is a plain module-level constant.
_TRITON_OK = triton is not None and torch.cuda.is_available() and not _INTERPRET
K = 7  # kernel size; padding K // 2 keeps H, W


def triton_available() -> bool:
    """True when triton is importable and CUDA is present, i.e. the fused kernels can run on CUDA tensors."""
    return _TRITON_OK


# ----------------------------------------------------------------------------------------------------------
# reference


def _reference_conv(x, conv_weight, conv_bias):
    return F.conv2d(x, conv_weight, conv_bias, padding=K // 2, groups=x.shape[1]).permute(0, 2, 3, 1)


def _reference_with_stats(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    """The reference, also returning LayerNorm's per-pixel fp32 mean and rstd (flat, N*H*W), as the kernel does."""
    conv = _reference_conv(x, conv_weight, conv_bias)
    y, mean, rstd = torch.native_layer_norm(conv, conv.shape[-1:], ln_weight, ln_bias, eps)  # = F.layer_norm
    return y.contiguous(), mean.float().reshape(-1), rstd.float().reshape(-1)


def dwconv_layernorm_reference(x, conv_weight, conv_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """Plain PyTorch: F.layer_norm(F.conv2d(x, w, b, padding=3, groups=C).permute(0, 2, 3, 1), (C,), ...).

    Args:
        x (Tensor): (N, C, H, W), any memory format.
        conv_weight (Tensor): (C, 1, 7, 7) depthwise conv weight.  conv_bias (Tensor): (C,).
        ln_weight, ln_bias (Tensor): (C,) LayerNorm affine parameters.
        eps (float): LayerNorm epsilon. Default: 1e-6 (ConvNeXt's).
    Returns:
        Tensor: (N, H, W, C), contiguous, dtype of x.
    """
    return _reference_with_stats(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)[0]


# ----------------------------------------------------------------------------------------------------------
# kernels. Tensors are channels-last: element (n, h, w, c) of an (N, H, W, C) buffer is at (n*H*W + h*W + w)*C + c.
# A program owns a BLOCK_H x BLOCK_W tile of pixels of one image (2-D, so the 7x7 halo it re-reads stays small
# and in L1) and BLOCK_C channels. H, W, C are compile-time constants (a model has a few stage shapes): address
# arithmetic folds, and channel masks vanish when C is a power of two.


@_jit
def _pixels(tile, H: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row, column and in-image mask of the BLOCK_H * BLOCK_W pixels of 2-D tile number `tile` (row-major)."""
    tiles_w: tl.constexpr = (W + BLOCK_W - 1) // BLOCK_W
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    h = (tile // tiles_w) * BLOCK_H + i // BLOCK_W
    w = (tile % tiles_w) * BLOCK_W + i % BLOCK_W
    return h, w, (h < H) & (w < W)


@_jit
def _conv_tile(x_img, WT, h, w, p_ok, c, c_ok, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """fp32 (BLOCK_P, BLOCK_C) depthwise conv (no bias) at pixels (h, w); WT is the (K*K, C) tap-major weight."""
    offs = (h * W + w)[:, None] * C + c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in range(K):  # a loop, not unrolled: 49 unrolled loads would all be in flight and spill registers
        hh = h + (kh - K // 2)
        row_ok = p_ok & (hh >= 0) & (hh < H)
        for kw in tl.static_range(K):
            ww = w + (kw - K // 2)
            ok = row_ok & (ww >= 0) & (ww < W)
            xv = tl.load(x_img + offs + ((kh - K // 2) * W + (kw - K // 2)) * C,
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(WT + (kh * K + kw) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@_jit
def _conv_bias_tile(X, WT, B, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """This program's pixel tile (all C channels): image n, pixels (h, w, p_ok), channels (c, c_ok) and the fp32
    conv + bias, as the forward and the LayerNorm backward both start."""
    n = tl.program_id(1).to(tl.int64)
    h, w, p_ok = _pixels(tl.program_id(0), H, W, BLOCK_H, BLOCK_W)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    conv = _conv_tile(X + n * H * W * C, WT, h, w, p_ok, c, c_ok, H, W, C, BLOCK_H * BLOCK_W, BLOCK_C, K)
    conv += tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return n, h, w, p_ok, c, c_ok, conv


@_jit
def _fwd_kernel(X, WT, B, LW, LB, Y, MEAN, RSTD, eps, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """y = LayerNorm(conv(x) + b) on one pixel tile, all C channels (BLOCK_C >= C); stores fp32 mean and rstd."""
    n, h, w, p_ok, c, c_ok, conv = _conv_bias_tile(X, WT, B, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, K)
    mean = tl.sum(conv, axis=1) / C  # padded channels of conv are 0, so sums over BLOCK_C are sums over C
    diff = tl.where(c_ok[None, :], conv - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / C + eps)
    lw = tl.load(LW + c, mask=c_ok, other=0.0).to(tl.float32)
    lb = tl.load(LB + c, mask=c_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * lw[None, :] + lb[None, :]
    pix = n * H * W + h * W + w
    tl.store(Y + pix[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])
    tl.store(MEAN + pix, mean, mask=p_ok)
    tl.store(RSTD + pix, rstd, mask=p_ok)


@_jit
def _bwd_ln_kernel(X, WT, B, LW, DY, MEAN, RSTD, DCONV, PART, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """Recompute the conv, LayerNorm backward: DCONV = d(conv out); PART[tile] = (sum dy*xhat, sum dy, sum dconv)."""
    n, h, w, p_ok, c, c_ok, conv = _conv_bias_tile(X, WT, B, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, K)
    ok = p_ok[:, None] & c_ok[None, :]
    pix = n * H * W + h * W + w
    mean = tl.load(MEAN + pix, mask=p_ok, other=0.0)
    rstd = tl.load(RSTD + pix, mask=p_ok, other=0.0)
    xhat = tl.where(ok, (conv - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(DY + pix[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
    g = dy * tl.load(LW + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    g_mean = tl.sum(g, axis=1) / C
    gx_mean = tl.sum(g * xhat, axis=1) / C
    dconv = tl.where(ok, (g - g_mean[:, None] - xhat * gx_mean[:, None]) * rstd[:, None], 0.0)
    tl.store(DCONV + pix[:, None] * C + c[None, :], dconv.to(DCONV.dtype.element_ty), mask=ok)
    part = PART + (n * tl.num_programs(0) + tl.program_id(0)) * 3 * C + c
    tl.store(part, tl.sum(dy * xhat, axis=0), mask=c_ok)
    tl.store(part + C, tl.sum(dy, axis=0), mask=c_ok)
    tl.store(part + 2 * C, tl.sum(dconv, axis=0), mask=c_ok)


@_jit
def _dx_kernel(DCONV, WT_FLIP, DX, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """dx[q] = sum_t dconv[q - off_t] w_t: the same depthwise conv, with the kernel flipped. Grid: (tiles, N, C blocks)."""
    img = tl.program_id(1).to(tl.int64) * H * W * C
    h, w, p_ok = _pixels(tl.program_id(0), H, W, BLOCK_H, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dx = _conv_tile(DCONV + img, WT_FLIP, h, w, p_ok, c, c_ok, H, W, C, BLOCK_H * BLOCK_W, BLOCK_C, K)
    tl.store(DX + img + (h * W + w)[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty),
             mask=p_ok[:, None] & c_ok[None, :])


@_jit
def _dw_kernel(X, DCONV, PARTW, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """PARTW[n, band, t] = sum over the band's pixels p of dconv[p] * x[p + off_t], one BLOCK_C channel block.

    A program owns a band of BLOCK_H rows, all columns; for each tap it walks the band's tiles accumulating
    products element-wise and reduces across the tile once per tap. Grid: (bands, N, C blocks).
    """
    img = tl.program_id(1).to(tl.int64) * H * W * C
    tiles_w: tl.constexpr = (W + BLOCK_W - 1) // BLOCK_W
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    partw = PARTW + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * K * K * C + c
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
            for tile in range(tl.program_id(0) * tiles_w, (tl.program_id(0) + 1) * tiles_w):
                h, w, p_ok = _pixels(tile, H, W, BLOCK_H, BLOCK_W)
                hh = h + (kh - K // 2)
                ww = w + (kw - K // 2)
                ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                offs = img + (h * W + w)[:, None] * C + c[None, :]
                ds = tl.load(DCONV + offs, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
                xv = tl.load(X + offs + ((kh - K // 2) * W + (kw - K // 2)) * C,
                             mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += ds.to(tl.float32) * xv.to(tl.float32)
            tl.store(partw + (kh * K + kw) * C, tl.sum(acc, axis=0), mask=c_ok)


KERNELS = (_fwd_kernel, _bwd_ln_kernel, _dx_kernel, _dw_kernel)  # every kernel the launchers run


# ----------------------------------------------------------------------------------------------------------
# launchers


# Tile policy, read at every launch. Under the interpreter, where a program instance and a loop step cost the same
# however big, a tile spans whole rows; the interpreter tests of CUDA's 2-D tiles switch _FULL_ROW_TILES off.
_FULL_ROW_TILES = _INTERPRET
_TILE_ELEMS = 4096  # (pixels x channels) values per tile, each held in fp32


def _tile(H: int, W: int, block_c: int):
    """(BLOCK_H, BLOCK_W, num_warps) for a tile of about _TILE_ELEMS values with `block_c` channels per pixel.

    BLOCK_W: of the widths 16, 8 and 4 that keep the tile within _TILE_ELEMS (4 if none does), the one that pads W
    the least, then the widest; BLOCK_H fills the tile. Warps: 8 values per thread and tensor. With 16, ptxas for
    sm_90 spilled 8-32 bytes per thread in 10 of the 32 float32 launches at the ConvNeXt-T and atto (64 px) stage
    shapes; with 8 no launch spills (`python -m tools.static`, BENCHMARKS.md).
    """
    if _FULL_ROW_TILES:
        block_w = triton.next_power_of_2(W)
    else:
        fitting = [b for b in (16, 8, 4) if b * block_c <= _TILE_ELEMS] or [4]
        block_w = min(fitting, key=lambda b: triton.cdiv(W, b) * b)
    block_h = max(1, min(triton.next_power_of_2(H), _TILE_ELEMS // (block_c * block_w)))
    return block_h, block_w, max(4, min(16, block_h * block_w * block_c // 256))


def _n_tiles(H, W, block_h, block_w):
    return triton.cdiv(H, block_h) * triton.cdiv(W, block_w)


def _channels_last(x):
    """x (N, C, H, W) as a contiguous (N, H, W, C) tensor (a view when x is already channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _flat_weight(conv_weight):
    return conv_weight.reshape(conv_weight.shape[0], K * K).t().contiguous()  # (K*K, C): tap-major


def triton_forward(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    """Launch the forward kernel. Returns y (N, H, W, C) in x's dtype and fp32 mean, rstd of shape (N*H*W,)."""
    N, C, H, W = x.shape
    xc = _channels_last(x)
    y = torch.empty_like(xc)
    mean = torch.empty(N * H * W, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_c = triton.next_power_of_2(C)
    bh, bw, warps = _tile(H, W, block_c)
    _fwd_kernel[(_n_tiles(H, W, bh, bw), N)](
        xc, _flat_weight(conv_weight), conv_bias, ln_weight, ln_bias, y, mean, rstd, eps, H=H, W=W, C=C,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=block_c, K=K, num_warps=warps)
    return y, mean, rstd


def triton_backward(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd):
    """Launch the three backward kernels and reduce their per-tile partial sums.

    Returns:
        (dx, d conv_weight, d conv_bias, d ln_weight, d ln_bias), each in its input's dtype; dx is channels-last.
    """
    N, C, H, W = x.shape
    xc = _channels_last(x)
    dy = dy.contiguous()
    dconv = torch.empty_like(xc)  # x's dtype, as eager's conv-output gradient

    block_c = triton.next_power_of_2(C)
    bh, bw, warps = _tile(H, W, block_c)
    tiles = _n_tiles(H, W, bh, bw)
    part = torch.empty(N * tiles, 3, C, device=x.device, dtype=torch.float32)
    _bwd_ln_kernel[(tiles, N)](xc, _flat_weight(conv_weight), conv_bias, ln_weight, dy, mean, rstd, dconv, part,
                               H=H, W=W, C=C, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=block_c, K=K, num_warps=warps)

    dx = torch.empty_like(xc)  # dx and dw only need a channel block: more programs for the small stages
    block_c = min(block_c, 128)
    bh, bw, warps = _tile(H, W, block_c)
    _dx_kernel[(_n_tiles(H, W, bh, bw), N, triton.cdiv(C, block_c))](
        dconv, _flat_weight(conv_weight.flip((2, 3))), dx, H=H, W=W, C=C,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=block_c, K=K, num_warps=warps)

    block_c = min(block_c, 32)
    bh, bw, warps = _tile(H, W, block_c)
    bands = triton.cdiv(H, bh)
    partw = torch.empty(N, bands, K * K, C, device=x.device, dtype=torch.float32)
    _dw_kernel[(bands, N, triton.cdiv(C, block_c))](xc, dconv, partw, H=H, W=W, C=C,
                                                    BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=block_c, K=K, num_warps=warps)

    # separate sums: a custom op's outputs must not be views of one another
    d_lnw, d_lnb, d_convb = (part[:, i].sum(0) for i in range(3))
    d_convw = partw.sum((0, 1)).t().reshape(C, 1, K, K)
    return (dx.permute(0, 3, 1, 2), d_convw.to(conv_weight.dtype), d_convb.to(conv_bias.dtype),
            d_lnw.to(ln_weight.dtype), d_lnb.to(ln_weight.dtype))


class _DwconvLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
        y, mean, rstd = triton_forward(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *triton_backward(dy, *ctx.saved_tensors), None


def dwconv_layernorm_triton(x, conv_weight, conv_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """The Triton kernels, differentiable, without dispatch (CUDA tensors, or CPU ones under TRITON_INTERPRET=1).

    Same arguments and result as `dwconv_layernorm_reference`; channels-last x avoids a copy.
    """
    return _DwconvLayerNorm.apply(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration: the forward op returns (y, mean, rstd) so its autograd can hand the saved stats
# to the backward op; both are opaque single nodes for torch.compile.


@torch.library.custom_op("emonext::dwconv_layernorm", mutates_args=())
def _op_forward(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, ln_weight: torch.Tensor,
                ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reference_with_stats(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)


@torch.library.custom_op("emonext::dwconv_layernorm_backward", mutates_args=())
def _op_backward(dy: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                 ln_weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the aten backward ops eager autograd runs for the reference (an op's kernel runs below autograd, so it
    # cannot differentiate the reference itself); the stats are recomputed in LayerNorm's own dtype
    C = x.shape[1]
    conv = _reference_conv(x, conv_weight, conv_bias)
    _, mean, rstd = torch.native_layer_norm(conv, (C,), None, None, eps)
    dconv, d_lnw, _ = torch.ops.aten.native_layer_norm_backward(dy, conv, (C,), mean, rstd, ln_weight, None,
                                                               [True, True, False])
    dx, d_convw, d_convb = torch.ops.aten.convolution_backward(
        dconv.permute(0, 3, 1, 2), x, conv_weight, [C], [1, 1], [K // 2] * 2, [1, 1], False, [0, 0], C,
        [True, True, True])
    # dx channels-last like the Triton path's: the fake kernel must give every implementation's strides
    return (dx.contiguous(memory_format=torch.channels_last), d_convw, d_convb, d_lnw,
            dy.sum((0, 1, 2)).to(ln_weight.dtype))


if _TRITON_OK:
    _op_forward.register_kernel("cuda")(triton_forward)

    @_op_backward.register_kernel("cuda")
    def _(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd, eps):
        return triton_backward(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd)


@_op_forward.register_fake
def _(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    N, C, H, W = x.shape
    stat = x.new_empty(N * H * W, dtype=torch.float32)
    return x.new_empty(N, H, W, C), stat, torch.empty_like(stat)


@_op_backward.register_fake
def _(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd, eps):
    return (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(conv_weight), torch.empty_like(conv_bias),
            torch.empty_like(ln_weight), torch.empty_like(ln_weight))


def _setup_context(ctx, inputs, output):
    x, conv_weight, conv_bias, ln_weight, _, ctx.eps = inputs
    ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, *output[1:])


def _autograd_backward(ctx, dy, _dmean, _drstd):
    return *torch.ops.emonext.dwconv_layernorm_backward(dy, *ctx.saved_tensors, ctx.eps), None


_op_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def dwconv_layernorm(x, conv_weight, conv_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """Fused depthwise 7x7 conv + LayerNorm through `torch.ops.emonext.dwconv_layernorm`.

    Triton on CUDA (when `triton_available()`), the reference elsewhere; differentiable and traced by
    torch.compile as one node. Arguments and result as `dwconv_layernorm_reference`.
    """
    return torch.ops.emonext.dwconv_layernorm(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)[0]
