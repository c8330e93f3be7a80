"""The hand-written kernels against eager PyTorch and torch.compile of the same PyTorch reference.

    python -m kernels.bench                 # every section, full shapes
    python -m kernels.bench --only dwconv --quick

Each section is a function `bench_<name>(args) -> rows` (one dict per case); `main` prints one markdown table
per section. Times are medians of triton.testing.do_bench (CUDA) or of a wall-clock loop (CPU). GB/s counts
the minimum bytes an op must move (stated per section) over the measured time; % is of the device's peak
memory bandwidth (--peak-gbs, by default the datasheet value for known GPUs, else a measured device copy).
Without a GPU it says so and times what the CPU can: eager against torch.compile at a small batch.
"""
import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):  # `python kernels/bench.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import dwconv_ln, sampler  # noqa: E402

DATASHEET_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}  # SXM parts; a PCIe H100 is ~2000: pass --peak-gbs


def bench_ms(fn, quick: bool) -> float:
    """Median milliseconds of fn()."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                       return_mode="median")
    fn()
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def peak_gbs(args) -> float:
    """The device's memory bandwidth in GB/s: --peak-gbs, the datasheet value, or a measured 1 GiB copy."""
    if args.peak_gbs:
        return args.peak_gbs
    name = torch.cuda.get_device_name()
    for key, gbs in DATASHEET_GBS.items():
        if key in name:
            return gbs
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src), args.quick) / 1e6


def peak_mb(fn) -> float:
    """Peak CUDA memory fn() allocates beyond what was allocated before it, in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def time_impls(impls, args_list, dy, leaves, row, quick):
    """Adds "fwd NAME ms", "f+b NAME ms" (and on CUDA "f+b peak MB NAME") to row for each implementation."""
    for name, fn in impls.items():
        fwd = lambda: fn(*args_list)  # noqa: E731 (inputs require grad: the forward that training runs)
        step = lambda: fn(*args_list).backward(dy)  # noqa: E731
        step()  # compiles, builds extensions, warms up allocations
        row[f"fwd {name} ms"] = bench_ms(fwd, quick)
        row[f"f+b {name} ms"] = bench_ms(step, quick)
        if torch.cuda.is_available():
            row[f"f+b peak MB {name}"] = peak_mb(step)
        for t in leaves:
            t.grad = None


def add_ratios(row, best, bases, nbytes, bw):
    """Speed-ups of `best` over each base, and on CUDA its GB/s and % of bandwidth bw; nbytes: {mode: bytes}."""
    for mode in ("fwd", "f+b"):
        for base in bases:
            row[f"{mode} {best}/{base}"] = row[f"{mode} {base} ms"] / row[f"{mode} {best} ms"]
        if bw is not None:
            gbs = nbytes[mode] / row[f"{mode} {best} ms"] / 1e6
            row[f"{mode} {best} GB/s"] = gbs
            row[f"{mode} % of {bw:.0f} GB/s"] = 100 * gbs / bw


# --- dwconv+layernorm ---
# ConvNeXt-T stages at 224x224: (C, H = W). Bytes counted: forward reads x and writes y; forward+backward
# also reads x and dy and writes dx in the backward (5 activation-sized tensors); parameters are negligible.

DWCONV_STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]


def dwconv_case(N, C, HW, dtype, device):
    """Channels-last x, block parameters in x's dtype (all requiring grad) and dy, as in a bf16/fp32 model."""
    x = torch.randn(N, C, HW, HW, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(C, 1, 7, 7, device=device, dtype=dtype) * 0.1] + \
             [torch.randn(C, device=device, dtype=dtype) for _ in range(3)]
    leaves = [t.requires_grad_() for t in (x, *params)]
    return leaves, torch.randn(N, HW, HW, C, device=device, dtype=dtype)


def bench_dwconv(args):
    """Eager reference, torch.compile(reference) and the fused op (Triton on CUDA): forward, forward+backward."""
    cuda = torch.cuda.is_available()
    impls = {"eager": dwconv_ln.dwconv_layernorm_reference,
             "compile": torch.compile(dwconv_ln.dwconv_layernorm_reference, dynamic=False)}
    if cuda:
        impls["kernel"] = dwconv_ln.dwconv_layernorm
    N = args.batch if cuda else 2
    dtypes = [torch.float32] if not cuda else [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    stages = DWCONV_STAGES[:1] if not cuda and args.quick else DWCONV_STAGES
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(stages) * len(dtypes))
    bw = peak_gbs(args) if cuda else None
    rows = []
    for dtype in dtypes:
        for C, HW in stages:
            leaves, dy = dwconv_case(N, C, HW, dtype, "cuda" if cuda else "cpu")
            row = {"shape": f"{N}x{C}x{HW}x{HW}", "dtype": str(dtype).replace("torch.", "")}
            time_impls(impls, leaves, dy, leaves, row, args.quick)
            size = dy.numel() * dy.element_size()
            add_ratios(row, "kernel" if cuda else "compile", ("eager", "compile") if cuda else ("eager",),
                       {"fwd": 2 * size, "f+b": 5 * size}, bw)
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


# --- sampler ---
# The STN warp at 224x224, x not requiring grad (EmoNeXt warps the input image): backward is d/d theta only.
# Bytes counted: forward reads x and writes y; forward+backward also reads x and dy in the backward (4 image-sized
# tensors); theta is negligible. The reference also writes and reads an (N, H, W, 2) grid, which is not counted.


def bench_sampler(args):
    """Eager and torch.compile of affine_grid + grid_sample, and the fused op: forward, forward+backward."""
    cuda = torch.cuda.is_available()
    impls = {"eager": sampler.affine_sample_reference,
             "compile": torch.compile(sampler.affine_sample_reference, dynamic=False)}
    if sampler.cuda_available() if cuda else sampler.load_extension():
        impls["kernel"] = sampler.affine_sample  # on the CPU: the extension's C++ loop
    device = "cuda" if cuda else "cpu"
    N = args.batch if cuda else 2
    dtypes = [torch.float32] if args.quick or not cuda else [torch.float32, torch.bfloat16]  # fp32: EmoNeXt's input
    channels = [1] if args.quick and not cuda else [1, 3]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(channels) * len(dtypes))
    bw = peak_gbs(args) if cuda else None
    gen = torch.Generator().manual_seed(0)
    theta = torch.eye(2, 3) + 0.1 * torch.randn(N, 2, 3, generator=gen)
    rows = []
    for dtype in dtypes:
        for C in channels:
            x = torch.randn(N, C, 224, 224, generator=gen).to(device, dtype)
            dy = torch.randn(N, C, 224, 224, generator=gen).to(device, dtype)
            th = theta.to(device, dtype).requires_grad_()  # x's dtype: grid_sample takes one dtype
            row = {"shape": f"{N}x{C}x224x224", "dtype": str(dtype).replace("torch.", "")}
            time_impls(impls, (x, th), dy, (th,), row, args.quick)
            if "kernel" in impls:
                size = x.numel() * x.element_size()
                add_ratios(row, "kernel", ("eager", "compile"), {"fwd": 2 * size, "f+b": 4 * size}, bw)
            rows.append(row)
    return rows


# --- main ---

SECTIONS = {"dwconv": bench_dwconv, "sampler": bench_sampler}


def markdown(rows) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="bf16 only, shorter timing (CPU: one small shape)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, GB/s")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {peak_gbs(args):.0f} GB/s")
    else:
        print(f"no CUDA device: timing eager against torch.compile on the CPU only (torch {torch.__version__})")
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        rows = SECTIONS[name](args)
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n\n{markdown(rows)}", flush=True)


if __name__ == "__main__":
    main()
