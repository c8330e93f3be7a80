"""tools/static.py: the kernels compiled for an H100 (sm_90) with no GPU: no launched config may spill.

The Triton part runs in a subprocess without TRITON_INTERPRET (conftest sets it here, and the interpreter replaces
the kernels the compiler needs). Each compile takes seconds, so the test compiles a sample of the configs and
`python -m tools.static` the whole table (BENCHMARKS.md).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from kernels import dwconv_ln
from tools import static

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLER_KERNELS = {(k, d) for k in ("forward", "backward") for d in ("float32", "float64", "float16", "bfloat16")} \
    | {("theta_grad", "float32"), ("theta_grad", "float64")}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tools.static at ConvNeXt-T's first and last stage in float32 (the two ends of the tile policy: 2-D tiles of
    4 x 8 pixels, one row of 4 pixels x 1024 channels; float32: where 16 values per thread spilled most) and the
    sampler's .cu: (the process, its rows)."""
    jsonl = tmp_path_factory.mktemp("static") / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tools.static", "--shapes", "tiny@224", "--stages", "0,3",
                           "--dtypes", "float32", "--jsonl", str(jsonl)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    return done, rows


@pytest.mark.slow  # compiles for sm_90: minutes to a quarter of an hour on 2 cores
def test_no_launched_config_spills(compiled):
    done, rows = compiled
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    triton = [r for r in rows if r["section"] == "triton"]
    assert [r["kernel"] for r in triton] == ["fwd_kernel", "bwd_ln_kernel", "dx_kernel", "dw_kernel"] * 2
    assert all(r["spill B"] == 0 and 0 < r["regs"] <= 255 for r in rows)
    cuda = {(r["kernel"], r["dtype"]) for r in rows if r["section"] == "cuda"}
    assert cuda == (SAMPLER_KERNELS if shutil.which("nvcc") else set())


@pytest.mark.slow
def test_the_compiled_launches_are_the_dispatchers(compiled, monkeypatch):
    monkeypatch.setattr(dwconv_ln, "_FULL_ROW_TILES", False)  # CUDA's policy, as the subprocess had it
    cdiv = dwconv_ln.triton.cdiv
    for r in (r for r in compiled[1] if r["section"] == "triton"):
        C, H, W = map(int, r["C x H x W"].split("x"))
        block_c = {"dx_kernel": 128, "dw_kernel": 32}.get(r["kernel"], 4096)  # at most; all C for the LayerNorm
        block_c = min(block_c, dwconv_ln.triton.next_power_of_2(C))
        bh, bw, warps = dwconv_ln._tile(H, W, block_c)
        assert (r["tile h x w x c"], r["threads"]) == (f"{bh}x{bw}x{block_c}", 32 * warps), r
        first = cdiv(H, bh) if r["kernel"] == "dw_kernel" else cdiv(H, bh) * cdiv(W, bw)  # bands, or tiles
        blocks = f"x{cdiv(C, block_c)}" if r["kernel"] in ("dx_kernel", "dw_kernel") else ""  # channel blocks
        assert r["grid"] == f"{first}x{static.BATCH}{blocks}", r


def test_a_spill_fails_the_check(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spilled = {"kernel": "fwd_kernel", "C x H x W": "96x56x56", "dtype": "float32",
               **static.usage_row({"regs": 80, "stack": 16, "shared": 1024, "local": 0}, 128, 256)}
    monkeypatch.setattr(static, "triton_rows", lambda shapes, stages, dtypes, table: table.add(spilled))
    with pytest.raises(SystemExit, match="1 launched configs spill: fwd_kernel 96x56x56 float32"):
        static.main(["--no-sampler"])


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        static.main([])


@pytest.mark.parametrize("regs,smem,threads,blocks,occupancy", [
    (64, 1216, 256, 4, 0.5),  # registers: 64 x 32 = 2048 per warp, 32 warps of 64
    (80, 1152, 256, 3, 0.375),  # 80 -> 2560 per warp: 25 warps, 3 blocks of 8
    (255, 0, 128, 2, 0.125),  # 255 rounds up to 256 per thread: 8 warps
    (16, 0, 32, 32, 0.5),  # the 32-blocks limit
    (32, 100 * 1024, 128, 2, 0.125),  # shared memory: 228 KB / 100 KB
    (32, 0, 1024, 2, 1.0),  # the 64-warps limit
])
def test_occupancy_arithmetic(regs, smem, threads, blocks, occupancy):
    assert static.occupancy(regs, smem, threads) == (blocks, occupancy)
