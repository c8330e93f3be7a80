"""Fused depthwise 7x7 conv + LayerNorm (the first two layers of every ConvNeXt block), in Triton.

    y = LayerNorm_C(dwconv7x7(x).permute(0, 2, 3, 1))      x: (N, C, H, W) -> y: (N, H, W, C)

Unfused, PyTorch writes the conv output, permutes it and reads it again for LayerNorm; here one program owns
a tile of pixels with all C channels of each (LayerNorm needs the whole row), accumulates the 49 taps from
channels-last x in fp32 registers, normalises and writes y once. Forward saves only x, mean and rstd; the
backward recomputes the conv instead of keeping an activation:

    _bwd_ln_kernel   conv again -> LayerNorm backward -> d(conv out) into a buffer, plus per-tile partial sums
                     for the LayerNorm weight/bias and conv bias grads
    _bwd_dx_kernel   dx = transposed depthwise conv of that buffer, plus per-tile partial sums of the conv
                     weight grad (the same shifted loads serve both)
    then one torch.sum over the tiles: no float atomics, so gradients are bit-identical run to run.

Public functions:
    dwconv_layernorm_reference  the plain PyTorch expression (CPU path, tests, bench baseline)
    dwconv_layernorm_triton     the raw Triton path (autograd.Function, no dispatch); runs on CPU tensors under
                                TRITON_INTERPRET=1
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
# A program owns BLOCK_P consecutive pixels (row-major over H*W) of one image and BLOCK_C channels.


@_jit
def _conv_tile(x_img, WT, B, h, w, p_ok, c, c_ok, H, W, C,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """fp32 (BLOCK_P, BLOCK_C) depthwise conv output at pixels (h, w) of one image; WT is the (K*K, C) weight."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(K):
        hh = h + (kh - K // 2)
        row_ok = p_ok & (hh >= 0) & (hh < H)
        for kw in tl.static_range(K):
            ww = w + (kw - K // 2)
            ok = row_ok & (ww >= 0) & (ww < W)
            xv = tl.load(x_img + (hh * W + ww)[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(WT + (kh * K + kw) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    bias = tl.load(B + c, mask=c_ok, other=0.0)
    return acc + bias.to(tl.float32)[None, :]


@_jit
def _fwd_kernel(X, WT, B, LW, LB, Y, MEAN, RSTD, H, W, C, eps,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """y = LayerNorm(conv(x)) for BLOCK_P pixels x all C channels (BLOCK_C >= C); stores fp32 mean and rstd."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    p_ok = p < H * W
    c_ok = c < C
    conv = _conv_tile(X + n * H * W * C, WT, B, p // W, p % W, p_ok, c, c_ok, H, W, C, BLOCK_P, BLOCK_C, K)
    # padded channels of conv are 0 (masked loads), so plain sums over BLOCK_C are sums over C
    mean = tl.sum(conv, axis=1) / C
    diff = tl.where(c_ok[None, :], conv - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / C + eps)
    lw = tl.load(LW + c, mask=c_ok, other=0.0).to(tl.float32)
    lb = tl.load(LB + c, mask=c_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * lw[None, :] + lb[None, :]
    pix = n * H * W + p
    tl.store(Y + pix[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])
    tl.store(MEAN + pix, mean, mask=p_ok)
    tl.store(RSTD + pix, rstd, mask=p_ok)


@_jit
def _bwd_ln_kernel(X, WT, B, LW, DY, MEAN, RSTD, DCONV, PART, H, W, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """Recompute conv, LayerNorm backward: DCONV = d(conv out); PART[tile] = (sum dy*xhat, sum dy, sum dconv)."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    p_ok = p < H * W
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    conv = _conv_tile(X + n * H * W * C, WT, B, p // W, p % W, p_ok, c, c_ok, H, W, C, BLOCK_P, BLOCK_C, K)
    pix = n * H * W + p
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
def _bwd_dx_kernel(X, DCONV, WT, DX, PARTW, H, W, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr):
    """dx[q] = sum_t dconv[q - off_t] * w_t;  PARTW[tile, t] = sum_{q in tile} dconv[q - off_t] * x[q].

    Both come from the same shifted load of dconv: the conv weight grad sum_p dconv[p] * x[p + off_t] is the
    same sum indexed by q = p + off_t. Grid: (pixel tiles, N, channel blocks).
    """
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < H * W
    c_ok = c < C
    h = p // W
    w = p % W
    img = n * H * W * C
    x = tl.load(X + img + p[:, None] * C + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    partw = PARTW + (n * tl.num_programs(0) + tl.program_id(0)) * K * K * C + c
    dx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(K):
        hh = h - (kh - K // 2)
        row_ok = p_ok & (hh >= 0) & (hh < H)
        for kw in tl.static_range(K):
            ww = w - (kw - K // 2)
            ok = row_ok & (ww >= 0) & (ww < W)
            ds = tl.load(DCONV + img + (hh * W + ww)[:, None] * C + c[None, :],
                         mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            wv = tl.load(WT + (kh * K + kw) * C + c, mask=c_ok, other=0.0).to(tl.float32)
            dx += ds * wv[None, :]
            tl.store(partw + (kh * K + kw) * C, tl.sum(ds * x, axis=0), mask=c_ok)
    tl.store(DX + img + p[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# launchers


def _tile(C: int, HW: int, block_c: int, elems: int):
    """(BLOCK_P, BLOCK_C, num_warps) for a program of about `elems` fp32 values with BLOCK_C >= block_c channels.

    Under the interpreter each program instance costs ~0.3 s however big, so tiles there are as large as possible.
    """
    if _INTERPRET:
        elems = 1 << 16
    block_p = max(1, min(triton.next_power_of_2(HW), elems // block_c))
    return block_p, block_c, 4 if block_p * block_c <= 4096 else 8


def _channels_last(x):
    """x (N, C, H, W) as a contiguous (N, H, W, C) tensor (a view when x is already channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _flat_weight(conv_weight):
    return conv_weight.reshape(conv_weight.shape[0], K * K).t().contiguous()  # (K*K, C): tap-major


def _forward(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    """Launch the forward kernel. Returns y (N, H, W, C) in x's dtype and fp32 mean, rstd of shape (N*H*W,)."""
    N, C, H, W = x.shape
    xc = _channels_last(x)
    y = torch.empty_like(xc)
    mean = torch.empty(N * H * W, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_p, block_c, warps = _tile(C, H * W, triton.next_power_of_2(C), 8192)
    _fwd_kernel[(triton.cdiv(H * W, block_p), N)](
        xc, _flat_weight(conv_weight), conv_bias, ln_weight, ln_bias, y, mean, rstd, H, W, C, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, K=K, num_warps=warps)
    return y, mean, rstd


def _backward(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd):
    """Launch the two backward kernels and reduce their per-tile partial sums.

    Returns:
        (dx, d conv_weight, d conv_bias, d ln_weight, d ln_bias), each in its input's dtype; dx is channels-last.
    """
    N, C, H, W = x.shape
    xc = _channels_last(x)
    dy = dy.contiguous()
    wt = _flat_weight(conv_weight)
    dconv = torch.empty_like(xc)  # x's dtype, as eager's conv-output gradient

    block_p, block_c, warps = _tile(C, H * W, triton.next_power_of_2(C), 4096)
    tiles = triton.cdiv(H * W, block_p)
    part = torch.empty(N * tiles, 3, C, device=x.device, dtype=torch.float32)
    _bwd_ln_kernel[(tiles, N)](xc, wt, conv_bias, ln_weight, dy, mean, rstd, dconv, part, H, W, C,
                               BLOCK_P=block_p, BLOCK_C=block_c, K=K, num_warps=warps)

    # a thin channel block and a tall pixel tile: fewer tiles means a smaller weight-grad partial buffer
    block_p, block_c, warps = _tile(C, H * W, min(triton.next_power_of_2(C), 32), 8192)
    tiles = triton.cdiv(H * W, block_p)
    partw = torch.empty(N * tiles, K * K, C, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(xc)
    _bwd_dx_kernel[(tiles, N, triton.cdiv(C, block_c))](xc, dconv, wt, dx, partw, H, W, C,
                                                        BLOCK_P=block_p, BLOCK_C=block_c, K=K, num_warps=warps)

    d_lnw, d_lnb, d_convb = part.sum(0)
    d_convw = partw.sum(0).t().reshape(C, 1, K, K)
    return (dx.permute(0, 3, 1, 2), d_convw.to(conv_weight.dtype), d_convb.to(conv_bias.dtype),
            d_lnw.to(ln_weight.dtype), d_lnb.to(ln_weight.dtype))


class _DwconvLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
        y, mean, rstd = _forward(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_backward(dy, *ctx.saved_tensors), None


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
    _op_forward.register_kernel("cuda")(_forward)

    @_op_backward.register_kernel("cuda")
    def _(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd, eps):
        return _backward(dy, x, conv_weight, conv_bias, ln_weight, mean, rstd)


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
