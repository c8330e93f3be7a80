"""emonext.py: shapes, the official key layout, the loss, load_weights and its errors, class names and checkpoint
writing, the inference path (preprocess, ten_crop, predict_logits, predict, grey_faces) and the normalisation
constants carried by the config, the copy-alone promise, and the fused-kernels backend on CPU (issue 2's test list);
and, in a section of its own, the fast inference path (issue 13): eval mode without autograd folds the STN's
BatchNorms, `for_inference()`, and predict, predict_logits and eval.py on that path.

Runs on one CPU thread: on a busy 2-core machine two OpenMP threads fight each other and run ~10x slower.
The big sizes (tiny ... xlarge) are built and run on the meta device: shapes and parameter counts, no arithmetic.
"""
import ast
import errno
import os
import re
import stat
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import emonext
import eval as evaluate
import synthetic
from conftest import one_graph_code
from emonext import SIZES, EmoNeXt, load_weights

SMALL = ("atto", "femto", "pico", "nano")
BIG = ("tiny", "small", "base", "large", "xlarge")
IMG_SIZES = (48, 64, 112, 224)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(size="atto", img_size=48, seed=0, **kw):
    torch.manual_seed(seed)
    return EmoNeXt.from_size(size, img_size=img_size, **kw)


def scramble(m, seed=1):
    """Make every part of the model matter: a non-identity STN that depends on its input, BatchNorm statistics
    that are not (0, 1), layer scales of 1, attention weights large enough for SA to be well above zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.fc_loc[2].weight.copy_(torch.randn(m.fc_loc[2].weight.shape, generator=g) * 0.02)
        m.fc_loc[2].bias.add_(torch.tensor([0.05, -0.1, 0.013, 0.08, -0.05, -0.021]))
        for bn in (m.localization[1], m.localization[5]):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        for stage in m.stages:
            for block in stage:
                block.gamma.fill_(0.5)
        for lin in (m.attention.query, m.attention.key):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
    return m


# -----------------------------------------------------------------------------
# shapes, sizes, parameter counts

def convnext_params(depths, dims, in_chans, num_classes):
    """Parameters of facebookresearch's ConvNeXt (anchored below on its published counts)."""
    n = in_chans * dims[0] * 16 + dims[0] + 2 * dims[0]  # stem conv + LN
    for i in range(1, 4):
        n += 2 * dims[i - 1] + 4 * dims[i - 1] * dims[i] + dims[i]  # LN + conv 2x2
    n += sum(depth * (8 * d * d + 58 * d) for depth, d in zip(depths, dims))  # dwconv, LN, 2 linears, gamma
    return n + 2 * dims[3] + dims[3] * num_classes + num_classes  # norm + head


def emonext_params(size, img_size, in_chans, num_classes=7):
    depths, dims = SIZES[size]
    s = ((img_size - 6) // 2 - 4) // 2
    stn = in_chans * 8 * 49 + 8 + 16 + 8 * 10 * 25 + 10 + 20 + (10 * s * s * 32 + 32) + (32 * 6 + 6)
    se = sum(2 * d * (d // 16) for d in dims[1:])
    attention = 2 * dims[3] + 3 * (dims[3] ** 2 + dims[3])
    return convnext_params(depths, dims, in_chans, num_classes) + stn + se + attention


def test_convnext_param_formula_matches_published_counts():
    assert convnext_params(*SIZES["tiny"], 3, 1000) == 28_589_128
    assert convnext_params(*SIZES["small"], 3, 1000) == 50_223_688
    assert convnext_params(*SIZES["base"], 3, 1000) == 88_591_464


def test_size_table():
    assert SIZES["atto"] == ((2, 2, 6, 2), (40, 80, 160, 320))
    assert SIZES["femto"][1] == (48, 96, 192, 384) and SIZES["pico"][1] == (64, 128, 256, 512)
    assert SIZES["nano"] == ((2, 2, 8, 2), (80, 160, 320, 640))
    assert SIZES["tiny"] == ((3, 3, 9, 3), (96, 192, 384, 768))
    assert SIZES["small"] == ((3, 3, 27, 3), (96, 192, 384, 768))
    assert SIZES["base"][1] == (128, 256, 512, 1024) and SIZES["large"][1] == (192, 384, 768, 1536)
    assert SIZES["xlarge"] == ((3, 3, 27, 3), (256, 512, 1024, 2048))
    with pytest.raises(ValueError, match="unknown EmoNeXt size 'huge'"):
        EmoNeXt.from_size("huge")


@pytest.mark.parametrize("img_size", IMG_SIZES)
@pytest.mark.parametrize("size", SMALL)
def test_shapes_small_sizes(size, img_size):
    in_chans = 1 if size in ("atto", "pico") else 3
    m = model(size, img_size, in_chans=in_chans).eval()
    assert sum(p.numel() for p in m.parameters()) == emonext_params(size, img_size, in_chans)
    assert m.fc_loc[0].in_features == 10 * (((img_size - 6) // 2 - 4) // 2) ** 2
    x = torch.randn(2, in_chans, img_size, img_size)
    with torch.no_grad():
        warped, theta = m.stn(x)
        features = m.forward_features(x)
        logits = m(x)
    assert warped.shape == x.shape and theta.shape == (2, 2, 3)
    assert features.shape == (2, SIZES[size][1][-1])
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", BIG)
def test_shapes_big_sizes_on_meta(size):
    for img_size in IMG_SIZES:
        with torch.device("meta"):
            m = EmoNeXt.from_size(size, img_size=img_size, num_classes=5)
            logits = m.eval()(torch.empty(2, 3, img_size, img_size))
            features = m.forward_features(torch.empty(3, 1, img_size, img_size))
        assert logits.shape == (2, 5) and logits.is_meta
        assert features.shape == (3, SIZES[size][1][-1])
        assert sum(p.numel() for p in m.parameters()) == emonext_params(size, img_size, 3, 5)


def test_stn_regressor_width_at_224_is_official():
    assert emonext.stn_feature_side(224) == 52
    with torch.device("meta"):
        m = EmoNeXt.from_size("atto", img_size=224)
    assert m.fc_loc[0].weight.shape == (32, 10 * 52 * 52)


def test_config_defaults():
    c = emonext.EmoNeXtConfig()
    assert (c.num_classes, c.label_smoothing, c.sa_weight, c.in_chans) == (7, 0.2, 1.0, 3)
    assert (c.drop_path_rate, c.layer_scale_init) == (0.1, 1e-6)
    m = model("atto", 48, drop_path_rate=0.3)
    assert m.stages[0][0].drop_path.p == 0.0 and m.stages[3][1].drop_path.p == pytest.approx(0.3)
    rates = [b.drop_path.p for stage in m.stages for b in stage]
    assert rates == sorted(rates) and len(rates) == 12
    assert torch.all(m.stages[1][0].gamma == 1e-6)


def test_init_as_official():
    m = model("atto", 48)
    ws = torch.cat([mod.weight.flatten() for mod in m.modules()
                    if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod is not m.fc_loc[2]])
    # trunc_normal_(std=0.02) as the official code: the cut at +-2 (absolute) is 100 std away, so a plain N(0, 0.02)
    assert ws.std().item() == pytest.approx(0.02, rel=0.03) and abs(ws.mean().item()) < 1e-3
    assert ws.abs().max() < 0.15
    biases = [mod.bias for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))
              and mod.bias is not None and mod is not m.fc_loc[2]]
    assert all(torch.all(b == 0) for b in biases)


# -----------------------------------------------------------------------------
# STN, loss, self-attention

@pytest.mark.parametrize("in_chans", (1, 3))
def test_identity_stn_at_init(in_chans):
    m = model("atto", 64, in_chans=in_chans)
    x = torch.randn(3, in_chans, 64, 64)
    warped, theta = m.stn(x)
    assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))
    torch.testing.assert_close(warped, x, rtol=0, atol=1e-4)  # grid coordinates carry float rounding
    assert torch.all(m.fc_loc[2].weight == 0)


def test_stn_warps_when_theta_is_not_identity():
    m = model("atto", 48, in_chans=1)
    with torch.no_grad():
        m.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 0.5, 0, 1, 0]))  # shift by a quarter of the image
    x = torch.randn(2, 1, 48, 48)
    warped, _ = m.stn(x)
    # output column j samples input column j + 0.5 * 47 / 2 = j + 11.75: away from the border it is a shifted x
    torch.testing.assert_close(warped[..., :, 5:30], 0.25 * x[..., :, 16:41] + 0.75 * x[..., :, 17:42],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ("torch", pytest.param("fused", marks=pytest.mark.slow)))  # fused: interpreted
def test_stn_grid_math_is_fp32_under_autocast(backend):
    """Under bf16 autocast theta, the grid and the sampling stay fp32: the identity warp stays exact and any warp
    is the fp32 model's (bf16 grid coordinates sample up to 0.06 px off at 64 even for the identity)."""
    k = emonext.kernels
    if backend == "fused":
        k = _kernels()
    if k is not None:
        k.set_backend(backend)
    try:
        m = model("atto", 64, in_chans=1).eval()
        x = torch.randn(3, 1, 64, 64)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            warped, theta = m.stn(x)
        assert theta.dtype == torch.float32 and warped.dtype == torch.float32
        assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))
        torch.testing.assert_close(warped, x, rtol=0, atol=1e-4)  # as exact as in fp32 (test_identity_stn_at_init)
        with torch.no_grad():  # a fixed turn, zoom and shift, none of them a bf16 number
            m.fc_loc[2].bias.copy_(torch.tensor([0.9553, -0.2955, 0.0123, 0.2955, 0.9553, -0.0371]))
            ref, ref_theta = m.stn(x)
            with torch.autocast("cpu", torch.bfloat16):
                warped, theta = m.stn(x)
        assert torch.equal(theta, ref_theta)
        torch.testing.assert_close(warped, ref, rtol=0, atol=1e-5)
    finally:
        if k is not None:
            k.set_backend("auto")


