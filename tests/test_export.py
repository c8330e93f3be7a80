"""export.py: the checkpoint to ship (.pt) and the ONNX file of the whole inference path (.onnx, fp32 or int8) that
onnxruntime runs without torch: its probabilities are EmoNeXt.predict's at any batch size (a grey model and an RGB
one whose STN warps), its metadata, eval.py scoring it as its checkpoint, one line for each thing that cannot work.
Each dynamo export takes 5-15 s, so the module makes three ONNX files (a shaken atto at 64 px, an RGB atto at 96 px
with a stem of stride 2, the int8 copy of the first) and shares them."""
import hashlib
import io
import json
import os
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import eval as evaluate
import export
import synthetic
import train
from conftest import foreign_onnx, largest_int8_weight, save_npz
from emonext import FER2013_CLASS_NAMES, EmoNeXt, config_dict, grey_faces

FERPLUS_NAMES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")


def run_export(argv):
    """export.main(argv) and what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        digest = export.main(argv)
    return digest, out.getvalue()


def session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_probs(path, faces):
    return torch.from_numpy(session(path).run(["probs"], {"faces": faces.numpy()})[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory, shaken):
    """A checkpoint fresh from train.py (2 steps, atto at 64 px, on a small .npz of synthetic faces), and a copy of
    it whose EMA weights are the shaken atto's, so that faces get clearly different probabilities."""
    root = tmp_path_factory.mktemp("export")
    d = synthetic.synthetic_faces(n_train=320, n_val=63, n_test=77, seed=2)
    npz = root / "faces.npz"
    save_npz(npz, d)
    with redirect_stdout(io.StringIO()):
        train.main(["--data", str(npz), "--model", "atto", "--img-size", "64", "--batch-size", "32",
                    "--max-iters", "2", "--eval-interval", "2", "--log-interval", "2", "--warmup", "1",
                    "--out-dir", str(root / "out"), "--threads", "1"])
    torch.set_num_threads(1)
    ckpt = torch.load(root / "out" / "best.pt", weights_only=True)
    ckpt["ema"] = shaken.state_dict()
    torch.save(ckpt, root / "shaken.pt")
    return {"root": root, "trained": str(root / "out" / "best.pt"), "ckpt": str(root / "shaken.pt"),
            "npz": str(npz), "faces": d["test"][0]}


@pytest.fixture(scope="module")
def fp32(run):
    """The shaken checkpoint as an ONNX file, and what export.py printed."""
    pytest.importorskip("onnxruntime"), pytest.importorskip("onnxscript")
    path = run["root"] / "shaken.onnx"
    digest, out = run_export([run["ckpt"], str(path)])
    return {"path": path, "digest": digest, "out": out}


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """An untrained RGB EmoNeXt-atto at 96 px with a stem of stride 2 and FER+'s 8 class names, weights shaken,
    BatchNorm statistics random and an STN that warps (a rotation, zoom and shift, and a theta that depends on the
    face), saved as a checkpoint of its config and weights alone (no train.py arguments), and that checkpoint as an
    ONNX file."""
    pytest.importorskip("onnxruntime"), pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(1)
    m = EmoNeXt.from_size("atto", img_size=96, in_chans=3, stem_stride=2, num_classes=8, class_names=FERPLUS_NAMES)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.fc_loc[2].weight.normal_(0, 0.05)
        m.fc_loc[2].bias.copy_(torch.tensor([0.9, 0.2, 0.05, -0.15, 1.1, -0.1]))
        for bn in (m.localization[1], m.localization[5]):
            bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0)
    ckpt = root / "rgb.pt"
    torch.save({"config": config_dict(m), "ema": m.state_dict()}, ckpt)
    run_export([str(ckpt), str(root / "rgb.onnx")])
    return {"model": EmoNeXt.from_checkpoint(str(ckpt)).eval(), "path": root / "rgb.onnx"}


@pytest.fixture(scope="module")
def int8(run, fp32):
    path = run["root"] / "shaken_int8.onnx"
    digest, out = run_export([run["ckpt"], str(path), "--int8", run["npz"], "--seed", "3"])
    return {"path": path, "digest": digest, "out": out}


