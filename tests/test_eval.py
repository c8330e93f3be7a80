"""eval.py: scores of a fresh checkpoint (they must agree with train.py's own), the confusion PNG and --amp, clear
errors for foreign or damaged checkpoints, and the helpers on hand-made input (ONNX files: test_export.py).
One tiny checkpoint is trained once for the module (atto, 32 px, 12 iterations, one CPU thread)."""
import errno
import io
import os
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
import synthetic
import train
from conftest import save_npz
from emonext import FER2013_CLASS_NAMES, EmoNeXt

K = len(FER2013_CLASS_NAMES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint fresh from train.py, trained on a small .npz of synthetic faces, and train.py's own scores."""
    root = tmp_path_factory.mktemp("eval")
    d = synthetic.synthetic_faces(n_train=320, n_val=63, n_test=77, seed=2)
    npz = root / "faces.npz"
    save_npz(npz, d)
    with redirect_stdout(io.StringIO()):
        results = train.main(["--data", str(npz), "--model", "atto", "--img-size", "32", "--batch-size", "32",
                              "--max-iters", "12", "--eval-interval", "6", "--log-interval", "6", "--warmup", "2",
                              "--out-dir", str(root / "out"), "--threads", "1"])
    torch.set_num_threads(1)
    return {"root": root, "ckpt": str(root / "out" / "best.pt"), "results": results, "splits": d}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in a folder of its own: eval.py's default --out-dir, out/, is then the test's."""
    monkeypatch.chdir(tmp_path)


def run_eval(argv, capsys):
    ret = evaluate.main(argv)
    return ret, capsys.readouterr().out


def parse_report(out, names):
    rows = {}
    for name in names:
        m = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M)
        assert m, f"no report row for {name}:\n{out}"
        rows[name] = (float(m[1]), float(m[2]), float(m[3]), int(m[4]))
    cm = []
    for name in names:
        m = re.search(rf"^{name}\s+((?:\s*\d+){{{len(names)}}})$", out.split("confusion matrix")[1], re.M)
        assert m, f"no confusion row for {name}"
        cm.append([int(v) for v in m[1].split()])
    return rows, torch.tensor(cm)


def test_eval_scores_agree_with_train_and_write_the_png(run, capsys, tmp_path):
    acc, out = run_eval([run["ckpt"], "--out-dir", str(tmp_path)], capsys)
    # the same EMA weights, the same test split, the same ten-crop: the same accuracy as train.py's final test
    assert acc == pytest.approx(run["results"]["test_acc_tencrop"], abs=1e-12)
    assert f"test accuracy (tencrop): {100 * acc:.2f}% of 77" in out
    rows, cm = parse_report(out, FER2013_CLASS_NAMES)
    y = run["splits"]["test"][1]
    assert [r[3] for r in rows.values()] == torch.bincount(y, minlength=K).tolist()  # support per class
    assert cm.sum(1).tolist() == torch.bincount(y, minlength=K).tolist()
    assert cm.diag().sum().item() == round(acc * 77)
    for i, (p, r, f1, _) in enumerate(rows.values()):
        assert r == pytest.approx(cm[i, i].item() / max(1, cm[i].sum().item()), abs=6e-4)
        assert p == pytest.approx(cm[i, i].item() / max(1, cm[:, i].sum().item()), abs=6e-4)
    png = tmp_path / "best_confusion_test.png"  # named after the checkpoint and the split
    assert f"confusion matrix picture: {png}" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (80 + K * 64 + 10,) * 2
        assert len(np.unique(np.asarray(im.convert("L")))) > 2  # drawn, not blank


def test_eval_plain_val_split_matches_best_val_acc(run, capsys, tmp_path):
    # best.pt holds the EMA whose plain val accuracy made it the best; the PNG goes to out/, never beside the checkpoint
    beside = set(os.listdir(os.path.dirname(run["ckpt"])))
    acc, out = run_eval([run["ckpt"], "--split", "val", "--tta", "none"], capsys)
    assert acc == pytest.approx(run["results"]["best_val_acc"], abs=1e-12)
    assert "val accuracy (none)" in out and "of 63" in out
    assert os.listdir(tmp_path / "out") == ["best_confusion_val.png"]
    assert set(os.listdir(os.path.dirname(run["ckpt"]))) == beside
    acc_none, _ = run_eval([run["ckpt"], "--tta", "none", "--out-dir", str(run["root"])], capsys)
    assert acc_none == pytest.approx(run["results"]["test_acc_none"], abs=1e-12)


def test_eval_creates_the_out_dir(run, capsys, tmp_path):
    out_dir = tmp_path / "new" / "deeper"
    acc, out = run_eval([run["ckpt"], "--tta", "none", "--out-dir", str(out_dir)], capsys)
    assert acc == pytest.approx(run["results"]["test_acc_none"], abs=1e-12)
    png = out_dir / "best_confusion_test.png"
    assert png.is_file() and f"picture: {png}" in out
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as e:
        evaluate.main([run["ckpt"], "--out-dir", str(a_file / "sub")])
    assert str(e.value.code) == f"eval.py: --out-dir {a_file / 'sub'}: cannot write there (Not a directory)"


def test_an_out_dir_that_cannot_be_written_is_refused_before_scoring(run, tmp_path, monkeypatch):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    monkeypatch.setattr(evaluate, "split_to_score", lambda *a: pytest.fail("scored before the out-dir was checked"))
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(SystemExit) as e:
            evaluate.main([run["ckpt"], "--out-dir", str(read_only)])
    finally:
        read_only.chmod(0o755)
    assert str(e.value.code) == f"eval.py: --out-dir {read_only}: cannot write there (Permission denied)"


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "0"], "eval.py: --batch-size: expected at least 1, got 0"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99x"],
     "eval.py: --device cuda:0: no CUDA GPU is usable here" if not torch.cuda.is_available() else
     "eval.py: --device: expected cpu, cuda or cuda:N, got 'cuda:99x'"),
])
def test_flags_that_cannot_work_end_in_one_line_before_anything_loads(run, argv, says, monkeypatch):
    monkeypatch.setattr(evaluate, "read_checkpoint", lambda *a: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        evaluate.main([run["ckpt"], *argv])
    assert str(e.value.code).startswith(says) and "\n" not in str(e.value.code)


def test_test_only_data_is_scored(run, capsys, tmp_path):
    """A file with only PrivateTest faces: nothing to hold out of train, and only the test split is scored."""
    x, y = run["splits"]["test"]
    npz = tmp_path / "test_only.npz"
    np.savez(npz, private_test_x=x.numpy(), private_test_y=y.numpy())
    acc, out = run_eval([run["ckpt"], "--data", str(npz), "--tta", "none", "--out-dir", str(tmp_path)], capsys)
    assert acc == pytest.approx(run["results"]["test_acc_none"], abs=1e-12) and f"of {len(y)}" in out


def test_pictures_that_cannot_be_written_end_in_one_line_and_leave_no_temporary_file(run, tmp_path, monkeypatch):
    folder = tmp_path / "a_folder"
    folder.mkdir()

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(Image.Image, "save", read_only)  # a read-only mount under --out-dir
    with pytest.raises(SystemExit) as e:
        evaluate.main([run["ckpt"], "--tta", "none", "--out-dir", str(folder)])
    png = folder / "best_confusion_test.png"
    assert str(e.value.code) == (f"eval.py: the confusion matrix picture: cannot write {png} "
                                 "(Read-only file system)")
    assert os.listdir(folder) == []


def with_args(run, tmp_path, **changes):
    """A copy of the run's checkpoint whose stored train.py arguments are changed."""
    ckpt = torch.load(run["ckpt"], weights_only=True)
    ckpt["args"] = {**ckpt["args"], **changes}
    path = tmp_path / "moved.pt"
    torch.save(ckpt, path)
    return str(path)


def test_eval_finds_the_training_data_by_absolute_or_relative_path(run, capsys, tmp_path, monkeypatch):
    # the data path as train.py got it, absolute or relative to where eval.py runs: both are read
    acc, _ = run_eval([with_args(run, tmp_path, data=str(run["root"] / "faces.npz")), "--tta", "none"], capsys)
    assert acc == pytest.approx(run["results"]["test_acc_none"], abs=1e-12)
    ckpt = with_args(run, tmp_path, data="faces.npz")
    monkeypatch.chdir(run["root"])
    acc, _ = run_eval([ckpt, "--tta", "none"], capsys)
    assert acc == pytest.approx(run["results"]["test_acc_none"], abs=1e-12)


@pytest.mark.parametrize("gone", ["ABS", "elsewhere/faces.npz"])
def test_eval_says_when_the_training_data_is_gone(run, capsys, tmp_path, gone):
    gone = str(tmp_path / "gone" / "faces.npz") if gone == "ABS" else gone
    ckpt = with_args(run, tmp_path, data=gone)
    with pytest.raises(SystemExit) as e:
        evaluate.main([ckpt])
    msg = str(e.value.code)
    assert msg.startswith(f"eval.py: {ckpt} was trained on {gone}, which is not there any more") and "\n" not in msg
    assert msg.endswith("give the data with --data PATH")
    assert (f"(from {os.getcwd()})" in msg) == (not os.path.isabs(gone))
    acc, _ = run_eval([ckpt, "--data", str(run["root"] / "faces.npz"), "--tta", "none"], capsys)  # --data still works
    assert acc == pytest.approx(run["results"]["test_acc_none"], abs=1e-12)


def test_eval_after_training_with_skip_bad_rows(tmp_path, capsys):
    """train.py --skip-bad-rows on a csv with a bad row, then eval.py on its checkpoint: it re-reads the csv the
    same way (skipping the row) and its ten-crop test accuracy is train.py's own."""
    d = synthetic.synthetic_faces(n_train=64, n_val=14, n_test=21, seed=5)
    rows = [f"{c},{' '.join(map(str, f.flatten().tolist()))},{usage}"
            for usage, split in (("Training", "train"), ("PublicTest", "val"), ("PrivateTest", "test"))
            for f, c in zip(d[split][0].numpy(), d[split][1].tolist())]
    rows.insert(30, "9,1 2 3,Training")  # a bad label and too few pixels: line 32 of the file
    csv_path = tmp_path / "fer2013.csv"
    csv_path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    results = train.main(["--data", str(csv_path), "--skip-bad-rows", "--model", "atto", "--img-size", "32",
                          "--batch-size", "32", "--max-iters", "2", "--warmup", "1", "--out-dir", str(tmp_path / "out"),
                          "--threads", "1"])
    torch.set_num_threads(1)
    assert "skipped 1 bad rows of 100" in capsys.readouterr().out
    ckpt = str(tmp_path / "out" / "best.pt")
    acc, out = run_eval([ckpt], capsys)
    assert "skipped 1 bad rows of 100" in out and "of 21" in out
    assert acc == pytest.approx(results["test_acc_tencrop"], abs=1e-12)
    # with --data the reading is the user's choice: strict unless --skip-bad-rows is given
    with pytest.raises(SystemExit, match=rf"eval.py: {csv_path}, line 32: label '9'"):
        evaluate.main([ckpt, "--data", str(csv_path)])
    acc2, _ = run_eval([ckpt, "--data", str(csv_path), "--skip-bad-rows"], capsys)
    assert acc2 == acc


def test_eval_uses_the_ema_weights(run):
    ckpt = torch.load(run["ckpt"], weights_only=True)
    model, args = evaluate.load_model(run["ckpt"], "cpu")
    assert not model.training and args["model"] == "atto" and args["img_size"] == 32
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())


