"""train.py: it learns, its checkpoints, kill-and-resume, the non-finite guard, the lr schedule (issue 3).

Runs train.main in-process (and train.py as a subprocess for the kill test) on a small .npz of the built-in
synthetic faces, atto at 32 px, one CPU thread (deterministic, and on a busy 2-core machine much faster than two).
"""
import os
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import train
from emonext import EmoNeXt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS_PER_EPOCH = 14  # 448 faces / batch 32


@pytest.fixture(scope="module")
def faces_npz(tmp_path_factory):
    """448 train / 70 val / 70 test synthetic faces in the .npz layout of ../shared/data/fer2013.npz."""
    d = data.synthetic_faces(n_train=448, n_val=70, n_test=70, seed=1)
    path = tmp_path_factory.mktemp("data") / "faces.npz"
    np.savez(path, train_x=d["train"][0].numpy(), train_y=d["train"][1].numpy(),
             public_test_x=d["val"][0].numpy(), public_test_y=d["val"][1].numpy(),
             private_test_x=d["test"][0].numpy(), private_test_y=d["test"][1].numpy())
    return str(path)


def tiny_args(npz, out_dir, max_iters=24, eval_interval=12, *extra):
    return ["--data", npz, "--model", "atto", "--img-size", "32", "--batch-size", "32",
            "--max-iters", str(max_iters), "--eval-interval", str(eval_interval), "--log-interval", "3",
            "--warmup", "3", "--out-dir", str(out_dir), "--threads", "1", *extra]


LOG = re.compile(r"iter (\d+)/(\d+) \| loss ([\d.]+) \(ce ([\d.]+) sa ([\d.e+-]+)\) \| acc [\d.]+% \| lr ([\d.e+-]+)")


@pytest.fixture(scope="module")
def trained(faces_npz, tmp_path_factory):
    """One short run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        results = train.main(tiny_args(faces_npz, out, 24, 12, "--lr", "3e-3", "--min-lr", "1e-4"))
    return SimpleNamespace(out=out, results=results, stdout=buf.getvalue(), npz=faces_npz)


def learned(key):
    """Weights the optimizer owns (not BatchNorm's statistics, which every train-mode forward updates)."""
    return "running" not in key and "num_batches" not in key


def eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(data.preprocess(x, 32)), y).item()


def test_training_lowers_the_loss(trained):
    splits = data.load_fer2013(trained.npz)
    x, y = splits["train"][0][:256], splits["train"][1][:256]
    torch.manual_seed(0)  # train.py seeds, then builds the model: the same initial weights
    init = EmoNeXt.from_size("atto", img_size=32, in_chans=1)
    ckpt = torch.load(trained.out / "ckpt.pt", weights_only=True)
    trained_model = EmoNeXt.from_size("atto", img_size=32, in_chans=1)
    trained_model.load_state_dict(ckpt["model"])
    before, after = eval_loss(init, x, y), eval_loss(trained_model, x, y)
    assert after < before - 0.05, (before, after)
    logged = [(int(m[1]), float(m[3])) for m in LOG.finditer(trained.stdout)]
    assert [it for it, _ in logged] == list(range(3, 25, 3))
    assert np.mean([l for _, l in logged[-3:]]) < np.mean([l for _, l in logged[:3]])