def loss_by_hand(m, x, y):
    features = m.forward_features(x)
    logits = features @ m.head.weight.T + m.head.bias
    k, eps = logits.shape[1], m.config.label_smoothing
    q = torch.full_like(logits, eps / k)
    q[torch.arange(len(y)), y] += 1 - eps
    ce = -(q * logits.log_softmax(-1)).sum(1).mean()
    att = m.attention
    f = features - features.mean(1, keepdim=True)
    f = f / torch.sqrt(features.var(1, unbiased=False, keepdim=True) + att.norm.eps) * att.norm.weight + att.norm.bias
    q_, k_ = f @ att.query.weight.T + att.query.bias, f @ att.key.weight.T + att.key.bias
    w = torch.softmax(q_ @ k_.T / features.shape[1] ** 0.25, dim=-1)
    assert w.shape == (len(x), len(x))
    sa = ((w - w.mean()) ** 2).mean()
    return logits, ce, sa


@pytest.mark.parametrize("label_smoothing,sa_weight", [(0.2, 1.0), (0.1, 30.0), (0.0, 0.0)])
def test_loss_equals_ce_plus_weighted_sa(label_smoothing, sa_weight):
    m = scramble(model("atto", 48, in_chans=1, label_smoothing=label_smoothing, sa_weight=sa_weight)).eval()
    x, y = torch.randn(6, 1, 48, 48), torch.tensor([0, 1, 2, 3, 6, 6])
    with torch.no_grad():
        logits, loss, (ce, sa) = m(x, y, loss_parts=True)
        logits2, loss2 = m(x, y)
        ref_logits, ref_ce, ref_sa = loss_by_hand(m, x, y)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sa, ref_sa, rtol=1e-4, atol=1e-9)
    assert sa.item() > 1e-4  # the scrambled attention makes SA matter
    torch.testing.assert_close(loss, ref_ce + sa_weight * ref_sa, rtol=1e-5, atol=1e-6)
    assert torch.equal(loss, loss2) and torch.equal(logits, logits2)
    torch.testing.assert_close(ce, F.cross_entropy(logits, y, label_smoothing=label_smoothing))


def test_sa_not_computed_without_targets_and_never_changes_logits():
    m = scramble(model("atto", 48, in_chans=1)).eval()
    x, y = torch.randn(4, 1, 48, 48), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        logits_with, _ = m(x, y)
        before = m(x)

        def boom(*a):
            raise AssertionError("attention ran without targets")
        m.attention.forward = boom
        logits = m(x)  # must not call the attention
        del m.attention.forward
        for p in m.attention.parameters():
            p.mul_(-3.0).add_(1.0)
        after = m(x)
    assert torch.equal(logits, before) and torch.equal(after, before) and torch.equal(logits_with, before)


def test_gradients_reach_the_stn_regressor():
    m = model("atto", 48, in_chans=1).train()
    x, y = torch.randn(4, 1, 48, 48), torch.tensor([0, 3, 5, 6])
    _, loss = m(x, y)
    loss.backward()
    assert m.fc_loc[2].weight.grad is not None and m.fc_loc[2].weight.grad.abs().sum() > 0
    assert m.fc_loc[2].bias.grad.abs().sum() > 0
    assert m.attention.query.weight.grad.abs().sum() > 0  # SA's gradient flows too
    # one optimiser step on the regressor moves theta off the identity, so the next step reaches the localization net
    with torch.no_grad():
        m.fc_loc[2].weight.sub_(1.0 * m.fc_loc[2].weight.grad)
    m.zero_grad()
    m(x, y)[1].backward()
    assert m.localization[0].weight.grad.abs().sum() > 0


