"""run_record.py: what a training run keeps in its --out-dir: metrics.csv and curves.png of its rows, stn.png,
results.json, and the lock that keeps a second train.py out (train.py's own runs check these files end to end in
tests/test_train.py)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import run_record
import synthetic
from emonext import EmoNeXt


def test_save_stn_picture(tmp_path):
    torch.manual_seed(0)
    model = EmoNeXt.from_size("atto", img_size=48, in_chans=1)  # identity STN at init
    x = synthetic.synthetic_faces(n_train=5, n_val=0, n_test=0, seed=3)["train"][0]
    path = str(tmp_path / "stn.png")
    run_record.save_stn_picture(model, x, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (4 * (2 * 48 + 8), 2 * (48 + 4))
        pixels = np.asarray(im).astype(int)
    for i in range(5):
        r, c = divmod(i, 4)
        top, left = r * 52, c * 104
        face = x[i].numpy().astype(int)
        assert np.abs(pixels[top:top + 48, left:left + 48] - face).max() <= 1  # the input as it went in
        assert np.abs(pixels[top:top + 48, left + 48:left + 96] - face).max() <= 1  # identity warp: the same
    assert (pixels[52:, 104:] == 255).all()  # the empty slots stay white
    # a shifted warp moves the picture
    with torch.no_grad():
        model.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 0.5, 0, 1, 0]))
    run_record.save_stn_picture(model, x[:1], path)
    with Image.open(path) as im:
        pixels = np.asarray(im).astype(int)
    assert np.abs(pixels[:48, 48:96] - x[0].numpy()).max() > 20


def test_the_record_writes_the_rows_their_curves_and_the_stn_picture(tmp_path):
    rows = [{"iteration": 4 * i, "epoch": i / 2, "lr": 1e-3 / i, "train_loss": 2.0 / i, "train_acc": 0.2 * i,
             "val_acc": 0.15 * i, "images_per_s": 100.0, "elapsed_s": 1.5 * i} for i in (1, 2, 3)]
    torch.manual_seed(0)
    model = EmoNeXt.from_size("atto", img_size=32, in_chans=1)
    faces = synthetic.synthetic_faces(n_train=3, n_val=0, n_test=0, seed=0)["train"][0]
    out = tmp_path / "new" / "out"  # made as needed
    run_record.write(str(out), rows, model, faces)
    with open(out / "metrics.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(run_record.METRICS)
    assert [{k: float(v) for k, v in r.items()} for r in read] == rows
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size == (960, 240)
    with Image.open(out / "stn.png") as im:
        assert im.size == (4 * (2 * 32 + 8), 32 + 4)  # 3 pairs in one row of 4
    run_record.write_results(str(out), {"best_val_acc": 0.5, "test_acc_none": 0.25})
    assert json.load(open(out / "results.json")) == {"best_val_acc": 0.5, "test_acc_none": 0.25}
    assert sorted(os.listdir(out)) == ["curves.png", "metrics.csv", "results.json", "stn.png"]  # no .tmp left


def test_a_write_that_fails_raises_oserror_naming_the_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"cannot write .*file/results.json"):
        run_record.write_results(str(tmp_path / "file"), {})


def test_the_lock_refuses_a_second_holder_naming_the_first_and_frees_on_exit(tmp_path):
    out = str(tmp_path / "out")
    with run_record.out_dir_lock(out):
        holder = open(os.path.join(out, "train.lock")).read()
        assert holder.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(SystemExit) as e, run_record.out_dir_lock(out):  # flock: per open file, same process too
            pass
        assert str(e.value.code) == (f"train.py: --out-dir {out} is in use by another train.py ({holder.strip()}); "
                                     f"let it finish or choose another --out-dir")
    with run_record.out_dir_lock(out):  # free again
        pass
    with pytest.raises(SystemExit, match=r"^train.py: --out-dir .*/train.lock/x: cannot write there"):
        with run_record.out_dir_lock(os.path.join(out, "train.lock", "x")):
            pass


def test_other_processes_than_rank_0_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_record.out_dir_lock(str(tmp_path / "out")):
        assert not os.path.exists(tmp_path / "out")