def test_foreign_and_damaged_checkpoints_get_clear_errors(run, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"foo": 1}, foreign)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(foreign)])
    assert str(e.value.code).startswith("eval.py: ") and "not an EmoNeXt checkpoint" in str(e.value.code)

    plain = tmp_path / "state_dict.pt"  # weights without the config that says which model they are
    torch.save(EmoNeXt.from_size("atto", img_size=32, in_chans=1).state_dict(), plain)
    with pytest.raises(SystemExit, match="no 'config' entry"):
        evaluate.main([str(plain)])

    damaged = tmp_path / "damaged.pt"
    blob = open(run["ckpt"], "rb").read()
    damaged.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(damaged)])
    assert "damaged.pt: cannot be read as a weights-only torch checkpoint" in str(e.value.code)

    with pytest.raises(SystemExit, match="checkpoint not found: .*nothing.pt"):
        evaluate.main([str(tmp_path / "nothing.pt")])

    ckpt = torch.load(run["ckpt"], weights_only=True)
    del ckpt["config"]["img_size"]
    no_size = tmp_path / "no_size.pt"
    torch.save(ckpt, no_size)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(no_size)])
    assert str(e.value.code).startswith(f"eval.py: {no_size}: its config does not describe an EmoNeXt: missing "
                                        "'img_size'")

    pickled = tmp_path / "pickled.pt"  # arbitrary objects: refused by weights_only, never unpickled
    torch.save({"config": {"depths": [2, 2, 6, 2]}, "obj": io.StringIO}, pickled)
    with pytest.raises(SystemExit, match="pickled.pt: cannot be read"):
        evaluate.main([str(pickled)])