def test_outputs_and_checkpoint_contents(trained):
    out, r = trained.out, trained.results
    assert set(r) == {"best_val_acc", "nonfinite_steps", "test_acc_none", "test_acc_tencrop"}
    assert r["nonfinite_steps"] == 0
    for k in ("best_val_acc", "test_acc_none", "test_acc_tencrop"):
        assert 0.0 <= r[k] <= 1.0 and abs(r[k] * 70 - round(r[k] * 70)) < 1e-9  # a fraction of 70 faces
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "results.json", "stn.png"]  # no .tmp left behind
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    for k in ("config", "model", "ema", "optimizer", "iter", "rng_cpu", "args", "best_val_acc", "nonfinite_steps"):
        assert k in ckpt, k
    assert ckpt["iter"] == 24 and ckpt["nonfinite_steps"] == 0
    assert ckpt["config"]["dims"] == [40, 80, 160, 320] and ckpt["config"]["img_size"] == 32
    assert ckpt["config"]["in_chans"] == 1 and ckpt["args"]["lr"] == 3e-3
    assert ckpt["rng_cpu"].dtype == torch.uint8
    assert ckpt["model"].keys() == ckpt["ema"].keys()
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [train.lr_at(23, SimpleNamespace(
        lr=3e-3, min_lr=1e-4, warmup=3), 24)] * 2
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.05, 0.0]
    # the EMA lags the model: close, not equal
    diffs = [(ckpt["ema"][k] - v).abs().max().item() for k, v in ckpt["model"].items() if v.is_floating_point()]
    assert max(diffs) > 0
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["iter"] in (12, 24) and best["best_val_acc"] == pytest.approx(trained.results["best_val_acc"])
    m = EmoNeXt.from_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in m.state_dict().items())
    from PIL import Image
    with Image.open(out / "stn.png") as im:
        assert im.size == (4 * (2 * 32 + 8), 4 * (32 + 4))  # 16 faces, 4 pairs per row
    assert "val acc (EMA)" in trained.stdout and "test accuracy of" in trained.stdout


def test_optimizer_state_counts_every_parameter(trained):
    ckpt = torch.load(trained.out / "ckpt.pt", weights_only=True)
    n_params = sum(1 for _ in EmoNeXt.from_size("atto", img_size=32, in_chans=1).parameters())
    # AdamW holds state for each parameter that got a gradient: all but attention.value (unused by the loss)
    assert len(ckpt["optimizer"]["state"]) == n_params - 2
    assert all(s["step"].item() == 24 for s in ckpt["optimizer"]["state"].values())


def test_logged_lr_follows_the_schedule(trained):
    args = SimpleNamespace(lr=3e-3, min_lr=1e-4, warmup=3)
    for m in LOG.finditer(trained.stdout):
        it = int(m[1])
        assert float(m[6]) == pytest.approx(train.lr_at(it - 1, args, 24), rel=5e-3)


def test_lr_schedule_warmup_then_cosine():
    args = SimpleNamespace(lr=2e-3, min_lr=1e-5, warmup=10)
    lrs = [train.lr_at(i, args, 100) for i in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == 2e-3 and lrs[10] == 2e-3
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # then decreasing
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5), rel=1e-12)  # half way down: the mean
    assert train.lr_at(100, args, 100) == 1e-5 and train.lr_at(150, args, 100) == 1e-5
    assert max(lrs) == 2e-3
    # exact peak and floor for many settings (the naive formulas miss them by an ulp for some)
    rng = random.Random(0)
    for lr, min_lr, warmup in [(0.1, 1e-5, 3), (5.6246632909542805e-05, 0.0, 797),
                               (0.04837227507069577, 0.0043648636209976215, 5)] + [
            (10 ** rng.uniform(-6, 0), 0.0, rng.randint(0, 300)) for _ in range(300)] + [
            (lr, lr * 10 ** rng.uniform(-4, -0.01), rng.randint(0, 50)) for lr in
            (10 ** rng.uniform(-6, 0) for _ in range(300))]:
        a, n = SimpleNamespace(lr=lr, min_lr=min_lr, warmup=warmup), warmup + 40
        lrs = [train.lr_at(i, a, n) for i in range(n)]
        assert max(lrs) == lr, (lr, min_lr, warmup)
        assert train.lr_at(n, a, n) == min_lr, (lr, min_lr, warmup)
    no_warmup = SimpleNamespace(lr=1e-3, min_lr=0.0, warmup=0)
    assert train.lr_at(0, no_warmup, 10) == 1e-3 and train.lr_at(10, no_warmup, 10) == 0.0