def test_onnx_probabilities_are_predicts_at_any_batch_size(run, fp32):
    model = EmoNeXt.from_checkpoint(run["ckpt"]).eval()
    faces, expected = run["faces"][:64], model.predict(run["faces"][:64])
    assert expected.amax(1).min() < 0.9 and expected.argmax(1).unique().numel() > 2  # faces differ: a real test
    for n in (1, 7, 64):  # one file, dynamic batch
        assert (onnx_probs(fp32["path"], faces[:n]) - expected[:n]).abs().max() <= 1e-4, n
    sess = session(fp32["path"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:], out.name, out.type) == ("faces", "tensor(uint8)", [48, 48], "probs",
                                                                       "tensor(float)")
    assert isinstance(inp.shape[0], str) and out.shape[1] == len(FER2013_CLASS_NAMES)  # N: a symbol, not a number
    lines = fp32["out"].splitlines()
    assert lines[-2].startswith("onnxruntime vs EmoNeXt.predict on 64 faces: max |prob diff| ")
    assert float(lines[-2].split("max |prob diff| ")[1].split(",")[0]) <= 1e-4
    size = os.path.getsize(fp32["path"]) / 2**20
    assert lines[-1] == f"{fp32['path']}: {size:.1f} MiB, sha256 {fp32['digest']}"
    assert hashlib.sha256(fp32["path"].read_bytes()).hexdigest() == fp32["digest"]
    assert not [f for f in os.listdir(run["root"]) if f.endswith(".tmp")]  # written through a temporary file


@pytest.mark.slow
def test_rgb_model_at_96_px_with_a_stride_2_stem_and_a_warping_stn(rgb):
    model, faces = rgb["model"], synthetic.synthetic_faces(n_train=64, n_val=0, n_test=0, seed=4)["train"][0]
    with torch.no_grad():  # the STN does warp: theta is far from the identity and differs from face to face
        x = torch.nn.functional.interpolate(faces[:, None].float() / 255, size=96, mode="bilinear")
        theta = model.stn(x)[1].flatten(1)
    assert (theta - torch.tensor([1.0, 0, 0, 0, 1, 0])).abs().max(1).values.min() > 0.05
    assert theta.std(0).max() > 0.01
    for n in (1, 7, 64):
        assert (onnx_probs(rgb["path"], faces[:n]) - model.predict(faces[:n])).abs().max() <= 1e-4, n
    rng = np.random.default_rng(0)  # RGB photos of another size: the ONNX file takes them as predict does, after
    photos = rng.integers(0, 256, (7, 120, 100, 3), dtype=np.uint8)  # grey_faces
    assert (onnx_probs(rgb["path"], grey_faces(photos)) - model.predict(photos)).abs().max() <= 1e-4


