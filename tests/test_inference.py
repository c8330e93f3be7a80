"""EmoNeXt's fast inference path (issue 13): eval mode under inference mode (or no_grad) folds the STN's BatchNorms
into its convs, pools with elementwise maxima and keeps grey input to an RGB model one channel; `for_inference()`
returns an eval copy (channels-last or compiled on request). Checked: the same logits as the reference layers within
1e-4 on weights shaken so that every folded part matters, the original model untouched, predict, predict_logits and
eval.py on the fast path, and the copied emonext.py alone. Hooks on the STN's BatchNorms tell which path ran."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import emonext
import eval as evaluate
import synthetic
from conftest import one_graph_code
from emonext import EmoNeXt

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
def faces():
    return synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=3)["train"][0]  # uint8 (12, 48, 48)


def test_predict_runs_the_fast_path(faces):
    m = trained_looking("atto", 64).train()
    before = state(m)
    calls = BatchNormCalls(m)
    probs = m.predict(faces, batch_size=5)
    assert calls.n == 0
    calls.remove()
    assert m.training  # predict gives the model its mode back
    assert_same_state(state(m), before)
    ref = reference(m.eval(), emonext.preprocess(faces, 64)).softmax(-1)
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-5)
    assert probs.argmax(1).unique().numel() > 1  # the faces get different answers


@pytest.mark.parametrize("tta", ("none", "tencrop"))
def test_predict_logits_runs_the_fast_path_and_folds_nothing_in_place(faces, tta):
    """train.py scores its EMA model with this method every epoch: the EMA must come out unchanged."""
    m = trained_looking("atto", 48)
    before = state(m)
    calls = BatchNormCalls(m)
    logits = m.predict_logits(faces, tta, batch_size=5)
    assert calls.n == 0
    calls.remove()
    assert_same_state(state(m), before)
    if tta == "none":
        ref = reference(m, emonext.preprocess(faces, 48))
    else:
        ref = reference(m, emonext.ten_crop(faces, 48).flatten(0, 1)).view(len(faces), 10, -1).mean(1)
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

COPY_SCRIPT = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
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


def test_for_inference_works_when_copied_alone(tmp_path, run_emonext_alone, faces):
    m = trained_looking("femto", 40, in_chans=3, num_classes=8)
    x = faces_as_input(3, 40)
    torch.save({"config": emonext.config_dict(m), "model": m.state_dict(), "x": x, "faces": faces},
               tmp_path / "ckpt.pt")
    assert run_emonext_alone(COPY_SCRIPT).strip() == "ok"
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = reference(m, x)
    torch.testing.assert_close(out["fast"], ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["eval"], out["fast"], rtol=0, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(out["probs"], m.predict(faces), rtol=0, atol=1e-6)