def test_drop_path_stochastic_in_train_deterministic_in_eval():
    m = model("atto", 48, in_chans=1, drop_path_rate=0.5, layer_scale_init=1.0)
    x = torch.randn(8, 1, 48, 48)
    with torch.no_grad():
        m.train()
        a, b = m(x), m(x)
        m.eval()
        c, d = m(x), m(x)
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(c, d)
    m0 = model("atto", 48, in_chans=1, drop_path_rate=0.0, layer_scale_init=1.0).train()
    with torch.no_grad():
        assert torch.equal(m0(x), m0(x))  # without drop path, train mode is deterministic too
    dp = emonext.DropPath(0.25).train()
    torch.manual_seed(0)
    out = dp(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # whole samples are dropped or kept
    assert per_sample[:, 0].unique().tolist() == [0.0, pytest.approx(4 / 3)]
    assert (per_sample[:, 0] == 0).double().mean().item() == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("side", [1, 2, 3, 4, 6, 7, 9])
def test_depthwise_conv_on_maps_smaller_than_its_kernel_is_the_7x7_conv(side):
    """Block.depthwise keeps only the taps that meet a pixel on small maps: the same outputs and the same gradients
    (the dropped taps' are exactly zero) as the 7x7 conv, at every side and for a 1 x W map too."""
    torch.manual_seed(side)
    block = emonext.Block(16, layer_scale_init=1.0).double()
    for shape in ((3, 16, side, side), (3, 16, 1, side)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ours = block.depthwise(x)
        (g_x, g_w, g_b) = torch.autograd.grad(ours.square().sum(), (x, block.dwconv.weight, block.dwconv.bias))
        ref = block.dwconv(x)
        (r_x, r_w, r_b) = torch.autograd.grad(ref.square().sum(), (x, block.dwconv.weight, block.dwconv.bias))
        for a, b in ((ours, ref), (g_x, r_x), (g_w, r_w), (g_b, r_b)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# inputs

def test_bad_inputs_get_clear_errors():
    m1 = model("atto", 48, in_chans=1)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 48, 48\), got \(2, 3, 48, 48\)"):
        m1(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(N, 1, 48, 48\), got \(2, 1, 64, 64\)"):
        m1(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got \(2, 1, 48, 47\)"):
        m1(torch.randn(2, 1, 48, 47))
    with pytest.raises(ValueError, match=r"got \(1, 48, 48\)"):
        m1(torch.randn(1, 48, 48))
    m3 = model("atto", 48, in_chans=3)
    with pytest.raises(ValueError, match=r"\(N, 3, 48, 48\) or \(N, 1, 48, 48\), got \(2, 2, 48, 48\)"):
        m3(torch.randn(2, 2, 48, 48))


def test_img_size_too_small_says_the_minimum():
    with pytest.raises(ValueError, match="img_size=31 is too small.*at least 32"):
        EmoNeXt.from_size("atto", img_size=31)
    with pytest.raises(ValueError, match="at least 32"):
        EmoNeXt.from_size("atto", img_size=16)
    m = model("atto", 32, in_chans=1).eval()  # the minimum works
    with torch.no_grad():
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="in_chans"):
        EmoNeXt.from_size("atto", in_chans=0)


def test_rgb_model_accepts_grey_input_as_expanded_input():
    m = scramble(model("atto", 48, in_chans=3)).eval()
    grey = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(grey), m(grey.expand(-1, 3, -1, -1).contiguous()), rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# state dict layout

FAMILIES = [
    r"localization\.[04]\.(weight|bias)",
    r"localization\.[15]\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"fc_loc\.[02]\.(weight|bias)",
    r"downsample_layers\.0\.[01]\.(weight|bias)",
    r"downsample_layers\.[123]\.[01]\.(weight|bias)",
    r"downsample_layers\.[123]\.2\.fc\.[02]\.weight",
    r"stages\.[0-3]\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)",
    r"stages\.[0-3]\.\d+\.gamma",
    r"norm\.(weight|bias)",
    r"attention\.(norm|query|key|value)\.(weight|bias)",
    r"head\.(weight|bias)",
]


def test_state_dict_key_layout_is_official():
    m = model("atto", 48, in_chans=1)
    keys = list(m.state_dict())
    for k in keys:
        matches = [f for f in FAMILIES if re.fullmatch(f, k)]
        assert len(matches) == 1, f"key {k!r} is outside the official families"
    for f in FAMILIES:
        assert any(re.fullmatch(f, k) for k in keys), f"no key of family {f}"
    for k in ("localization.0.weight", "localization.1.running_var", "localization.4.bias",
              "localization.5.num_batches_tracked", "fc_loc.0.weight", "fc_loc.2.bias",
              "downsample_layers.0.0.weight", "downsample_layers.0.1.bias", "downsample_layers.1.0.weight",
              "downsample_layers.2.1.bias", "downsample_layers.3.2.fc.0.weight", "downsample_layers.1.2.fc.2.weight",
              "stages.0.1.dwconv.weight", "stages.2.5.pwconv2.bias", "stages.3.1.gamma", "norm.weight",
              "attention.value.bias", "attention.norm.weight", "head.weight"):
        assert k in keys, k
    for k in ("downsample_layers.0.2.fc.0.weight", "downsample_layers.1.2.fc.0.bias", "stages.2.6.gamma",
              "stages.4.0.gamma", "localization.2.weight"):
        assert k not in keys, k
    blocks = {(int(i), int(j)) for i, j in re.findall(r"stages\.(\d)\.(\d+)\.gamma", " ".join(keys))}
    assert blocks == {(i, j) for i, d in enumerate(SIZES["atto"][0]) for j in range(d)}
    # localization: 2 convs + 2 BatchNorms of 5 entries; fc_loc; stem; 3 downsamplers with SE; 12 blocks of 9; ...
    assert len(keys) == 14 + 4 + 4 + 3 * 6 + 12 * 9 + 2 + 8 + 2


# -----------------------------------------------------------------------------
# load_weights

def test_one_channel_equivalence_through_load_weights():
    m3 = scramble(model("atto", 48, in_chans=3)).eval()
    src = m3.state_dict()
    m1 = model("atto", 48, in_chans=1, seed=5).eval()
    report = load_weights(m1, src, verbose=False)
    assert report["kind"] == "emonext" and not report["missing"] and not report["unexpected"]
    assert sorted(report["converted"]) == ["downsample_layers.0.0.weight: 3 -> 1 input channels",
                                           "localization.0.weight: 3 -> 1 input channels"]
    assert src["localization.0.weight"].shape[1] == 3  # the source is not modified
    grey = torch.rand(4, 1, 48, 48) * 4 - 2
    with torch.no_grad():
        a, b = m1(grey), m3(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.std() > 1e-3  # a real comparison, not two near-constant outputs
    # and back: 1 -> 3 splits the weights evenly, so the RGB model on a repeated grey image agrees again
    m3b = model("atto", 48, in_chans=3, seed=6).eval()
    report = load_weights(m3b, m1.state_dict(), verbose=False)
    assert len(report["converted"]) == 2
    with torch.no_grad():
        torch.testing.assert_close(m3b(grey.repeat(1, 3, 1, 1)), a, rtol=0, atol=1e-5)


def official_emonext_tiny_shapes():
    """Keys and shapes of the official EmoNeXt-T state dict as github.com/yelboudouri/EmoNeXt (models.py) builds it
    for FER2013 (get_model(7, "tiny"): 224 px, 3 input channels), written out from that code's module structure,
    independently of emonext.py: localization = Sequential(Conv2d(3, 8, 7), BatchNorm2d(8), MaxPool2d, ReLU,
    Conv2d(8, 10, 5), BatchNorm2d(10), MaxPool2d, ReLU); fc_loc = Sequential(Linear(10 * 52 * 52, 32), ReLU,
    Linear(32, 6)); stem = Sequential(Conv2d(3, 96, 4, 4), LayerNorm); downsample i = Sequential(LayerNorm,
    Conv2d(d, 2d, 2, 2), SELayer(2d) whose fc = Sequential(Linear(2d, 2d // 16, bias=False), ReLU,
    Linear(2d // 16, 2d, bias=False), Sigmoid)); Block = dwconv, norm, pwconv1, act, pwconv2, gamma,
    stochastic_depth (no parameters); norm; attention = DotProductSelfAttention (norm, query, key, value); head."""
    shapes = {"localization.0.weight": (8, 3, 7, 7), "localization.0.bias": (8,),
              "localization.4.weight": (10, 8, 5, 5), "localization.4.bias": (10,)}
    for i, c in ((1, 8), (5, 10)):
        shapes.update({f"localization.{i}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"localization.{i}.num_batches_tracked"] = ()
    shapes.update({"fc_loc.0.weight": (32, 27040), "fc_loc.0.bias": (32,), "fc_loc.2.weight": (6, 32),
                   "fc_loc.2.bias": (6,), "downsample_layers.0.0.weight": (96, 3, 4, 4),
                   "downsample_layers.0.0.bias": (96,), "downsample_layers.0.1.weight": (96,),
                   "downsample_layers.0.1.bias": (96,)})
    for i, (d_in, d_out) in enumerate(((96, 192), (192, 384), (384, 768)), start=1):
        shapes.update({f"downsample_layers.{i}.0.weight": (d_in,), f"downsample_layers.{i}.0.bias": (d_in,),
                       f"downsample_layers.{i}.1.weight": (d_out, d_in, 2, 2), f"downsample_layers.{i}.1.bias": (d_out,),
                       f"downsample_layers.{i}.2.fc.0.weight": (d_out // 16, d_out),
                       f"downsample_layers.{i}.2.fc.2.weight": (d_out, d_out // 16)})
    for i, (depth, d) in enumerate(zip((3, 3, 9, 3), (96, 192, 384, 768))):
        for j in range(depth):
            b = f"stages.{i}.{j}."
            shapes.update({b + "dwconv.weight": (d, 1, 7, 7), b + "dwconv.bias": (d,), b + "norm.weight": (d,),
                           b + "norm.bias": (d,), b + "pwconv1.weight": (4 * d, d), b + "pwconv1.bias": (4 * d,),
                           b + "pwconv2.weight": (d, 4 * d), b + "pwconv2.bias": (d,), b + "gamma": (d,)})
    shapes.update({"norm.weight": (768,), "norm.bias": (768,), "attention.norm.weight": (768,),
                   "attention.norm.bias": (768,), "head.weight": (7, 768), "head.bias": (7,)})
    for k in ("query", "key", "value"):
        shapes.update({f"attention.{k}.weight": (768, 768), f"attention.{k}.bias": (768,)})
    return shapes


def meta_state(shapes):
    return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else None)
            for k, s in shapes.items()}


def test_state_dict_is_the_official_emonext_tiny():
    official = official_emonext_tiny_shapes()
    assert len(official) == 14 + 4 + 4 + 3 * 6 + 18 * 9 + 2 + 8 + 2
    with torch.device("meta"):
        ours = EmoNeXt.from_size("tiny", img_size=224, in_chans=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == official


@pytest.mark.parametrize("wrap", ["model", "module.", "_orig_mod."])
def test_official_tiny_checkpoint_layout_loads_strict(wrap):
    """A checkpoint in the official layout (the written-out keys, not this model's state dict) loads with nothing
    missing, unexpected or converted; into a grey model the two input convs are summed over RGB."""
    sd = meta_state(official_emonext_tiny_shapes())
    ckpt = {"model": {"model": sd, "epoch": 3}, "module.": {"module." + k: v for k, v in sd.items()},
            "_orig_mod.": {"ema": {"_orig_mod." + k: v for k, v in sd.items()}}}[wrap]
    with torch.device("meta"):
        rgb, grey = EmoNeXt.from_size("tiny", img_size=224, in_chans=3), EmoNeXt.from_size("tiny", img_size=224, in_chans=1)
    assert load_weights(rgb, ckpt, verbose=False) == {"kind": "emonext", "missing": [], "unexpected": [],
                                                      "skipped": [], "converted": []}
    report = load_weights(grey, ckpt, verbose=False)
    assert sorted(report["converted"]) == ["downsample_layers.0.0.weight: 3 -> 1 input channels",
                                           "localization.0.weight: 3 -> 1 input channels"]
    assert not report["missing"] and not report["unexpected"] and not report["skipped"]


@pytest.mark.filterwarnings("ignore:for localization.*meta parameter")  # BatchNorm adds its counter to a meta model
def test_facebookresearch_convnext_tiny_layout_loads():
    """The ConvNeXt-T ImageNet-1k layout: the official EmoNeXt keys without STN, SE and attention, 1000 classes."""
    emonext_only = re.compile(r"^(localization|fc_loc|attention)\.|^downsample_layers\.[123]\.2\.")
    shapes = {k: s for k, s in official_emonext_tiny_shapes().items() if not emonext_only.search(k)}
    shapes.update({"head.weight": (1000, 768), "head.bias": (1000,)})
    with torch.device("meta"):
        m = EmoNeXt.from_size("tiny", img_size=224, in_chans=3)
    report = load_weights(m, {"model": meta_state(shapes)}, verbose=False)
    assert report["kind"] == "convnext" and report["unexpected"] == [] and report["converted"] == []
    assert report["skipped"] == ["head.weight (1000, 768) (model has (7, 768))", "head.bias (1000,) (model has (7,))"]
    assert sorted(report["missing"]) == sorted([k for k in official_emonext_tiny_shapes() if emonext_only.search(k)]
                                               + ["head.weight", "head.bias"])


def official_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "module.", "_orig_mod."])
def test_official_checkpoint_loads_strict_with_identical_outputs(wrap, tmp_path):
    src = scramble(model("atto", 48, in_chans=1)).eval()
    sd = official_state(src)
    x, y = torch.randn(4, 1, 48, 48), torch.tensor([0, 1, 5, 6])
    strict = model("atto", 48, in_chans=1, seed=3).eval()
    strict.load_state_dict(sd, strict=True)
    ckpt = {"raw": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
            "module.": {"model": {"module." + k: v for k, v in sd.items()}},
            "_orig_mod.": {"_orig_mod." + k: v for k, v in sd.items()}}[wrap]
    path = tmp_path / "official.pt"
    torch.save(ckpt, path)
    dst = model("atto", 48, in_chans=1, seed=4).eval()
    report = load_weights(dst, str(path), verbose=False)
    assert report == {"kind": "emonext", "missing": [], "unexpected": [], "skipped": [], "converted": []}
    with torch.no_grad():
        ref_logits, ref_loss = src(x, y)
        for m in (strict, dst):
            logits, loss = m(x, y)
            assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_ema_pytorch_checkpoint_loads_the_ema_weights():
    ema = scramble(model("atto", 48, in_chans=1, seed=1)).eval()
    online = model("atto", 48, in_chans=1, seed=2)
    inner = {"initted": torch.tensor(True), "step": torch.tensor(1234)}
    inner.update({"ema_model." + k: v for k, v in ema.state_dict().items()})
    inner.update({"online_model." + k: v for k, v in online.state_dict().items()})
    dst = model("atto", 48, in_chans=1, seed=3).eval()
    report = load_weights(dst, {"ema": inner}, verbose=False)
    assert report["kind"] == "emonext" and not report["missing"] and not report["unexpected"]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    # a checkpoint with both: prefer_ema picks the EMA, prefer_ema=False the model
    both = {"model": online.state_dict(), "ema": ema.state_dict()}
    load_weights(dst, both, prefer_ema=False, verbose=False)
    assert torch.equal(dst.head.weight, online.head.weight)
    load_weights(dst, both, verbose=False)
    assert torch.equal(dst.head.weight, ema.head.weight)


NOT_CONVNEXT = re.compile(r"^(localization|fc_loc|attention)\.|^downsample_layers\.[123]\.2\.")


@pytest.mark.parametrize("in_chans", (3, 1))
def test_convnext_imagenet_checkpoint_loads_and_reports(in_chans, tmp_path, capsys):
    rgb = scramble(model("atto", 48, in_chans=3, seed=7))
    sd = {k: v.clone() for k, v in rgb.state_dict().items() if not NOT_CONVNEXT.search(k)}
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 320), torch.randn(1000)
    assert "downsample_layers.1.1.weight" in sd and "stages.3.1.gamma" in sd and "norm.bias" in sd
    path = tmp_path / "convnext_atto_1k_224.pth"
    torch.save({"model": sd}, path)

    dst = model("atto", 48, in_chans=in_chans, seed=8)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_weights(dst, str(path))
    out = capsys.readouterr().out
    kept = sorted(k for k in before if NOT_CONVNEXT.search(k))
    assert report["kind"] == "convnext"
    assert sorted(report["missing"]) == sorted(kept + ["head.weight", "head.bias"])
    assert report["unexpected"] == []
    assert report["skipped"] == ["head.weight (1000, 320) (model has (7, 320))",
                                 "head.bias (1000,) (model has (7,))"]
    assert len(report["converted"]) == (1 if in_chans == 1 else 0)
    assert "convnext checkpoint" in out and "skipped (2): head.weight" in out
    assert f"missing ({len(kept) + 2})" in out and "localization.0.weight" in out and "attention.query.weight" in out
    after = dst.state_dict()
    for k in kept + ["head.weight", "head.bias"]:
        assert torch.equal(after[k], before[k]), f"{k} should keep its init"
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        if k == "downsample_layers.0.0.weight" and in_chans == 1:
            torch.testing.assert_close(after[k], v.sum(1, keepdim=True))
        else:
            assert torch.equal(after[k], v), k
    # with 1000 classes the head loads too
    dst1k = model("atto", 48, in_chans=3, num_classes=1000)
    report = load_weights(dst1k, str(path), verbose=False)
    assert report["skipped"] == [] and "head.weight" not in report["missing"]
    assert torch.equal(dst1k.head.weight, sd["head.weight"])


def test_unknown_checkpoint_formats_are_refused():
    m = model("atto", 48, in_chans=1)
    timm = {"stem.0.weight": torch.randn(40, 3, 4, 4), "stages.0.blocks.0.conv_dw.weight": torch.randn(40, 1, 7, 7)}
    with pytest.raises(ValueError, match="timm-format ConvNeXt"):
        load_weights(m, timm)
    with pytest.raises(ValueError, match="neither an EmoNeXt nor a facebookresearch ConvNeXt checkpoint"):
        load_weights(m, {"foo": torch.zeros(3), "bar.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="neither"):
        load_weights(m, {"foo": 1})
    with pytest.raises(ValueError, match="from_checkpoint|no 'config'"):
        EmoNeXt.from_checkpoint({"model": m.state_dict()})


def test_checkpoint_of_another_size_or_img_size_is_refused():
    with torch.device("meta"):
        shapes = EmoNeXt.from_size("tiny", img_size=48, in_chans=1).state_dict()
    tiny = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    m = model("atto", 48, in_chans=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"another size.*downsample_layers\.0\.0\.weight: checkpoint \(96, 1, 4, 4\) "
                                         r"vs model \(40, 1, 4, 4\)"):
        load_weights(m, tiny)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match=r"fc_loc\.0\.weight: checkpoint \(32, 640\) vs model \(32, 1440\)"):
        load_weights(model("atto", 64, in_chans=1), model("atto", 48, in_chans=1).state_dict())
    # an EmoNeXt checkpoint missing a non-head key is not silently half-loaded
    partial = dict(before)
    del partial["stages.1.0.gamma"]
    with pytest.raises(ValueError, match=r"does not match this model: missing \['stages.1.0.gamma'\]"):
        load_weights(m, partial)


def test_missing_and_damaged_files(tmp_path):
    m = model("atto", 48, in_chans=1)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_weights(m, str(missing))
    good = tmp_path / "good.pt"
    torch.save({"model": m.state_dict()}, good)
    data = good.read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged.pt: cannot be read as a weights-only torch checkpoint"):
        load_weights(m, str(damaged))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt: cannot be read"):
        load_weights(m, str(text))
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="expected a dict checkpoint, found list"):
        load_weights(m, str(listed))


def test_from_checkpoint_rebuilds_a_project_checkpoint():
    src = scramble(model("atto", 48, in_chans=1, drop_path_rate=0.0)).eval()
    ema = scramble(model("atto", 48, in_chans=1, seed=9), seed=2).eval()
    ckpt = {"config": emonext.config_dict(src), "model": src.state_dict(), "ema": ema.state_dict(), "iter": 5}
    assert ckpt["config"]["dims"] == [40, 80, 160, 320]  # plain lists: weights_only friendly
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(EmoNeXt.from_checkpoint(ckpt).eval()(x), ema(x))
        assert torch.equal(EmoNeXt.from_checkpoint(ckpt, prefer_ema=False).eval()(x), src(x))
    with pytest.raises(ValueError, match="config does not describe an EmoNeXt"):
        EmoNeXt.from_checkpoint({**ckpt, "config": {**ckpt["config"], "wings": 2}})


@pytest.mark.parametrize("drop, add, says", [
    ("depths", {}, "missing 'depths'"),
    ("img_size", {}, "missing 'img_size'"),  # would otherwise silently build a 224 px model
    ("sa_weight", {}, "missing 'sa_weight'"),
    (None, {"wings": 2}, "unknown 'wings'"),
    ("dims", {"dim": [40, 80, 160, 320]}, "missing 'dims'; unknown 'dim'"),
])
def test_from_checkpoint_names_missing_and_unknown_config_keys(tmp_path, drop, add, says):
    src = model("atto", 48, in_chans=1)
    config = {k: v for k, v in emonext.config_dict(src).items() if k != drop}
    path = tmp_path / "odd.pt"
    torch.save({"config": {**config, **add}, "model": src.state_dict()}, path)
    with pytest.raises(ValueError) as e:
        EmoNeXt.from_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: its config does not describe an EmoNeXt: {says} (expected exactly depths, dims, ")
    assert "\n" not in msg
    with pytest.raises(ValueError, match=rf"^best.pt: .*{says}"):
        EmoNeXt.from_checkpoint({"config": {**config, **add}, "model": src.state_dict()}, name="best.pt")


# -----------------------------------------------------------------------------
# class names in the config; writing checkpoints

def test_class_names_travel_with_the_checkpoint(tmp_path):
    ferplus = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    m = model("atto", 32, in_chans=1, num_classes=8, class_names=ferplus)
    config = emonext.config_dict(m)
    assert config["class_names"] == list(ferplus)  # a list: weights_only friendly
    loaded = EmoNeXt.from_checkpoint({"config": config, "model": m.state_dict()})
    assert loaded.config.class_names == ferplus
    # checkpoints from before the config field: train.py's top-level class names, else FER2013's
    old = {k: v for k, v in config.items() if k != "class_names"}
    path = tmp_path / "old.pt"
    torch.save({"config": old, "model": m.state_dict(), "class_names": list(ferplus)}, path)
    assert EmoNeXt.from_checkpoint(str(path)).config.class_names == ferplus
    fer = model("atto", 32, in_chans=1)
    old7 = {k: v for k, v in emonext.config_dict(fer).items() if k != "class_names"}
    assert EmoNeXt.from_checkpoint({"config": old7, "model": fer.state_dict()}).config.class_names \
        == emonext.FER2013_CLASS_NAMES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert fer.config.class_names == emonext.FER2013_CLASS_NAMES  # the default


def test_class_names_of_another_length_are_refused_by_name(tmp_path):
    fer = model("atto", 32, in_chans=1)
    config = emonext.config_dict(fer)
    path = tmp_path / "bad.pt"
    torch.save({"config": {**config, "class_names": ["a", "b"]}, "model": fer.state_dict()}, path)
    with pytest.raises(ValueError) as e:
        EmoNeXt.from_checkpoint(str(path))
    assert str(e.value) == f"{path}: 2 class names (a, b) for a model of 7 classes"
    old = {k: v for k, v in config.items() if k != "class_names"}  # wrong top-level names of an old checkpoint
    with pytest.raises(ValueError, match=r"^old.pt: 8 class names \(neutral, .*\) for a model of 7 classes$"):
        EmoNeXt.from_checkpoint({"config": old, "model": fer.state_dict(), "class_names": ["neutral"] * 8},
                                name="old.pt")
    eight = {k: v for k, v in emonext.config_dict(model("atto", 32, in_chans=1, num_classes=8)).items()
             if k != "class_names"}  # 8 classes, no names anywhere: FER2013's 7 do not fit
    with pytest.raises(ValueError, match="^checkpoint: 7 class names .* for a model of 8 classes"):
        EmoNeXt.from_checkpoint({"config": eight, "model": {}})


def test_save_and_export_checkpoint(tmp_path):
    m = scramble(model("atto", 48, in_chans=1)).eval()
    path = tmp_path / "ckpt.pt"
    emonext.save_checkpoint({"config": emonext.config_dict(m), "model": m.state_dict()}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # written through a temporary file, which is gone
    shipped = tmp_path / "new" / "shipped.pt"
    emonext.export_checkpoint(EmoNeXt.from_checkpoint(str(path)), shipped, extra={"iter": 3, "args": None})
    ckpt = torch.load(shipped, weights_only=True)
    assert list(ckpt) == ["config", "ema", "iter"]  # None entries left out; the class names only in the config
    assert ckpt["config"] == emonext.config_dict(m)
    assert ckpt["config"]["class_names"] == list(emonext.FER2013_CLASS_NAMES)
    for k, v in m.state_dict().items():
        assert torch.equal(ckpt["ema"][k], v.half() if v.is_floating_point() else v), k
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(EmoNeXt.from_checkpoint(str(shipped)).eval()(x), m(x), rtol=0, atol=5e-2)


def test_a_checkpoint_with_changed_bytes_is_refused_naming_the_damaged_record(tmp_path):
    m = scramble(model("atto", 32, in_chans=1))
    path = tmp_path / "ckpt.pt"
    emonext.save_checkpoint({"config": emonext.config_dict(m), "model": m.state_dict()}, path)
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # 64 bytes inside the largest tensor's record, as a bad disk or copy does
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    blob[start:start + 64] = bytes(64)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(blob)
    torch.load(damaged, weights_only=True)  # torch alone loads it, changed weights and all
    for read in (emonext.read_checkpoint, EmoNeXt.from_checkpoint, lambda p: load_weights(model("atto", 32, in_chans=1), p)):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(damaged))}: damaged: its record "
                                             rf"{re.escape(info.filename)} fails the CRC-32 check"):
            read(str(damaged))
    EmoNeXt.from_checkpoint(str(path))  # the original is fine


def test_save_checkpoint_on_a_full_disk_says_how_much_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    emonext.save_checkpoint({"x": torch.zeros(3)}, path)
    real_open = open

    def full_disk(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if "w" in mode:
            f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f
    monkeypatch.setattr(emonext, "open", full_disk, raising=False)
    with pytest.raises(OSError) as e:
        emonext.save_checkpoint({"x": torch.zeros(1000, 1000)}, path)
    assert e.value.errno == errno.ENOSPC
    assert re.fullmatch(rf"cannot write {re.escape(str(path))} \(No space left on device: 3\.8 MiB to write, "
                        r"[\d.]+ MiB free there\)", e.value.strerror)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.equal(torch.load(path)["x"], torch.zeros(3))  # intact


def test_write_atomically_uses_a_temporary_name_of_its_own_process(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        open(tmp, "w").close()
    emonext.write_atomically(str(tmp_path / "a.txt"), write)
    assert seen == [f"{tmp_path / 'a.txt'}.{os.getpid()}.tmp"] and os.listdir(tmp_path) == ["a.txt"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError) as e:
        emonext.write_atomically(str(tmp_path / "folder"), write)  # onto a folder: os.replace fails
    assert e.value.strerror.startswith(f"cannot write {tmp_path / 'folder'} (")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "folder"]  # its temporary file is removed


def write_text(text):
    """A write for write_atomically: text into the file it is given."""
    def write(p):
        with open(p, "w") as f:
            f.write(text)
    return write


def test_write_atomically_writes_a_symlinks_target_beside_it_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target, link, dangling = tmp_path / "real" / "faces.csv", tmp_path / "link.csv", tmp_path / "new.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "real" / "made.csv")
    emonext.write_atomically(str(link), write_text("new\n"))
    emonext.write_atomically(str(dangling), write_text("made\n"))
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_text() == "new\n"
    assert dangling.is_symlink() and (tmp_path / "real" / "made.csv").read_text() == "made\n"
    assert sorted(os.listdir(tmp_path / "real")) == ["faces.csv", "made.csv"]  # no temporary file left
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "new.csv", "real"]


def test_write_atomically_writes_a_fifo_straight_to_its_reader(tmp_path):
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    emonext.write_atomically(str(fifo), write_text("a,b\n1,2\n"))
    assert reader.communicate(timeout=30)[0] == "a,b\n1,2\n"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["rows.fifo"]  # still the FIFO
    emonext.write_atomically("/dev/null", write_text("gone\n"))  # a character device: written, not replaced
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("path", ["-", "/dev/stdout"])
def test_write_atomically_sends_stdout_down_the_pipe(path):
    code = (f"import emonext; print('first', flush=True); emonext.write_atomically({path!r}, "
            "lambda p: open(p, 'w').write('rows\\n'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(emonext.__file__)))
    assert out.returncode == 0 and out.stdout == "first\nrows\n", out.stderr


def test_check_writable_says_what_write_atomically_would_and_writes_nothing(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for path, why in ((tmp_path / "folder", "Is a directory"), (tmp_path / "file" / "out.pt", "Not a directory"),
                      (tmp_path / "file" / "deeper" / "out.pt", "Not a directory")):
        with pytest.raises(OSError) as e:
            emonext.check_writable(str(path))
        assert e.value.strerror == f"cannot write {path} ({why})"
    for path in (tmp_path / "new.pt", tmp_path / "file", tmp_path / "a" / "b" / "out.pt", "/dev/null", "-"):
        emonext.check_writable(str(path))
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and (tmp_path / "file").read_text() == "x"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "folder").chmod(0o555)
        with pytest.raises(OSError, match="Permission denied"):
            emonext.check_writable(str(tmp_path / "folder" / "out.pt"))


# -----------------------------------------------------------------------------
# faces in: preprocess, ten_crop, predict_logits (the one inference path) and predict

def test_preprocess_normalises():
    x = torch.full((2, 48, 48), 255, dtype=torch.uint8)
    out = emonext.preprocess(x, 32)
    assert out.shape == (2, 1, 32, 32) and torch.allclose(out, torch.tensor((1 - 0.5077) / 0.2551))
    torch.testing.assert_close(emonext.preprocess(x, 32, 0.3, 0.2), torch.full((2, 1, 32, 32), 3.5))


def test_ten_crop():
    # an input already at the resize size (51 for 48) is cropped as is, so crops are plain slices
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 51, 51), dtype=np.uint8))
    crops = emonext.ten_crop(x, 48)
    assert crops.shape == (2, 10, 1, 48, 48)
    full = emonext.preprocess(x, 51)
    assert torch.equal(crops[:, 0], full[..., :48, :48])  # top left
    assert torch.equal(crops[:, 3], full[..., 3:, 3:])  # bottom right
    assert torch.equal(crops[:, 4], full[..., 1:49, 1:49])  # centre
    assert torch.equal(crops[:, 5:], crops[:, :5].flip(-1))  # the second five are the mirrors of the first
    assert torch.equal(emonext.ten_crop(x, 48, 0.3, 0.2)[:, 4], emonext.preprocess(x, 51, 0.3, 0.2)[..., 1:49, 1:49])
    assert emonext.ten_crop(x[:, :48, :48], 64).shape == (2, 10, 1, 64, 64)


def test_predict_logits_batches_and_tencrop():
    m = scramble(model("atto", 32, in_chans=1)).eval()
    x = synthetic.synthetic_faces(n_train=10, n_val=0, n_test=0, seed=2)["train"][0]
    a = m.predict_logits(x, "none", batch_size=3)
    b = m.predict_logits(x, "none", batch_size=256)
    assert a.shape == (10, 7) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(a, m(emonext.preprocess(x, 32)), rtol=0, atol=1e-5)
        crops = emonext.ten_crop(x, 32)
        ref = torch.stack([m(crops[:, i]) for i in range(10)], 1).mean(1)
    torch.testing.assert_close(m.predict_logits(x, "tencrop", batch_size=4), ref, rtol=0, atol=1e-5)
    assert m.predict_logits(x[:0]).shape == (0, 7)
    m.train()
    torch.testing.assert_close(m.predict_logits(x), a, rtol=0, atol=1e-6)  # eval mode inside (BatchNorm)
    assert m.training  # and the caller's mode is back
    with pytest.raises(ValueError, match=r"uint8 grey faces \(N, H, W\), got torch.float32 \(10, 1, 48, 48\)"):
        m.predict_logits(x[:, None].float())
    with pytest.raises(ValueError, match="tta must be one of 'none', 'tencrop', got 'flip'"):
        m.predict_logits(x, "flip")
    assert emonext.DEFAULT_TTA in emonext.TTA_MODES  # the scripts' default is a mode predict_logits runs


def test_predict_is_predict_logits_softmax(shaken, faces):
    probs = shaken.predict(faces)
    assert probs.shape == (12, 7) and probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs, shaken.predict_logits(faces).softmax(-1), rtol=0, atol=0)
    with torch.no_grad():  # the plain path by hand: resize, FER2013's normalisation, the model
        torch.testing.assert_close(probs, shaken(emonext.preprocess(faces, 64)).softmax(-1), rtol=0, atol=1e-6)
    assert probs.argmax(1).unique().numel() > 1 and probs.max() > 0.5  # the faces really get different answers
    torch.testing.assert_close(shaken.predict(faces, batch_size=5), probs, rtol=0, atol=1e-5)  # other batches


def test_predict_input_forms(shaken, faces):
    ref = shaken.predict(faces[:4])
    torch.testing.assert_close(shaken.predict(faces[0]), ref[:1], rtol=0, atol=1e-6)  # (H, W): one face
    torch.testing.assert_close(shaken.predict(faces[:4].numpy()), ref, rtol=0, atol=1e-6)  # numpy
    read_only = faces[:4].numpy().copy()
    read_only.setflags(write=False)
    torch.testing.assert_close(shaken.predict(read_only), ref, rtol=0, atol=1e-6)
    rgb = faces[:4, :, :, None].expand(-1, -1, -1, 3)  # grey stored as RGB: the same faces
    torch.testing.assert_close(shaken.predict(rgb), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(shaken.predict(rgb[1]), ref[1:2], rtol=0, atol=1e-5)  # (H, W, 3): one face
    mixed = [faces[0], np.zeros((90, 60, 3), np.uint8), faces[1:3].numpy()]  # a list: faces of any sizes
    out = shaken.predict(mixed)
    assert out.shape == (4, 7)
    torch.testing.assert_close(out[[0, 2, 3]], ref[:3], rtol=0, atol=1e-5)  # batched otherwise
    torch.testing.assert_close(out[1:2], shaken.predict(np.zeros((90, 60), np.uint8)), rtol=0, atol=1e-6)
    assert shaken.predict(faces[:0]).shape == (0, 7) and shaken.predict([]).shape == (0, 7)
    shaken.train()
    torch.testing.assert_close(shaken.predict(faces[:4]), ref, rtol=0, atol=1e-6)  # eval mode inside (BatchNorm)
    assert shaken.training  # and the caller's mode is back
    shaken.eval()


def test_predict_errors(shaken):
    with pytest.raises(ValueError, match="uint8 grey levels 0..255, got torch.float32"):
        shaken.predict(torch.rand(2, 48, 48))
    with pytest.raises(ValueError, match="got torch.int64"):
        shaken.predict(np.zeros((48, 48), dtype=np.int64))
    for shape in [(48,), (2, 2, 48, 48), (2, 2, 48, 48, 3)]:
        with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\) grey or .* RGB, got shape"):
            shaken.predict(torch.zeros(shape, dtype=torch.uint8))
    for shape in [(0, 0), (0, 48), (3, 0, 48), (0, 0, 3), (2, 48, 0, 3)]:  # empty images: one clear line
        with pytest.raises(ValueError, match=rf"^faces of shape {re.escape(str(shape))} are empty images"):
            shaken.predict(np.zeros(shape, dtype=np.uint8))
    assert shaken.predict(np.zeros((0, 48, 48), np.uint8)).shape == (0, 7)  # no faces: no rows, not an error
    for batch_size in (-1, 0, 2.5, None, True):  # -1 gave no rows and 0 range()'s error
        with pytest.raises(ValueError, match=rf"^batch_size must be a whole number of at least 1, got {batch_size}"):
            shaken.predict(np.zeros((4, 48, 48), np.uint8), batch_size=batch_size)
    shaken.train()
    with pytest.raises(ValueError, match="got torch.float32"):  # the second face of a list is bad
        shaken.predict([np.zeros((48, 48), np.uint8), np.zeros((48, 48), np.float32)])
    assert shaken.training  # the caller's mode is back after the error too
    shaken.eval()
    for shape in [(48, 48, 4), (2, 48, 48, 4)]:  # not H faces 4 pixels wide
        with pytest.raises(ValueError, match=r"look RGBA: pass faces\[\.\.\., :3\]"):
            shaken.predict(np.zeros(shape, np.uint8))


def test_predict_reads_channel_axes_any_strides_and_channels_first_tensors(shaken, faces):
    ref = shaken.predict(faces[:4])
    same = lambda got, rows=slice(0, 4): torch.testing.assert_close(got, ref[rows], rtol=0, atol=1e-5)  # other batches
    same(shaken.predict(faces[0, :, :, None]), slice(0, 1))  # (H, W, 1): one grey face, not 48 faces 48x1
    same(shaken.predict(faces[:4, :, :, None].numpy()))  # (N, H, W, 1)
    same(shaken.predict(faces[:4, None]))  # (N, 1, H, W) tensor: channels-first grey
    same(shaken.predict(faces[:3].numpy()), slice(0, 3))  # an array (3, H, W): three grey faces
    flipped = faces[:4].numpy()[:, :, ::-1]  # a negative-stride view
    torch.testing.assert_close(shaken.predict(flipped), shaken.predict(flipped.copy()), rtol=0, atol=0)
    rgb = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    want = shaken.predict(rgb)
    chw = torch.from_numpy(rgb).permute(0, 3, 1, 2)  # (N, 3, H, W): how torch holds images
    torch.testing.assert_close(shaken.predict(chw), want, rtol=0, atol=0)
    torch.testing.assert_close(shaken.predict(chw[1][None]), want[1:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"^faces of shape \(3, 40, 50\) read two ways: pass x\[None\] for one "
                                         r"channels-first RGB face .* or x\[:, None\] for three grey faces$"):
        shaken.predict(chw[1])  # (3, H, W), as read_image returns it
    same(shaken.predict(faces[:3, None]), slice(0, 3))  # ... and the three grey faces it could be
    assert shaken.predict(faces[:3, :, :3]).shape == (1, 7)  # (3, H, 3) reads as an array does: one RGB face


@pytest.mark.parametrize("what", ["face.png", None, {"face": 1}, 3])
def test_predict_of_what_is_not_pixels_says_what_it_takes(shaken, what):
    with pytest.raises(ValueError, match=rf"^faces must be uint8 pixels \(numpy arrays or tensors, or a list of them\), "
                                         rf"got {type(what).__name__}; to classify image files use python predict.py"):
        shaken.predict(what)


def test_grey_faces_rgb_as_pil_and_centre_square():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    assert torch.equal(emonext.grey_faces(rgb), torch.from_numpy(pil))  # ITU-R 601-2 in PIL's fixed point
    face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    wide = np.pad(face, ((0, 0), (30, 31)), constant_values=255)  # (48, 109): bars left and right
    tall = np.pad(face, ((20, 21), (0, 0)), constant_values=0)
    for im in (face, wide, tall):
        assert torch.equal(emonext.grey_faces(im), torch.from_numpy(face)[None])
    # other sizes: resized to 48 like PIL's bilinear resize of the square
    smooth = np.array(Image.fromarray(face).resize((150, 150), Image.BICUBIC))
    pil48 = np.asarray(Image.fromarray(smooth).resize((48, 48), Image.BILINEAR)).astype(int)
    assert np.abs(emonext.grey_faces(smooth)[0].numpy().astype(int) - pil48).max() <= 1
    up = emonext.grey_faces(np.full((20, 20), 77, np.uint8))
    assert up.shape == (1, 48, 48) and up.dtype == torch.uint8 and (up == 77).all()


def test_the_normalisation_constants_in_the_config(shaken, faces):
    assert (emonext.FER2013_MEAN, emonext.FER2013_STD) == (0.5077, 0.2551)
    config = emonext.config_dict(shaken)
    assert (config["pixel_mean"], config["pixel_std"]) == (0.5077, 0.2551)
    old = {k: v for k, v in config.items() if k not in ("pixel_mean", "pixel_std")}  # a checkpoint from before
    loaded = EmoNeXt.from_checkpoint({"config": old, "model": shaken.state_dict()})
    assert (loaded.config.pixel_mean, loaded.config.pixel_std) == (0.5077, 0.2551)
    torch.testing.assert_close(loaded.predict(faces), shaken.predict(faces), rtol=0, atol=0)
    # a model trained with other constants carries them: predict and predict_logits normalise with the config's
    other = EmoNeXt.from_checkpoint({"config": {**config, "pixel_mean": 0.3, "pixel_std": 0.2},
                                     "model": shaken.state_dict()}).eval()
    with torch.no_grad():
        x = F.interpolate(faces[:, None].float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
        ref = other((x - 0.3) / 0.2)
        crops = emonext.ten_crop(faces, 64, 0.3, 0.2)
        ref_tencrop = torch.stack([other(crops[:, i]) for i in range(10)], 1).mean(1)
    torch.testing.assert_close(other.predict(faces), ref.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(other.predict_logits(faces, "tencrop"), ref_tencrop, rtol=0, atol=1e-5)
    assert not torch.allclose(other.predict(faces), shaken.predict(faces), atol=1e-3)


# =============================================================================
# The fast inference path (issue 13; was tests/test_inference.py): eval mode under inference mode (or no_grad)
# folds the STN's BatchNorms into its convs, pools with elementwise maxima and keeps grey input to an RGB model one
# channel; `for_inference()` returns an eval copy (channels-last or compiled on request). Checked: the same logits
# as the reference layers within 1e-4 on weights shaken so that every folded part matters, the original model
# untouched, predict, predict_logits and eval.py on the fast path, and the copied emonext.py alone. Hooks on the
# STN's BatchNorms tell which path ran.
# =============================================================================

CONFIGS = [  # (size, img_size, in_chans, num_classes, input channels)
    ("atto", 48, 1, 7, 1),
    ("atto", 64, 1, 7, 1),
    ("femto", 40, 3, 8, 1),  # an RGB model on grey input: the input convs run on summed weights
    ("femto", 40, 3, 8, 3),
]


def trained_looking(size="atto", img_size=48, in_chans=1, num_classes=7, seed=0):
    """A model in eval mode whose every folded part matters as in a trained one: all weights shaken, the STN's
    BatchNorm statistics far from (0, 1), a warp that depends on the input, layer scales of 0.5."""
    torch.manual_seed(seed)
    names = emonext.FER2013_CLASS_NAMES if num_classes == 7 else tuple(f"class{i}" for i in range(num_classes))
    m = EmoNeXt.from_size(size, img_size=img_size, in_chans=in_chans, num_classes=num_classes, class_names=names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for bn in (m.localization[1], m.localization[5]):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 3 + 0.2)
        m.fc_loc[2].weight.copy_(torch.randn(m.fc_loc[2].weight.shape, generator=g) * 0.05)
        for stage in m.stages:
            for block in stage:
                block.gamma.add_(0.5)
    return m.eval()


def faces_as_input(n, img_size, channels=1, seed=0):
    """Normalised synthetic faces (n, channels, S, S), as eval.py feeds them; RGB ones tinted per channel."""
    x = emonext.preprocess(synthetic.synthetic_faces(n_train=n, n_val=0, n_test=0, seed=seed)["train"][0], img_size)
    return x if channels == 1 else torch.cat([x, 0.8 * x + 0.1, x.flip(-1)], 1)


class BatchNormCalls:
    """Counts the calls of the STN's BatchNorm modules: the reference path calls them, the fast path folds them."""

    def __init__(self, model):
        self.n = 0
        bns = (model.localization[1], model.localization[5])
        self.handles = [bn.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1)) for bn in bns]

    def remove(self):
        for h in self.handles:
            h.remove()


def reference(model, x):
    """Logits of the reference layers (what training runs): eval mode with autograd on takes that path."""
    with torch.enable_grad():
        return model(x).detach()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# the stem's stride: 4 (the paper's) or 2, the same weights either way

def stage_sides(m, x):
    sides = []
    hooks = [stage.register_forward_hook(lambda mod, inp, out: sides.append(out.shape[-1])) for stage in m.stages]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return sides


def test_stem_stride_2_keeps_four_times_the_map_with_the_same_weights():
    m4, m2 = model("atto", 48, in_chans=1).eval(), model("atto", 48, in_chans=1, stem_stride=2).eval()
    x = torch.randn(2, 1, 48, 48)
    assert stage_sides(m4, x) == [12, 6, 3, 1] and stage_sides(m2, x) == [24, 12, 6, 3]
    assert {k: v.shape for k, v in m4.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
    assert m2.config.stem_stride == 2 and emonext.EmoNeXtConfig().stem_stride == 4
    assert stage_sides(model("atto", 32, in_chans=1, stem_stride=2).eval(), torch.randn(1, 1, 32, 32))[-1] == 2
    with pytest.raises(ValueError, match=r"stem_stride must be one of \(4, 2\), got 3"):
        model("atto", 48, stem_stride=3)


def test_official_weights_load_unchanged_into_a_stride_2_model():
    src = scramble(model("atto", 48, in_chans=1)).eval()
    dst = model("atto", 48, in_chans=1, stem_stride=2, seed=5).eval()
    report = load_weights(dst, official_state(src), verbose=False)
    assert report == {"kind": "emonext", "missing": [], "unexpected": [], "skipped": [], "converted": []}
    assert_same_state(dst.state_dict(), src.state_dict())
    x = torch.randn(3, 1, 48, 48)
    with torch.no_grad():  # the same weights, another model: the stride is not in the state dict
        assert (dst(x) - src(x)).abs().max() > 1e-3


def test_stem_stride_travels_with_the_checkpoint_and_older_ones_get_4(tmp_path):
    src = scramble(model("atto", 48, in_chans=1, stem_stride=2)).eval()
    path = tmp_path / "s2.pt"
    emonext.save_checkpoint({"config": emonext.config_dict(src), "ema": src.state_dict()}, str(path))
    back = EmoNeXt.from_checkpoint(str(path)).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert back.config.stem_stride == 2 and torch.equal(back(x), src(x))
    older = {k: v for k, v in emonext.config_dict(src).items() if k != "stem_stride"}
    assert EmoNeXt.from_checkpoint({"config": older, "ema": src.state_dict()}).config.stem_stride == 4


def test_fast_path_of_a_stride_2_model_gives_the_reference_logits():
    m = scramble(model("atto", 48, in_chans=1, stem_stride=2)).eval()
    x = faces_as_input(5, 48)
    with torch.inference_mode():
        fast = m(x)
    torch.testing.assert_close(fast, reference(m, x), rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# the fast path: same logits, less work

@pytest.mark.parametrize("size,img_size,in_chans,num_classes,channels", CONFIGS)
@pytest.mark.parametrize("batch", (1, 9))
def test_fast_path_gives_the_reference_logits(size, img_size, in_chans, num_classes, channels, batch):
    m = trained_looking(size, img_size, in_chans, num_classes)
    x = faces_as_input(batch, img_size, channels)
    calls = BatchNormCalls(m)
    ref = reference(m, x)
    assert calls.n == 2  # the reference path ran the BatchNorms
    with torch.inference_mode():
        fast = m(x)
    with torch.no_grad():
        fast_no_grad = m(x)
    assert calls.n == 2  # the fast path did not: they are folded into the convs
    calls.remove()
    assert fast.shape == (batch, num_classes)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast_no_grad, fast, rtol=0, atol=0)
    # a real comparison: the STN's BatchNorm statistics move these logits far more than the tolerance
    with torch.no_grad():
        m.localization[1].running_mean.zero_()
    assert (reference(m, x) - ref).abs().max() > 1e-2


def test_training_and_gradients_run_the_reference_layers():
    m = trained_looking("atto", 48)
    x = faces_as_input(4, 48)
    calls = BatchNormCalls(m)
    m(x).sum().backward()  # eval mode, gradients on: the reference layers, so gradients are those of training's
    assert calls.n == 2 and m.localization[0].weight.grad.abs().sum() > 0
    m.train()
    with torch.no_grad():
        m(x)  # train mode uses batch statistics: never folded, even without gradients
    assert calls.n == 4
    calls.remove()


def test_rgb_model_on_grey_input_runs_its_input_convs_on_one_channel():
    m = trained_looking("femto", 40, in_chans=3, num_classes=8)
    grey = faces_as_input(3, 40)
    seen = []
    hook = m.downsample_layers[0][0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    ref = reference(m, grey.expand(-1, 3, -1, -1))
    with torch.inference_mode():
        fast = m(grey)
        warped, _ = m.stn(grey)
    hook.remove()
    assert seen == [3, 1]  # the stem conv: the reference path repeats the image, the fast path sums the weights
    assert warped.shape == (3, 1, 40, 40)  # the STN warps one channel, not three copies of it
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 58, 58), (2, 10, 25, 25), (1, 3, 7, 6)])
def test_max_pool2_relu_is_max_pool_then_relu(shape):
    x = torch.randn(shape)
    x[0, 0, 0, 0], x[-1, -1, 2, 3] = float("nan"), float("-inf")
    ref = F.relu(F.max_pool2d(x, 2, stride=2))
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(emonext.max_pool2_relu(inp), ref, rtol=0, atol=0, equal_nan=True)


# -----------------------------------------------------------------------------
# for_inference(): a copy ready for inference, the model untouched

def test_for_inference_returns_an_eval_copy_and_leaves_the_model_alone(tmp_path):
    m = trained_looking("atto", 64).train()
    x = faces_as_input(5, 64)
    before = state(m)
    fast = m.for_inference()
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert_same_state(state(m), before)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert_same_state(state(fast), before)  # the same checkpoint: nothing folded into the weights
    with torch.inference_mode():
        logits = fast(x)
    torch.testing.assert_close(logits, reference(m.eval(), x), rtol=0, atol=1e-4)
    with torch.no_grad():  # a copy, not a view: changing it leaves the model alone
        fast.head.bias.add_(1.0)
    assert_same_state(state(m), before)
    # saved the way train.py saves, it loads back as the same model
    torch.save({"config": emonext.config_dict(fast), "model": fast.state_dict()}, tmp_path / "fast.pt")
    back = EmoNeXt.from_checkpoint(str(tmp_path / "fast.pt")).eval()
    torch.testing.assert_close(reference(back, x), reference(m, x) + 1.0, rtol=0, atol=1e-5)


def test_for_inference_channels_last():
    m = trained_looking("femto", 40, in_chans=3, num_classes=8)
    x = faces_as_input(4, 40)
    fast = m.for_inference(channels_last=True)
    w = fast.localization[4].weight  # (10, 8, 5, 5): the two layouts differ
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert m.localization[4].weight.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), reference(m, x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-4)
        torch.testing.assert_close(fast(x.expand(-1, 3, -1, -1)), reference(m, x.expand(-1, 3, -1, -1)),
                                   rtol=0, atol=1e-4)


def test_for_inference_compile_freezes_the_copy_only(monkeypatch):
    """The wiring (inductor takes minutes on a small CPU; the next test proves the path traces whole)."""
    compiled = []

    def spy_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", spy_compile)
    m = trained_looking("atto", 48)
    x = faces_as_input(3, 48)
    fast = m.for_inference(compile=True)
    assert compiled == [{"options": {"freezing": True}}]
    assert fast._compiled_call_impl is not None and m._compiled_call_impl is None
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), reference(m, x), rtol=0, atol=1e-4)
    assert m.for_inference()._compiled_call_impl is None and len(compiled) == 1  # off unless asked