def test_confusion_matrix_and_report_by_hand():
    targets = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    preds = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    cm = evaluate.confusion_matrix(preds, targets, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    names = ("a", "bb", "c", "d")
    text = evaluate.report(cm, names)
    rows, cm_text = parse_report(text, names)
    assert torch.equal(cm_text, cm)
    # a: tp 2, predicted 3, true 3; bb: tp 2, predicted 3, true 2; c: tp 2, predicted 2, true 3; d: nothing
    assert rows["a"] == pytest.approx((0.667, 0.667, 0.667, 3), abs=1e-3)
    assert rows["bb"] == pytest.approx((0.667, 1.0, 0.8, 2), abs=1e-3)
    assert rows["c"] == pytest.approx((1.0, 0.667, 0.8, 3), abs=1e-3)
    assert rows["d"] == (0.0, 0.0, 0.0, 0)
    macro = re.search(r"^macro avg\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", text, re.M)
    assert [float(v) for v in macro.groups()[:3]] == pytest.approx(
        [(2 / 3 + 2 / 3 + 1) / 4, (2 / 3 + 1 + 2 / 3) / 4, (2 / 3 + 0.8 + 0.8) / 4], abs=1e-3)
    assert int(macro[4]) == 8
    assert text.splitlines()[0].split() == ["class", "precision", "recall", "f1", "support"]
    # every (true, predicted) pair lands in its own cell
    t, p = torch.arange(49) // 7, torch.arange(49) % 7
    assert torch.equal(evaluate.confusion_matrix(p, t, 7), torch.ones(7, 7, dtype=torch.long))


def test_a_model_far_under_chance_gets_a_hint_that_its_classes_or_faces_differ(run, capsys, tmp_path):
    """A model that always says "happy" scored on faces with no happy one: 0.00%, and one line saying why that may be
    (as a model trained on the synthetic faces scored on FER2013)."""
    ckpt = torch.load(run["ckpt"], weights_only=True)
    ckpt["ema"]["head.bias"] = torch.full_like(ckpt["ema"]["head.bias"], -1e4)
    ckpt["ema"]["head.bias"][3] = 1e4  # always class 3, happy
    ckpt["args"]["data"] = "synthetic"
    torch.save(ckpt, tmp_path / "happy.pt")
    x, y = run["splits"]["test"]
    npz = tmp_path / "no_happy.npz"
    np.savez(npz, private_test_x=x[y != 3].numpy(), private_test_y=y[y != 3].numpy())
    acc, out = run_eval([str(tmp_path / "happy.pt"), "--data", str(npz), "--tta", "none"], capsys)
    hints = [line for line in out.splitlines() if "far under chance" in line]
    names = ", ".join(FER2013_CLASS_NAMES)
    assert acc == 0 and hints == [f"eval.py: 0.00% is far under chance (14.3%): the classes ({names}) or the faces "
                                  f"this model learnt (on synthetic) are likely not those of FER2013 from {npz}"]
    _, out = run_eval([run["ckpt"], "--tta", "none"], capsys)  # a model that learnt its data: no hint
    assert "far under chance" not in out


def test_amp_is_bf16_autocast_close_to_fp32(run, capsys, tmp_path):
    model, _ = evaluate.load_model(run["ckpt"], "cpu")
    x, y = run["splits"]["test"]
    fp32, bf16 = (model.for_inference().predict_logits(x, amp=amp) for amp in (False, True))
    assert not torch.equal(fp32, bf16)  # bf16 did run
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.1)
    acc, out = run_eval([run["ckpt"], "--tta", "none", "--amp", "--out-dir", str(tmp_path)], capsys)
    assert acc == (bf16.argmax(-1) == y).double().mean().item()