def test_recipe_flags_reach_the_model_and_the_augmentation(faces_npz, tmp_path, monkeypatch):
    augment, seen = data.augment, []

    def recording_augment(x, img_size, generator=None, **kw):
        seen.append(kw)
        return augment(x, img_size, generator, **kw)
    monkeypatch.setattr(data, "augment", recording_augment)
    out = tmp_path / "flags"
    train.main(tiny_args(faces_npz, out, 2, 2, "--rotate", "7", "--zoom", "0.25", "--shift", "0.03", "--vflip",
                         "--layer-scale-init", "0.5"))
    assert seen == [dict(rotate=7.0, scale=(0.75, 1.25), translate=0.03, vflip=True, rows=(0, 32))] * 2
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["layer_scale_init"] == 0.5
    assert ckpt["args"]["rotate"] == 7.0 and ckpt["args"]["zoom"] == 0.25 and ckpt["args"]["shift"] == 0.03
    # the defaults are the official recipe's augmentation
    defaults = train.parse_args([])
    assert (defaults.rotate, 1 - defaults.zoom, 1 + defaults.zoom, defaults.shift) == (20.0, 0.8, 1.2, 0.1)
    assert defaults.layer_scale_init == 1e-6


def test_non_finite_loss_is_skipped_and_stops_the_run(faces_npz, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(faces_npz, out, 24, 4, "--sa-weight", "nan"))
    msg = str(e.value.code)
    assert "non-finite" in msg and "5 non-finite steps in a row at iteration 4" in msg
    stdout = capsys.readouterr().out
    skipped = re.findall(r"iter (\d+): non-finite loss or gradient \(nan\), step skipped \((\d+) in a row", stdout)
    assert skipped == [(str(i), str(i + 1)) for i in range(5)]
    # the evaluation at iteration 4 saved the untouched initial weights, with the 4 skipped steps counted
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 4 and ckpt["nonfinite_steps"] == 4
    torch.manual_seed(0)
    init = EmoNeXt.from_size("atto", img_size=32, in_chans=1).state_dict()
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in init.items() if learned(k))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _record_checkpoints(monkeypatch):
    saved, save = {}, train.save_checkpoint

    def recording_save(state, path):
        if path.endswith("ckpt.pt"):
            saved[state["iter"]] = {part: {k: v.clone() for k, v in state[part].items()} for part in ("model", "ema")}
        save(state, path)
    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    return saved


def test_skipped_steps_leave_the_weights_unchanged(faces_npz, tmp_path, capsys, monkeypatch):
    """4 good steps, then every loss is NaN: the steps are skipped, the weights and the EMA stay as they were,
    the run stops after --max-bad-steps in a row, and every checkpoint written is a finite one."""
    forward, calls = EmoNeXt.forward, []

    def nan_loss_after_4(self, x, targets=None, loss_parts=False):
        out = forward(self, x, targets, loss_parts)
        if targets is None:
            return out
        calls.append(1)
        if len(calls) <= 4:
            return out
        logits, loss, parts = out
        return logits, loss * float("nan"), parts
    monkeypatch.setattr(EmoNeXt, "forward", nan_loss_after_4)
    saved = _record_checkpoints(monkeypatch)
    out = tmp_path / "nanloss"
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row at iteration 6"):
        train.main(tiny_args(faces_npz, out, 24, 2, "--max-bad-steps", "3"))
    assert capsys.readouterr().out.count("step skipped") == 3
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 6 and ckpt["nonfinite_steps"] == 2  # saved at iteration 6, after 2 skipped steps
    assert sorted(saved) == [2, 4, 6]
    for part in ("model", "ema"):
        assert all(torch.equal(v, saved[4][part][k]) for k, v in saved[6][part].items() if learned(k))
        assert all(torch.equal(v, ckpt[part][k]) for k, v in saved[6][part].items())
        assert any(not torch.equal(v, saved[4][part][k]) for k, v in saved[2][part].items())  # good steps moved it
        assert all(torch.isfinite(v).all() for v in ckpt[part].values() if v.is_floating_point())