def test_fast_path_traces_without_graph_breaks():
    m = trained_looking("atto", 32, in_chans=3)
    with torch.inference_mode():
        code = one_graph_code(m, faces_as_input(2, 32))
    assert "batch_norm" not in code and "max_pool2d" not in code  # the folded, pooled-by-maxima path


@pytest.mark.slow
def test_fast_path_keeps_the_fused_ops():
    """With kernels/ (its "fused" backend runs the registered ops' CPU code), grey input to an RGB model: the fast
    path's one-channel warp and the blocks go through the ops, with the reference layers' logits."""
    k = emonext.kernels
    if k is None or not hasattr(torch.ops.emonext, "affine_sample"):
        pytest.skip("kernels/ is not importable or its ops are not registered")
    m = trained_looking("femto", 40, in_chans=3, num_classes=8)
    x = faces_as_input(3, 40)
    ref = reference(m, x.expand(-1, 3, -1, -1))
    k.set_backend("fused")
    try:
        with torch.inference_mode():
            torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-4)
            code = one_graph_code(m, x)
    finally:
        k.set_backend("auto")
    assert "emonext.affine_sample" in code and "emonext.dwconv_layernorm" in code and "batch_norm" not in code


# -----------------------------------------------------------------------------
# predict, predict_logits and eval.py use it