@pytest.mark.slow
def test_metadata_reads_back_through_onnxruntime(run, fp32, rgb):
    meta = session(fp32["path"]).get_modelmeta().custom_metadata_map
    ckpt = torch.load(run["ckpt"], weights_only=True)
    assert json.loads(meta["emonext.class_names"]) == list(FER2013_CLASS_NAMES)
    assert json.loads(meta["emonext.config"]) == config_dict(EmoNeXt.from_checkpoint(run["ckpt"]))
    assert json.loads(meta["emonext.args"]) == ckpt["args"] and json.loads(meta["emonext.iter"]) == ckpt["iter"]
    assert json.loads(meta["emonext.best_val_acc"]) == ckpt["best_val_acc"]
    assert json.loads(meta["emonext.precision"]) == "fp32" and "emonext.quantization" not in meta
    assert json.loads(meta["emonext.input"]).startswith("faces: uint8 (N, 48, 48) grey faces")
    assert json.loads(meta["emonext.output"]).startswith("probs: float32 (N, 7) softmax probabilities")
    assert all(json.loads(v) is not None for v in meta.values())  # every value JSON, as the README says
    meta = session(rgb["path"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["emonext.class_names"]) == list(FERPLUS_NAMES)
    config = json.loads(meta["emonext.config"])
    assert (config["in_chans"], config["img_size"], config["stem_stride"]) == (3, 96, 2)
    assert not {"emonext.args", "emonext.iter", "emonext.best_val_acc"} & set(meta)  # the checkpoint had none


@pytest.mark.slow
def test_int8_is_smaller_says_so_and_mostly_agrees_with_fp32(run, fp32, int8):
    assert os.path.getsize(int8["path"]) < 0.4 * os.path.getsize(fp32["path"])
    meta = session(int8["path"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["emonext.precision"]) == "int8" and all(json.loads(v) is not None for v in meta.values())
    how = json.loads(meta["emonext.quantization"])
    assert how["calibration"] == {"method": "MinMax", "data": run["npz"], "train faces": 320, "seed": 3}
    assert "QDQ" in how["how"] and how["quantised"] == ["Conv", "MatMul", "Gemm"] and "depthwise" in how["fp32"]
    assert json.loads(meta["emonext.class_names"]) == list(FER2013_CLASS_NAMES)  # the fp32 metadata carried over
    ops = {n.op_type for n in pytest.importorskip("onnx").load(int8["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "AffineGrid", "GridSample", "Softmax"} <= ops
    # 7 bits: CPUs without VNNI sum pairs of u8 * s8 products in int16, where 2 * 255 * 64 fits
    assert largest_int8_weight(int8["path"]) <= 64
    faces = run["faces"]
    agree = (onnx_probs(int8["path"], faces).argmax(-1) == onnx_probs(fp32["path"], faces).argmax(-1)).double()
    assert agree.mean() >= 0.7  # shaken weights give near-uniform probabilities: a loose bound
    assert "calibrating on 320 train faces of FER2013 from" in int8["out"] and "top class the same on" in int8["out"]


def test_an_fp32_file_that_differs_from_predict_ends_the_script(run, fp32, shaken):
    other = EmoNeXt.from_size("atto", img_size=64, in_chans=1).eval()  # not the weights that were exported
    with pytest.raises(SystemExit) as e:
        export.check_onnx(str(fp32["path"]), other, run["faces"][:8], int8=False)
    assert str(e.value.code).startswith(f"export.py: {fp32['path']}: onnxruntime's probabilities differ from "
                                        "EmoNeXt.predict's by ") and "\n" not in str(e.value.code)
    assert export.check_onnx(str(fp32["path"]), other, run["faces"][:8], int8=True) > 1e-4  # int8: said, not fatal


def test_eval_scores_the_onnx_file_as_its_checkpoint(run, fp32, capsys, tmp_path):
    acc_pt = evaluate.main([run["ckpt"], "--data", run["npz"], "--tta", "none", "--out-dir", str(tmp_path)])
    out_pt = capsys.readouterr().out
    acc_onnx = evaluate.main([str(fp32["path"]), "--data", run["npz"], "--out-dir", str(tmp_path)])
    out_onnx = capsys.readouterr().out
    assert acc_onnx == acc_pt and 0.05 < acc_pt < 0.95  # --tta none is the default for an .onnx file
    assert f"test accuracy (none): {100 * acc_pt:.2f}% of 77" in out_onnx
    report = lambda out: out[out.index("class"):out.index("confusion matrix picture")]  # noqa: E731
    assert report(out_onnx) == report(out_pt)  # per-class scores and confusion matrix alike


@pytest.mark.parametrize("flags, says", [
    (["--tta", "tencrop"], "eval.py: --tta tencrop: an .onnx file holds the plain path only (export.py); use --tta "
                           "none"),
    (["--amp"], "eval.py: --amp: an option of a checkpoint; an .onnx file runs in onnxruntime as exported"),
    (None, "eval.py: an .onnx file is scored on the data given with --data PATH"),
])
def test_eval_refuses_what_an_onnx_file_cannot_do_in_one_line(run, flags, says, monkeypatch):
    monkeypatch.setattr(evaluate, "onnx_scorer", lambda *a: pytest.fail("loaded before the flags were checked"))
    argv = ["model.onnx"] + (["--data", run["npz"]] + flags if flags is not None else [])
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert str(e.value.code) == says


def test_eval_says_when_an_onnx_file_is_not_one_of_export_py(run, tmp_path):
    pytest.importorskip("onnxruntime")
    foreign, garbage = foreign_onnx(tmp_path / "foreign.onnx"), tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    for path, says in ((foreign, "not an ONNX file of export.py (no emonext.class_names in its metadata)"),
                       (garbage, "onnxruntime cannot load it ("), (tmp_path / "gone.onnx", None)):
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(path), "--data", run["npz"]])
        msg = str(e.value.code)
        assert (msg.startswith(f"eval.py: {path}: {says}") if says else msg == f"eval.py: not found: {path}")
        assert "\n" not in msg


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_optional_package_gets_one_line_saying_what_to_install(run, package, monkeypatch, tmp_path):
    for other in {"onnx", "onnxscript", "onnxruntime"} - {package}:  # the one missing is this one alone
        pytest.importorskip(other)
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(SystemExit) as e:
        export.main([run["ckpt"], str(tmp_path / "model.onnx")])
    assert str(e.value.code) == (f"export.py: an .onnx file needs onnx, onnxscript and onnxruntime ({package} is "
                                 "missing): pip install -r requirements-extra.txt")
    assert os.listdir(tmp_path) == []
    if package == "onnxruntime":
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(tmp_path / "model.onnx"), "--data", run["npz"]])
        assert str(e.value.code) == ("eval.py: an .onnx file is scored by onnxruntime: "
                                     "pip install -r requirements-extra.txt")


@pytest.mark.parametrize("argv, says", [
    (["OUT.onnx", "--calibration-faces", "0"], "export.py: --calibration-faces: expected at least 1, got 0"),
    (["OUT.onnx", "--seed", "-1"], "export.py: --seed: expected at least 0, got -1"),
    (["OUT.txt"], "export.py: OUT.txt: expected a .pt or an .onnx file to write"),
    (["OUT.pt", "--int8", "faces.npz"], "export.py: --int8 quantises an .onnx file; a .pt is written in half "
                                        "precision"),
])
def test_flags_that_cannot_work_end_in_one_line_before_anything_loads(run, argv, says, monkeypatch):
    monkeypatch.setattr(export, "read_checkpoint", lambda *a: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        export.main([run["ckpt"], *argv])
    assert str(e.value.code) == says


def test_every_flag_says_what_it_does_and_its_default():
    for action in export.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings


def test_int8_data_that_cannot_be_read_ends_in_one_line(run, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):  # an .onnx file needs them before its data is read
        pytest.importorskip(package)
    with pytest.raises(SystemExit) as e:
        export.main([run["ckpt"], str(tmp_path / "model.onnx"), "--int8", str(tmp_path / "nothing.npz")])
    assert str(e.value.code).startswith("export.py: --int8: ") and "nothing.npz" in str(e.value.code)
    assert os.listdir(tmp_path) == []


# --- the checkpoint to ship (.pt), as eval.py --export wrote it before export.py ---


def test_pt_export_writes_the_half_precision_ema_checkpoint_that_eval_scores(run, tmp_path):
    path = tmp_path / "new" / "shipped.pt"
    digest, out = run_export([run["trained"], str(path)])
    assert out == f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, sha256 {digest}\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert os.listdir(path.parent) == ["shipped.pt"]  # written through a temporary file, which is gone
    shipped, source = (torch.load(p, weights_only=True) for p in (path, run["trained"]))
    assert not {"model", "optimizer", "rng_cpu"} & set(shipped)
    assert shipped["config"] == source["config"]  # the class names inside it
    assert (shipped["args"], shipped["iter"], shipped["best_val_acc"]) == (source["args"], source["iter"],
                                                                           source["best_val_acc"])
    assert shipped["ema"].keys() == source["ema"].keys()
    for k, v in source["ema"].items():  # the EMA weights, rounded to fp16
        assert shipped["ema"][k].dtype == (torch.float16 if v.is_floating_point() else v.dtype), k
        assert torch.equal(shipped["ema"][k], v.half() if v.is_floating_point() else v), k
    model, _ = evaluate.load_model(run["trained"], "cpu")
    half, _ = evaluate.load_model(str(path), "cpu")
    x = run["faces"]
    torch.testing.assert_close(half.predict_logits(x), model.predict_logits(x), rtol=0, atol=2e-2)


def test_several_checkpoints_export_as_one_model_with_their_weights_averaged(run, tmp_path):
    path = tmp_path / "soup.pt"
    digest, out = run_export(["--average", run["trained"], run["ckpt"], str(path)])
    assert out == f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, sha256 {digest}\n"
    soup, trained, shaken = (torch.load(p, weights_only=True) for p in (path, run["trained"], run["ckpt"]))
    assert soup["averaged_from"] == [run["trained"], run["ckpt"]] and soup["args"] == trained["args"]
    assert "iter" not in soup and "best_val_acc" not in soup  # neither checkpoint's: the soup was never validated
    assert soup["config"] == trained["config"] and soup["ema"].keys() == trained["ema"].keys()
    for k, v in trained["ema"].items():  # the mean of the two EMA weights (BatchNorm statistics too), in fp16
        mean = (v + shaken["ema"][k]) / 2 if v.is_floating_point() else v
        assert torch.equal(soup["ema"][k], mean.half() if v.is_floating_point() else mean), k
    for sources in ([run["trained"], run["ckpt"]], [str(path)]):  # an .onnx soup, made at once or of the soup .pt
        meta = export.metadata(*export.load_models(sources))
        assert json.loads(meta["emonext.averaged_from"]) == [run["trained"], run["ckpt"]], sources
        assert not {"emonext.iter", "emonext.best_val_acc"} & set(meta)


@pytest.mark.parametrize("argv, says", [
    (["A.pt", "B.pt", "OUT.pt"], "export.py: 2 checkpoints given: to write one model of their weights averaged (a "
                                 "uniform soup), pass --average"),
    (["--average", "A.pt", "OUT.pt"], "export.py: --average needs two checkpoints or more"),
])
def test_a_soup_is_asked_for_by_name(argv, says, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "read_checkpoint", lambda *a: pytest.fail("loaded before the flags were checked"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    assert str(e.value.code) == says and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_checkpoints_of_different_models_do_not_average(run, rgb, tmp_path):
    rgb_ckpt = str(rgb["path"]).replace(".onnx", ".pt")
    with pytest.raises(SystemExit) as e:
        export.main(["--average", run["ckpt"], rgb_ckpt, str(tmp_path / "soup.pt")])
    assert str(e.value.code) == (f"export.py: {rgb_ckpt}: not the model of {run['ckpt']} (img_size 96 against 64; "
                                 "in_chans 3 against 1; num_classes 8 against 7; class_names "
                                 f"{list(FERPLUS_NAMES)} against {list(FER2013_CLASS_NAMES)}): only checkpoints of "
                                 "one architecture, input and classes average")
    assert os.listdir(tmp_path) == []


def test_exports_that_cannot_be_written_end_in_one_line_and_leave_no_temporary_file(run, tmp_path, monkeypatch):
    for name in ("a_folder.pt", "a_folder.onnx"):
        (tmp_path / name).mkdir()
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript"), pytest.importorskip("onnxruntime")  # export.py asks for all three first
    tiny = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    monkeypatch.setattr(export, "onnx_graph", lambda model: tiny)  # not the 10 s export: its write is tested here
    for name in ("a_folder.pt", "a_folder.onnx"):
        with pytest.raises(SystemExit) as e:
            export.main([run["trained"], str(tmp_path / name)])  # onto a folder
        assert str(e.value.code).startswith(f"export.py: cannot write {tmp_path / name} (")
        assert os.listdir(tmp_path / name) == []
    assert sorted(os.listdir(tmp_path)) == ["a_folder.onnx", "a_folder.pt"]  # no temporary file left
    with pytest.raises(SystemExit) as e:
        export.main([run["trained"], "/etc/passwd/x.pt"])  # under a file: nothing can be made there
    assert str(e.value.code) == "export.py: cannot write /etc/passwd/x.pt (Not a directory)"


def test_an_out_that_is_the_checkpoint_is_refused_in_one_line_and_nothing_is_written(run, tmp_path, monkeypatch):
    """export.py ckpt.pt ckpt.pt turned a training checkpoint into the slim file: the same file under any name (a
    relative path, a symlink, a hard link) is refused before anything loads."""
    monkeypatch.setattr(export, "read_checkpoint", lambda *a: pytest.fail("loaded though OUT is the checkpoint"))
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(open(run["trained"], "rb").read())
    (tmp_path / "link.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    before = ckpt.read_bytes()
    for out, argv in (("ckpt.pt", [str(ckpt)]), (str(tmp_path / "link.pt"), ["./ckpt.pt"]),
                      ("hard.pt", ["ckpt.pt"]), ("ckpt.pt", ["--average", run["ckpt"], "link.pt"])):
        with pytest.raises(SystemExit) as e:
            export.main([*argv, out])
        assert str(e.value.code) == (f"export.py: {out} is the checkpoint {argv[-1]} it would be made of: write to "
                                     "another path")
    assert ckpt.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hard.pt", "link.pt"]


def test_an_out_that_cannot_be_written_ends_the_export_before_any_work(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "read_checkpoint", lambda *a: pytest.fail("loaded before OUT was checked"))
    (tmp_path / "a_folder.pt").mkdir()
    (tmp_path / "a_file").write_text("x")
    for out, why in ((tmp_path / "a_folder.pt", "Is a directory"), (tmp_path / "a_file" / "x.onnx", "Not a directory")):
        with pytest.raises(SystemExit) as e:
            export.main([run["trained"], str(out)])
        assert str(e.value.code) == f"export.py: cannot write {out} ({why})"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder.pt"] and os.listdir(tmp_path / "a_folder.pt") == []
