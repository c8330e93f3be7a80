"""tools/campaign.py, the Python side of the GPU campaign (.ci/gpu): the parts a CPU can check.

`bash .ci/gpu --dry-run` (.ci/run) runs it end to end on synthetic faces; these tests cover what that run cannot
judge: the FER2013 stage's time plan, the device data's unpacking, and the summary's verdicts.
"""
import json
import lzma

import numpy as np
import pytest

from tools import campaign


# --- stage e ---

PROBE_LOG = """EmoNeXt-atto: 3.71M parameters
iter 20/60 | loss 2.0 | acc 12.5% | lr 1e-4 | 2000 img/s | eta 0m01s
iter 40/60 | loss 2.0 | acc 12.5% | lr 1e-4 | 6000 img/s | eta 0m01s
iter 60/60 | loss 2.0 | acc 12.5% | lr 1e-4 | 6400 img/s | eta 0m00s
epoch 0.27 | iter 60 | val acc (EMA) 20.00% | best 20.00% (saved) | eval 1.5s
"""


def test_plan_fits_epochs_into_the_budget():
    step = 128 / 6400  # the last interval's speed: warmed up
    fixed = 20.0 - 60 * step - 1.5
    epoch = 224 * step + 1.5
    epochs, basis = campaign.plan_epochs(PROBE_LOG, 20.0, 60, 128, 224, 200.0, 42)
    assert epochs == int((0.9 * 200 - fixed) // epoch) == 27
    assert basis == pytest.approx({"step ms": 20.0, "epoch s": epoch, "fixed s": fixed})
    assert campaign.plan_epochs(PROBE_LOG, 20.0, 60, 128, 224, 1e4, 42)[0] == 42  # never past the recipe
    assert campaign.plan_epochs(PROBE_LOG, 20.0, 60, 128, 224, 10.0, 42)[0] == 0


def test_plan_says_when_trains_log_changed():
    with pytest.raises(SystemExit, match="no images/s in train.py's output"):
        campaign.plan_epochs(PROBE_LOG.replace("img/s", "images per second"), 20.0, 60, 128, 224, 200.0, 42)


def test_unpack_decompresses_once_and_atomically(tmp_path):
    arrays = {"train_x": np.zeros((3, 48, 48), np.uint8), "train_y": np.arange(3)}
    xz = tmp_path / "faces.npz.xz"
    with lzma.open(xz, "wb") as f:
        np.savez(f, **arrays)
    npz = campaign.unpack(str(xz))
    assert npz == str(tmp_path / "faces.npz") and sorted(p.name for p in tmp_path.iterdir()) == [
        "faces.npz", "faces.npz.xz"]
    with np.load(npz) as d:
        assert np.array_equal(d["train_y"], arrays["train_y"])
    xz.unlink()
    assert campaign.unpack(str(xz)) == npz  # already there: not needed again


def test_unpack_names_the_missing_file_and_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match=r"fer2013-device.npz.xz is missing: copy ../shared/data/.*into data/"):
        campaign.unpack(str(tmp_path / "fer2013-device.npz.xz"))


# --- the summary ---


def write_stage(out, letter, name, rc, rows=(), log=""):
    with open(out / "status.tsv", "a") as f:
        f.write(f"{letter}\t{name}\t{rc}\t12\t90\n")
    (out / f"{letter}_{name}.log").write_text(log)
    with open(out / f"{letter}_{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


ENV = {"section": "env", "device": "NVIDIA H100 80GB HBM3", "copy GB/s": 2950.0, "matmul TFLOP/s": 701.0}
TRAIN = [{"section": "train", "model": "tiny@224", "batch": 128, "variant": v, "img/s": s}
         for v, s in (("official", 900.0), ("eager", 1100.0))]


def test_summary_of_a_good_campaign(tmp_path, capsys):
    write_stage(tmp_path, "a", "env", 0, [ENV])
    write_stage(tmp_path, "b", "tests", 0, log="...\n========== 27 passed, 1 skipped in 41.20s ==========\n")
    write_stage(tmp_path, "d", "train", 0, TRAIN)
    assert campaign.summary(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "| a env | ok | 12 (90) | NVIDIA H100 80GB HBM3: copy 2950 GB/s, matmul 701 TFLOP/s |" in out
    assert "| b tests | ok | 12 (90) | 27 passed, 1 skipped in 41.20s |" in out
    assert "official 900, eager 1100 img/s (tiny@224, batch 128)" in out


@pytest.mark.parametrize("rc,rows,verdict", [(124, [ENV], "timed out, 1 rows kept"), (1, [], "failed (exit 1)"),
                                             ("skipped", [], "skipped: budget spent"), (0, [], "no results")])
def test_summary_fails_a_stage_that_did_not_deliver(tmp_path, capsys, rc, rows, verdict):
    write_stage(tmp_path, "a", "env", 0, [ENV])
    write_stage(tmp_path, "c", "kernels", rc, rows)
    assert campaign.summary(str(tmp_path)) == 1
    assert f"| c kernels | {verdict} |" in capsys.readouterr().out


def test_tables_print_each_sections_rows(tmp_path, capsys):
    write_stage(tmp_path, "a", "env", 0, [ENV])
    write_stage(tmp_path, "d", "train", 0, TRAIN)
    campaign.tables(str(tmp_path))
    out = capsys.readouterr().out
    assert "### a_env.jsonl: env\n\n| device | copy GB/s | matmul TFLOP/s |\n|---|---|---|\n" \
           "| NVIDIA H100 80GB HBM3 | 2950 | 701 |" in out
    assert "| tiny@224 | 128 | eager | 1100 |" in out


def test_summary_without_any_stage(tmp_path, capsys):
    assert campaign.summary(str(tmp_path)) == 1
    assert "no stage ran" in capsys.readouterr().out