@pytest.fixture(scope="module")
def inference_faces():
    """12 synthetic faces, uint8 (12, 48, 48), other ones than conftest's `faces` (seed 3, not 4)."""
    return synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=3)["train"][0]


def test_predict_runs_the_fast_path(inference_faces):
    m = trained_looking("atto", 64).train()
    before = state(m)
    calls = BatchNormCalls(m)
    probs = m.predict(inference_faces, batch_size=5)
    assert calls.n == 0
    calls.remove()
    assert m.training  # predict gives the model its mode back
    assert_same_state(state(m), before)
    ref = reference(m.eval(), emonext.preprocess(inference_faces, 64)).softmax(-1)
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-5)
    assert probs.argmax(1).unique().numel() > 1  # the faces get different answers


@pytest.mark.parametrize("tta", ("none", "tencrop"))
def test_predict_logits_runs_the_fast_path_and_folds_nothing_in_place(inference_faces, tta):
    """train.py scores its EMA model with this method every epoch: the EMA must come out unchanged."""
    m = trained_looking("atto", 48)
    before = state(m)
    calls = BatchNormCalls(m)
    logits = m.predict_logits(inference_faces, tta, batch_size=5)
    assert calls.n == 0
    calls.remove()
    assert_same_state(state(m), before)
    if tta == "none":
        ref = reference(m, emonext.preprocess(inference_faces, 48))
    else:
        crops = emonext.ten_crop(inference_faces, 48).flatten(0, 1)
        ref = reference(m, crops).view(len(inference_faces), 10, -1).mean(1)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flags,kwargs", [([], {"channels_last": False, "compile": False}),
                                          (["--channels-last"], {"channels_last": True, "compile": False}),
                                          (["--compile"], {"channels_last": False, "compile": True})])