# =============================================================================
# FER+ (issue 10; was tests/test_ferplus.py): a run with FER+ labels scored by eval.py (and predict.py) with its 8
# classes; the class names of old and bad checkpoints in eval.py and predict.py
# =============================================================================

import data  # noqa: E402
import predict  # noqa: E402
from conftest import ferplus_args, random_faces  # noqa: E402
from emonext import config_dict  # noqa: E402


@pytest.mark.slow
def test_ferplus_run_end_to_end_and_eval_shows_8_classes(faces_with_votes, capsys, tmp_path):
    out = faces_with_votes / "out-ferplus-soft"
    results = train.main(ferplus_args(faces_with_votes, "ferplus-soft", 16))
    torch.set_num_threads(1)
    log = capsys.readouterr().out
    assert "with FER+ labels (ferplus-soft)" in log
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["class_names"] == list(data.FERPLUS_CLASS_NAMES) and "class_names" not in ckpt
    assert ckpt["config"]["num_classes"] == 8
    assert ckpt["args"]["labels"] == "ferplus-soft"

    # eval.py: the test split with the checkpoint's data, labels and vote file, no flag; majority labels
    acc = evaluate.main([str(out / "best.pt"), "--tta", "none", "--out-dir", str(tmp_path)])
    report = capsys.readouterr().out
    assert acc == pytest.approx(results["test_acc_none"], abs=1e-12)
    _, test_majority = data.ferplus_targets(data.load_fer2013(faces_with_votes / "faces.npz",
                                                              ferplus=faces_with_votes / "fer2013new.csv")["test"][1],
                                            "majority")
    assert f"of {len(test_majority)}" in report
    for name in data.FERPLUS_CLASS_NAMES:
        assert any(line.split()[:1] == [name] for line in report.split("confusion matrix")[0].splitlines())
    assert report.split("confusion matrix")[1].splitlines()[1].split() == [n[:5] for n in data.FERPLUS_CLASS_NAMES]
    assert os.path.exists(tmp_path / "best_confusion_test.png")

    face = tmp_path / "face.png"
    Image.fromarray(data.load_fer2013(faces_with_votes / "faces.npz")["test"][0][0].numpy()).save(face)
    probs = predict.main([str(out / "best.pt"), str(face)])
    lines = capsys.readouterr().out.splitlines()
    assert probs.shape == (1, 8) and lines[0].split() == ["file", "frame", "box", "top", *data.FERPLUS_CLASS_NAMES]