def test_nan_batches_leave_batchnorm_statistics_and_weights_unchanged(faces_npz, tmp_path, capsys, monkeypatch):
    """NaN batches from iteration 4 on: the train-mode forward puts NaN into the STN's BatchNorm running
    statistics before the loss is seen; a skipped step restores them, so every later checkpoint holds the weights
    and statistics of iteration 4 until the run stops after 5 bad steps in a row."""
    augment, calls = data.augment, []

    def poisoned(x, *a, **kw):
        calls.append(1)
        out = augment(x, *a, **kw)
        return out if len(calls) <= 4 else out * float("nan")
    monkeypatch.setattr(data, "augment", poisoned)
    saved = _record_checkpoints(monkeypatch)
    out = tmp_path / "poison"
    with pytest.raises(SystemExit, match=r"5 non-finite steps in a row at iteration 8"):
        train.main(tiny_args(faces_npz, out, 24, 2))
    assert capsys.readouterr().out.count("step skipped") == 5
    assert sorted(saved) == [2, 4, 6, 8]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 8
    assert any("running_mean" in k for k in ckpt["model"])
    for k, v in ckpt["model"].items():
        assert torch.equal(v, saved[4]["model"][k]) and torch.equal(v, saved[6]["model"][k]), k
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(faces_npz, tmp_path, monkeypatch):
    """An optimizer step that leaves an inf weight (finite loss and gradients): the evaluation finds it and stops
    without writing a checkpoint."""
    step, calls = torch.optim.AdamW.step, []

    def breaking_step(self, *a, **kw):
        out = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", breaking_step)
    saved = _record_checkpoints(monkeypatch)
    out = tmp_path / "infweight"
    with pytest.raises(SystemExit, match=r"non-finite weights at iteration 4; not saving over .*ckpt.pt"):
        train.main(tiny_args(faces_npz, out, 24, 2))
    assert sorted(saved) == [2]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 2


def test_resume_refuses_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        train.main(["--resume", "--out-dir", str(tmp_path / "empty"), "--threads", "1"])


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(faces_npz, tmp_path):
    """SIGKILL train.py after a checkpoint, --resume it, and compare with an uninterrupted run: bit-identical."""
    args = tiny_args(faces_npz, "PLACEHOLDER", 20, 4, "--seed", "3", "--drop-path", "0.3")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, os.path.join(REPO, "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + [a if a != "PLACEHOLDER" else str(killed) for a in args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = None, time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(killed / "ckpt.pt"):
                seen = torch.load(killed / "ckpt.pt", weights_only=True)["iter"]
                if seen >= 8:  # past the first checkpoint, mid-epoch
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        first_out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, f"train.py ended before it was killed:\n{first_out[-3000:]}"
    at_kill = torch.load(killed / "ckpt.pt", weights_only=True)["iter"]
    assert 8 <= at_kill < 20 and not os.path.exists(killed / "results.json")

    resumed = subprocess.run(cmd + ["--resume", "--out-dir", str(killed), "--threads", "1", "--log-interval", "4"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {killed / 'ckpt.pt'} at iteration {at_kill}/20" in resumed.stdout

    train.main([a if a != "PLACEHOLDER" else str(whole) for a in args])

    a = torch.load(killed / "ckpt.pt", weights_only=True)
    b = torch.load(whole / "ckpt.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 20
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for i, s in b["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(a["optimizer"]["state"][i][k], v), f"optimizer state {i}.{k}"
    assert torch.equal(a["rng_cpu"], b["rng_cpu"]) and a["best_val_acc"] == b["best_val_acc"]
    assert open(killed / "results.json").read() == open(whole / "results.json").read()