def test_eval_main_scores_a_for_inference_copy(tmp_path, monkeypatch, capsys, flags, kwargs):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # inductor takes minutes: the flag's wiring only
    m = trained_looking("atto", 32)
    d = synthetic.synthetic_faces(n_train=8, n_val=4, n_test=10, seed=5)
    npz = tmp_path / "faces.npz"
    np.savez(npz, train_x=d["train"][0].numpy(), train_y=d["train"][1].numpy(),
             public_test_x=d["val"][0].numpy(), public_test_y=d["val"][1].numpy(),
             private_test_x=d["test"][0].numpy(), private_test_y=d["test"][1].numpy())
    torch.save({"config": emonext.config_dict(m), "model": m.state_dict()}, tmp_path / "model.pt")
    made, scored = [], []
    for_inference, predict_logits = EmoNeXt.for_inference, EmoNeXt.predict_logits

    def spy_for_inference(self, **kw):
        made.append((kw, for_inference(self, **kw)))
        return made[-1][1]

    def spy_predict_logits(self, *args, **kw):
        scored.append(self)
        return predict_logits(self, *args, **kw)
    monkeypatch.setattr(EmoNeXt, "for_inference", spy_for_inference)
    monkeypatch.setattr(EmoNeXt, "predict_logits", spy_predict_logits)
    acc = evaluate.main([str(tmp_path / "model.pt"), "--data", str(npz), "--tta", "none", *flags])
    assert [kw for kw, _ in made] == [kwargs] and scored == [made[0][1]]
    ref = reference(m, emonext.preprocess(d["test"][0], 32)).argmax(1)
    assert acc == (ref == d["test"][1]).double().mean().item()
    assert "test accuracy (none)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the copied file alone