def test_ferplus_points_eval_at_a_vote_file_elsewhere(faces_with_votes, capsys, tmp_path):
    """--ferplus PATH: the vote file of a FER+ model scored on --data whose folder has none beside it."""
    out = faces_with_votes / "out-ferplus-soft"
    if not (out / "best.pt").exists():
        train.main(ferplus_args(faces_with_votes, "ferplus-soft", 8))
        torch.set_num_threads(1)
    elsewhere = tmp_path / "faces"
    elsewhere.mkdir()
    os.symlink(faces_with_votes / "faces.npz", elsewhere / "faces.npz")  # no fer2013new.csv beside it
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(out / "best.pt"), "--data", str(elsewhere / "faces.npz"), "--tta", "none"])
    assert "fer2013new.csv" in str(e.value.code) and "\n" not in str(e.value.code)
    acc = evaluate.main([str(out / "best.pt"), "--data", str(elsewhere / "faces.npz"), "--tta", "none",
                         "--ferplus", str(faces_with_votes / "fer2013new.csv")])
    assert acc == evaluate.main([str(out / "best.pt"), "--tta", "none"])  # the votes it was trained with
    assert "with FER+ labels" in capsys.readouterr().out


def test_help_gives_every_flag_its_help_and_default(capsys):
    parser = evaluate.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
        if action.option_strings and action.nargs != 0:  # a flag with a value (not an on/off switch, not --help)
            assert "default" in parser._get_formatter()._expand_help(action), action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: out)" in text and "_confusion_<split>.png" in text and "(default: None)" not in text


def test_class_names_of_old_and_bad_checkpoints_in_predict_and_eval(tmp_path, capsys):
    model = EmoNeXt.from_size("atto", img_size=32, in_chans=1)
    config = {k: v for k, v in config_dict(model).items() if k != "class_names"}  # from before the config had them
    state = {"config": config, "ema": model.state_dict(), "args": {"model": "atto"}}
    face = tmp_path / "face.png"
    Image.fromarray(random_faces(1)[0]).save(face)
    torch.save(state, tmp_path / "old.pt")  # from before checkpoints stored class names: FER2013's 7
    probs = predict.main([str(tmp_path / "old.pt"), str(face)])
    assert probs.shape == (1, 7) and capsys.readouterr().out.split()[4:11] == list(FER2013_CLASS_NAMES)
    torch.save({**state, "class_names": list(data.FERPLUS_CLASS_NAMES)}, tmp_path / "bad.pt")
    for script in (predict, evaluate):
        with pytest.raises(SystemExit) as e:
            script.main([str(tmp_path / "bad.pt"), *([str(face)] if script is predict else [])])
        assert str(e.value.code).startswith(f"{script.__name__}.py: {tmp_path / 'bad.pt'}: 8 class names")
