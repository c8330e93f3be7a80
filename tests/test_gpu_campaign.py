"""kernels/bench.py and kernels/campaign.py, the pieces of the GPU campaign (.ci/gpu) a CPU can check.

The campaign itself runs end to end in CI as `bash .ci/gpu --dry-run` (.ci/run); these tests cover what that run
cannot judge: that the official-layout model is the official model with this project's weights, the performance
model's arithmetic, the FER2013 stage's time plan, and the summary's verdicts.
"""
import json
import lzma

import numpy as np
import pytest
import torch

import bench
from tools import campaign


def test_official_layout_model_has_the_projects_weights_and_logits():
    torch.manual_seed(0)
    official, project = bench.model_pair("atto", 32, drop_path_rate=0.0)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 6, 2])
    for mode in ("eval", "train"):  # train: BatchNorm on batch statistics in both
        getattr(official, mode)(), getattr(project, mode)()
        logits, loss = official(x.repeat(1, 3, 1, 1), y)
        logits_p, loss_p = project(x, y)
        torch.testing.assert_close(logits, logits_p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    assert official.state_dict().keys() == project.state_dict().keys()


def test_stage_shapes():
    assert bench.stage_shapes("tiny", 224) == [(96, 56), (192, 28), (384, 14), (768, 7)]
    assert bench.stage_shapes("atto", 64) == [(40, 16), (80, 8), (160, 4), (320, 2)]


def test_floors_at_h100_rates():
    rows = {(r["kernel"], r["model"], r["shape"], r["dtype"], r["pass"]): r for r in bench.floors_table(128)}
    fwd = rows["dwconv", "tiny@224", "128x96x56x56", "bfloat16", "fwd"]
    e = 128 * 96 * 56 * 56
    assert fwd["MB moved"] == pytest.approx(2 * 2 * e / 1e6)  # read x, write y
    assert fwd["memory us"] == pytest.approx(4 * e / 3.0e12 * 1e6)
    assert fwd["FMA us"] == pytest.approx(53 * e / (132 * 128 * 1.98e9) * 1e6)
    assert fwd["floor us"] == pytest.approx(fwd["FMA us"]) and fwd["bound"] == "FMA"  # 49 taps per 4 bytes
    fb = rows["dwconv", "tiny@224", "128x96x56x56", "float32", "f+b"]
    assert fb["MB moved"] == pytest.approx(5 * 4 * e / 1e6) and fb["GFMA"] == pytest.approx(157 * e / 1e9)
    warp = rows["sampler", "C=1", "128x1x224x224", "float32", "f+b"]
    assert warp["bound"] == "memory" and warp["floor us"] == pytest.approx(4 * 4 * 128 * 224 ** 2 / 3.0e12 * 1e6)


def test_kernel_rows_read_times_against_the_floor():
    rates = {"copy GB/s": 1000.0, "FMA/s": 1e12}
    times = {"eager": {"fwd": 4.0, "f+b": 9.0, "peak": None}, "compile": {"fwd": 2.0, "f+b": 6.0, "peak": None},
             "fused": {"fwd": 1.0, "f+b": 3.0, "peak": None}}
    fwd, fb = bench.kernel_rows("1x1", torch.float32, times, {"fwd": (1e6, 1e9), "f+b": (4e6, 1e6)}, rates)
    assert fwd["floor ms"] == pytest.approx(1.0) and fwd["fused % of floor"] == pytest.approx(100)  # FMA-bound
    assert fb["floor ms"] == pytest.approx(4e6 / 1e12 * 1e3) and fb["fused GB/s"] == pytest.approx(4e6 / 3e6)
    assert (fb["fused vs eager"], fb["fused vs compile"]) == (3.0, 2.0) and fb["% of copy"] == pytest.approx(
        100 * 4e6 / 3e6 / 1000)


def test_table_streams_markdown_and_json_lines(tmp_path, capsys):
    table = bench.Table("dwconv", str(tmp_path / "rows.jsonl"))
    table.add({"shape": "a", "ms": 1.23456})
    table.add({"shape": "b", "ms": 2.0})
    assert capsys.readouterr().out.splitlines() == ["| shape | ms |", "|---|---|", "| a | 1.23 |", "| b | 2 |"]
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [
        {"section": "dwconv", "shape": "a", "ms": 1.23456}, {"section": "dwconv", "shape": "b", "ms": 2.0}]


@pytest.mark.parametrize("argv", [["--only", "train", "--variants", "official,fast"], ["--sizes", "huge"],
                                  ["--only", "everything"]])
def test_bench_rejects_unknown_names(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_dry_run_runs_every_variant_at_tiny_shapes():
    args = bench.parse_args(["--dry-run", "--only", "train"])
    assert args.variants == list(bench.VARIANTS) and args.compile_backend == "aot_eager"
    assert (args.sizes, args.img_sizes, args.batch, args.steps) == (["atto"], [32], 2, 2)


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