FOR_INFERENCE_COPY_SCRIPT = """
import torch
import emonext
assert emonext.kernels is None, "kernels/ must not be importable here"
ckpt = torch.load("ckpt.pt", weights_only=True)
m = emonext.EmoNeXt.from_checkpoint(ckpt)
fast = m.for_inference()
with torch.inference_mode():
    out = {"fast": fast(ckpt["x"]), "eval": m.eval()(ckpt["x"]), "probs": m.predict(ckpt["faces"])}
torch.save(out, "out.pt")
print("ok")
"""


@pytest.mark.slow
def test_for_inference_works_when_copied_alone(tmp_path, run_emonext_alone, inference_faces):
    m = trained_looking("femto", 40, in_chans=3, num_classes=8)
    x = faces_as_input(3, 40)
    torch.save({"config": emonext.config_dict(m), "model": m.state_dict(), "x": x, "faces": inference_faces},
               tmp_path / "ckpt.pt")
    assert run_emonext_alone(FOR_INFERENCE_COPY_SCRIPT).strip() == "ok"
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = reference(m, x)
    torch.testing.assert_close(out["fast"], ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["eval"], out["fast"], rtol=0, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(out["probs"], m.predict(inference_faces), rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# emonext.py stands alone

def test_imports_only_torch_and_stdlib():
    path = os.path.join(REPO, "emonext.py")
    tree = ast.parse(open(path).read())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            catches = {getattr(h.type, "id", None) for h in node.handlers}
            if catches & {"ImportError", "ModuleNotFoundError"}:
                for sub in node.body:
                    for n in ast.walk(sub):
                        if isinstance(n, (ast.Import, ast.ImportFrom)):
                            optional.add(id(n))
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in emonext.py"
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            roots.append(root)
            if root == "kernels":
                assert id(node) in optional, "kernels must be imported inside try/except ImportError"
            else:
                assert root == "torch" or root in sys.stdlib_module_names, f"emonext.py imports {name}"
    assert "torch" in roots and "kernels" in roots


COPY_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
import emonext
assert emonext.__file__.startswith(sys.argv[1]), emonext.__file__
assert emonext.kernels is None, "kernels/ should not be importable here"
ckpt = torch.load("ckpt.pt", weights_only=True)
m = emonext.EmoNeXt.from_checkpoint("ckpt.pt").eval()
m2 = emonext.EmoNeXt.from_size("atto", img_size=48, in_chans=1)
report = emonext.load_weights(m2, "ckpt.pt", verbose=False)
assert report["kind"] == "emonext" and not report["missing"], report
x, y = ckpt["x"], ckpt["y"]
with torch.no_grad():
    logits, loss = m(x, y)
    logits2 = m2.eval()(x)
torch.save({"logits": logits, "loss": loss, "logits2": logits2}, "out.pt")
print("ok")
"""


def test_importing_emonext_with_its_kernels_loads_no_torch_dynamo():
    """kernels/ beside it is imported, but torch.compile's machinery (most of an import's time) waits for a compile."""
    code = "import sys, emonext; assert emonext.kernels is not None; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(emonext.__file__)))
    assert out.returncode == 0 and out.stdout == "False\n", out.stderr


@pytest.mark.slow
def test_works_when_copied_alone(tmp_path, run_emonext_alone):
    src = scramble(model("atto", 48, in_chans=1)).eval()
    x, y = torch.randn(3, 1, 48, 48), torch.tensor([0, 2, 6])
    torch.save({"config": emonext.config_dict(src), "model": src.state_dict(), "x": x, "y": y},
               tmp_path / "ckpt.pt")
    assert run_emonext_alone(COPY_SCRIPT).strip() == "ok"
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        logits, loss = src(x, y)
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["logits2"], logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss, rtol=0, atol=1e-6)


def test_predict_from_a_copied_emonext_alone(shaken, faces, tmp_path, run_emonext_alone):
    """emonext.py copied alone into an empty folder, with a checkpoint: the same probabilities, no data.py."""
    torch.save({"config": emonext.config_dict(shaken), "model": shaken.state_dict()}, tmp_path / "model.pt")
    rgb = np.stack([faces[0].numpy(), faces[1].numpy(), faces[2].numpy()], -1)
    np.save(tmp_path / "faces.npy", rgb)
    out = run_emonext_alone("import numpy, torch, emonext, sys\n"
                            "assert 'data' not in sys.modules\n"
                            "m = emonext.EmoNeXt.from_checkpoint('model.pt')\n"
                            "torch.save(m.predict(numpy.load('faces.npy')), 'probs.pt')\n"
                            "print(*m.config.class_names)\n")
    assert out.split() == list(emonext.FER2013_CLASS_NAMES)
    torch.testing.assert_close(torch.load(tmp_path / "probs.pt", weights_only=True), shaken.predict(rgb),
                               rtol=0, atol=1e-6)

# -----------------------------------------------------------------------------
# the kernels backend on CPU

def _kernels():
    if emonext.kernels is None:
        pytest.skip("kernels/ is not importable (emonext.kernels is None): the fused backend cannot be tested")
    k = emonext.kernels
    for op in ("dwconv_layernorm", "affine_sample"):
        if not hasattr(torch.ops.emonext, op):
            pytest.skip(f"torch.ops.emonext.{op} is not registered yet")
    return k


@pytest.fixture
def kernels_backend():
    k = _kernels()
    yield k
    k.set_backend("auto")


def test_fused_backend_matches_torch_backend_on_cpu(kernels_backend):
    k = kernels_backend
    m = scramble(model("atto", 48, in_chans=1, drop_path_rate=0.0)).train()
    x, y = torch.randn(4, 1, 48, 48), torch.tensor([0, 1, 4, 6])
    results = {}
    for backend in ("torch", "fused"):
        k.set_backend(backend)
        assert k.use_dwconv_layernorm(x) == (backend == "fused") and k.use_affine_sample(x) == (backend == "fused")
        m.zero_grad()
        logits, loss = m(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results[backend] = (logits.detach(), loss.detach(), grads)
    (lt, st, gt), (lf, sf, gf) = results["torch"], results["fused"]
    assert gf.keys() == gt.keys() and len(gt) == len(list(m.parameters())) - 2  # all but attention.value's
    torch.testing.assert_close(lf, lt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sf, st, rtol=1e-5, atol=1e-6)
    for n in gt:  # relative to the gradient's size (the conv bias in front of train-mode BatchNorm gets only noise)
        err, scale = (gf[n] - gt[n]).norm().item(), gt[n].norm().item()
        assert err <= 1e-3 * scale + 1e-5, f"grad of {n}: |fused - torch| {err:.3g}, |torch| {scale:.3g}"
    assert gf["fc_loc.2.weight"].abs().sum() > 0 and gf["stages.0.0.dwconv.weight"].abs().sum() > 0


def test_compile_with_fused_ops_has_no_graph_breaks(kernels_backend):
    k = kernels_backend
    k.set_backend("fused")
    m = model("atto", 32, in_chans=1).eval()
    code = one_graph_code(m, torch.randn(2, 1, 32, 32))
    assert "emonext.dwconv_layernorm" in code and "emonext.affine_sample" in code
