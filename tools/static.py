"""Registers, spills, shared memory and occupancy of the hand-written kernels on an H100 (sm_90), with no GPU.

    python -m tools.static                                     # BENCHMARKS.md's table; exit 1 if a launch spills
    python -m tools.static --shapes tiny@224 --dtypes bfloat16 --no-sampler

Triton (dwconv+LayerNorm): the real launchers run on meta tensors with each kernel's launch recorded instead of run,
so the configs are exactly those the dispatcher picks on CUDA (no copy of its tile policy). Each recorded launch is
specialised as Triton's launcher does it (argument types, 16-byte pointer alignment) and compiled for
GPUTarget("cuda", 90, 32) with Triton's bundled ptxas. This uses Triton internals (its argument binder): the price
of compiling exactly what would launch. CUDA (STN sampler): `nvcc -arch=sm_90` on kernels/csrc/affine_sampler.cu
with torch's extension flags, every dtype the binding dispatches to; skipped where nvcc is not installed.

Both binaries are read by Triton's bundled cuobjdump: registers, stack + local memory per thread (where ptxas puts
spills: any byte fails the check), static shared memory (it includes the 1 KB the runtime reserves per block that
uses shared memory), plus Triton's dynamic shared memory. Occupancy = resident warps per SM / 64 under H100 (sm_90)
limits: 65,536 registers per SM allocated per warp in units of 256, 2,048 threads, 228 KB shared memory and 32 blocks.
Run without TRITON_INTERPRET=1: the interpreter replaces the kernels the compiler needs.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

from bench import Table, stage_shapes
from kernels import dwconv_ln, sampler

REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_BLOCKS, SMEM_PER_SM = 65536, 256, 64, 32, 228 * 1024
BATCH = 128  # only the grid depends on it


def occupancy(regs: int, smem: int, threads: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) of a kernel using regs per thread and smem bytes per block."""
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(MAX_BLOCKS, MAX_WARPS // warps, (REGS_PER_SM // regs_per_warp) // warps,
                 SMEM_PER_SM // smem if smem else MAX_BLOCKS)
    return blocks, blocks * warps / MAX_WARPS


def cuobjdump(path: str) -> dict[str, dict]:
    """{function: {"regs", "stack", "shared", "local"}} of a cubin or object file, read by Triton's cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"tools.static: no resource lines in cuobjdump's output for {path}:\n{out}")
    return {name: dict(zip(("regs", "stack", "shared", "local"), map(int, rest))) for name, *rest in found}


def usage_row(use: dict, dynamic_smem: int, threads: int) -> dict:
    """Registers, spills (stack + local bytes per thread), shared memory per block and occupancy of one kernel."""
    smem = use["shared"] + dynamic_smem
    blocks, occ = occupancy(use["regs"], smem, threads)
    return {"threads": threads, "regs": use["regs"], "spill B": use["stack"] + use["local"], "smem B": smem,
            "blocks/SM": blocks, "occupancy": f"{100 * occ:.0f}%"}


# --- Triton: record the launchers' launches, compile each for sm_90 ---


def record_launches(C: int, H: int, W: int, dtype: torch.dtype) -> list:
    """(kernel, args, kwargs, grid) of every launch of one forward and one backward of an (BATCH, C, H, W) input."""
    launches = []
    for k in dwconv_ln.KERNELS:  # JITFunction[grid](...) calls self.run(grid=..., warmup=False, ...)
        k.run = lambda *args, grid, warmup, _k=k, **kwargs: launches.append((_k, args, kwargs, grid))
    try:
        meta = dict(device="meta", dtype=dtype)
        x = torch.empty(BATCH, C, H, W, **meta).contiguous(memory_format=torch.channels_last)
        w, b, lnw, lnb = torch.empty(C, 1, 7, 7, **meta), *(torch.empty(C, **meta) for _ in range(3))
        y, mean, rstd = dwconv_ln.triton_forward(x, w, b, lnw, lnb, 1e-6)
        dwconv_ln.triton_backward(torch.empty_like(y), x, w, b, lnw, mean, rstd)
    finally:
        for k in dwconv_ln.KERNELS:
            del k.run
    return launches


def compile_sm90(kernel, args, kwargs):
    """The kernel compiled for sm_90 as Triton's launcher would specialise it for these arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def triton_rows(shapes, stages, dtypes, table) -> None:
    """A row per recorded launch at the stage shapes (indices `stages`) of every model in `shapes`, every dtype."""
    for name, img in shapes:
        for C, HW in [stage_shapes(name, img)[i] for i in stages]:
            for dtype in dtypes:
                for kernel, args, kwargs, grid in record_launches(C, HW, HW, dtype):
                    compiled = compile_sm90(kernel, args, kwargs)
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        (use,) = cuobjdump(f.name).values()
                    table.add({"model": f"{name}@{img}", "C x H x W": f"{C}x{HW}x{HW}", "dtype": str(dtype)[6:],
                               "kernel": kernel.__name__.strip("_"),
                               "tile h x w x c": f"{kwargs['BLOCK_H']}x{kwargs['BLOCK_W']}x{kwargs['BLOCK_C']}",
                               "grid": "x".join(map(str, grid)),
                               **usage_row(use, compiled.metadata.shared, 32 * kwargs["num_warps"])})


# --- CUDA: the sampler's .cu through nvcc ---

_KERNEL = re.compile(r"(forward|backward|theta_grad)_kernelI(13__nv_bfloat16|6__half|f|d)")
_TYPES = {"13__nv_bfloat16": "bfloat16", "6__half": "float16", "f": "float32", "d": "float64"}


def sampler_rows(table) -> bool:
    """A row per kernel instantiation of the .cu for sm_90; False where nvcc is not installed."""
    if shutil.which("nvcc") is None:
        return False
    with open(os.path.join(sampler.CSRC, "affine_sampler.h")) as f:
        threads = int(re.search(r"constexpr int kThreads = (\d+);", f.read())[1])  # every launch's block size
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "sampler.o")
        cu = os.path.join(sampler.CSRC, "affine_sampler.cu")
        subprocess.run(["nvcc", *sampler.NVCC_FLAGS, "-arch=sm_90", "-c", cu, "-o", obj],
                       capture_output=True, text=True, check=True)
        usage = cuobjdump(obj)
    found = {(kernel, _TYPES[code]): use for kernel, code, use in
             ((*_KERNEL.search(name).groups(), use) for name, use in usage.items())}
    for (kernel, dtype), use in sorted(found.items(), key=lambda item: item[0]):
        table.add({"kernel": kernel, "dtype": dtype, **usage_row(use, 0, threads)})
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny@224,atto@64,atto@224",
                        help="models whose stage shapes to compile, SIZE@IMG_SIZE, comma-separated")
    parser.add_argument("--stages", default="0,1,2,3", help="which of the four stages, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--no-sampler", action="store_true", help="skip the nvcc part")
    parser.add_argument("--jsonl", default=None, help="also append the rows to this file, as JSON lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tools.static: unset TRITON_INTERPRET: the interpreter replaces the kernels to compile")
    shapes = [(s.split("@")[0], int(s.split("@")[1])) for s in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"## dwconv+LayerNorm (Triton), sm_90, batch {BATCH}\n", flush=True)
    tables = [Table("triton", args.jsonl)]
    triton_rows(shapes, [int(i) for i in args.stages.split(",")], dtypes, tables[0])
    if not args.no_sampler:
        print("\n## STN sampler (CUDA), sm_90\n", flush=True)
        tables.append(Table("cuda", args.jsonl))
        if not sampler_rows(tables[1]):
            print("nvcc is not installed: the .cu was not compiled")
    spilled = [r for t in tables for r in t.rows if r["spill B"]]
    if spilled:
        sys.exit(f"tools.static: {len(spilled)} launched configs spill: "
                 + "; ".join(f"{r['kernel']} {r.get('C x H x W', '')} {r['dtype']}" for r in spilled))


if __name__ == "__main__":
    main()
