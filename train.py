"""
Trains EmoNeXt on FER2013 (FER2013's or FER+'s labels) or on the built-in synthetic faces, on one device or,
under torchrun, on several (DistributedDataParallel: one process per GPU, or per CPU share with gloo). Read it
top to bottom.

    python train.py                                      # data/fer2013.{csv,npz} if present, else synthetic faces
    python train.py --data ../shared/data/fer2013.npz --amp --warmup 300  # FER2013 from scratch on a CPU (README)
    python train.py --data data/fer2013.csv --model tiny --img-size 224 --in-chans 3 --amp --compile --drop-path 0.1 \\
        --pretrained https://dl.fbaipublicfiles.com/convnext/convnext_tiny_22k_224.pth --lr 1e-4
    python train.py --data ../shared/data/fer2013.npz --labels ferplus-soft   # FER+ votes (fer2013new.csv beside)
    python train.py --resume --out-dir out               # continue the run saved in out/ckpt.pt
    python train.py --resume --out-dir out --epochs 60   # ... and make it longer (see --epochs)
    torchrun --standalone --nproc_per_node=8 train.py --model large --img-size 224 --batch-size 256 ...  # 8 GPUs

A run trains for a length fixed in advance (--epochs or --max-iters) with AdamW, a linear warmup and one cosine
decay of the lr, and keeps an EMA of the weights. Each evaluation scores the EMA weights on the validation split
(PublicTest; when the data has none, a stratified --val-fraction of train held out with --seed), writes
OUT_DIR/ckpt.pt, and OUT_DIR/best.pt when they are the best so far; at the end best.pt is tested on the test
split (PrivateTest) with ten-crop and plain inputs. --resume continues from ckpt.pt with the same batches.

The defaults (EmoNeXt-atto from scratch at 64 px on a CPU), why they were chosen and where the official code
(yelboudouri/EmoNeXt) differs: README.md, "The defaults and the official code"; FER+ labels and torchrun: its
"FER+ labels" and "Many GPUs, many machines".
"""
import argparse
import contextlib
import copy
import csv
import fcntl
import json
import math
import os
import pickle
import socket
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # collectives with autograd that torch.compile traces
from PIL import Image, ImageDraw
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import data
import emonext
from emonext import SIZES, BatchSelfAttention, EmoNeXt, config_dict, load_weights, read_checkpoint, save_checkpoint


# -----------------------------------------------------------------------------
# the command line: the flags, what each accepts

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows this file's docstring as it is written, then each flag with its default."""


def add_augmentation_flags(p):
    """The pose augmentation and timm's regularisers (build_parser's, apart for length)."""
    p.add_argument("--rotate", type=float, default=10.0, help="augmentation: rotation up to this many degrees")
    p.add_argument("--zoom", type=float, default=0.1, help="augmentation: zoom by a factor in [1 - zoom, 1 + zoom]")
    p.add_argument("--shift", type=float, default=0.05, help="augmentation: shift up to this fraction of the side")
    p.add_argument("--vflip", action="store_true", help="also flip faces vertically in augmentation")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup: mix each batch with itself reversed, by a weight drawn from Beta(A, A) (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="cutmix: paste a box of the reversed batch, its area 1 - Beta(A, A) (0: off)")
    p.add_argument("--mix-prob", type=float, default=1.0, help="the probability that a batch is mixed at all")
    p.add_argument("--switch-prob", type=float, default=0.5,
                   help="with --mixup and --cutmix: the probability that a mixed batch is cut-mixed")
    p.add_argument("--random-erase", type=float, default=0.0,
                   help="the probability that a face gets a box (2-33%% of it) of noise (timm's RandomErasing)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None,
                   help="FER2013 csv / npz / image folder, or 'synthetic' (default: data/fer2013.csv or .npz "
                        "under the repo if present, else the synthetic faces)")
    p.add_argument("--labels", default="fer2013", choices=data.LABELS,
                   help="FER2013's 7 classes, or FER+'s 8 as majority labels, vote distributions (soft) or labels "
                        "drawn from them (draw); val and test always use FER+'s majority labels")
    p.add_argument("--ferplus", default=None, help="FER+'s fer2013new.csv (default: beside --data)")
    p.add_argument("--model", default="atto", choices=list(SIZES), help="ConvNeXt size")
    p.add_argument("--img-size", type=int, default=64, help="faces are resized from 48 to this side")
    p.add_argument("--in-chans", type=int, default=1, choices=(1, 3), help="3 to use RGB ImageNet weights as they are")
    p.add_argument("--batch-size", type=int, default=128, help="global batch: split evenly over torchrun's processes")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 32 on FER2013, 3 on synthetic faces. With --resume it may change (as may --max-iters "
                        "and --eval-interval; no other run flag): the cosine decay is then recomputed for the new "
                        "length, as if the run had started with it, so at the resumed iteration the lr moves from "
                        "the old curve to the new one (up for a longer run), and the log says by how much")
    p.add_argument("--max-iters", type=int, default=0,
                   help="if > 0, train this many iterations instead of --epochs (see --epochs for --resume)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate, used exactly as given")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup iterations (default: one epoch)")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW's, on weights only (not biases, norms, layer scales)")
    p.add_argument("--label-smoothing", type=float, default=0.2, help="of the cross-entropy")
    p.add_argument("--sa-weight", type=float, default=1.0, help="weight of the self-attention regulariser")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth of the last block")
    p.add_argument("--layer-scale-init", type=float, default=1.0, help="initial ConvNeXt layer scale (<= 0: none)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="per-iteration decay of the weight EMA")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; CPUs with AVX512-BF16/AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "fused"),
                   help="fused kernels: auto (on CUDA when available), torch, fused")
    p.add_argument("--pretrained", default=None, help="ConvNeXt ImageNet or EmoNeXt weights: path or URL")
    add_augmentation_flags(p)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed csv rows (counted) instead of failing")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="when the data has no val split: this fraction of each class of train is held out as val "
                        "(drawn with --seed), so the best checkpoint is never chosen on the test split")
    p.add_argument("--out-dir", default="out",
                   help="ckpt.pt, best.pt, stn.png, metrics.csv, curves.png, results.json")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT_DIR/ckpt.pt, with its run flags (see --epochs)")
    p.add_argument("--seed", type=int, default=0,
                   help="of the initial weights, the batches, the augmentation and a held-out val split")
    p.add_argument("--eval-interval", type=int, default=0, help="iterations between evaluations (0: each epoch)")
    p.add_argument("--log-interval", type=int, default=50, help="iterations between log lines")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N; under torchrun, cuda means each process's own GPU (its local rank)")
    return p


# what each numeric flag accepts: (test, what to tell the user); None (a default to be worked out) always passes
LIMITS = {
    "img_size": (lambda v: v >= 32, "at least 32 (the model downsamples by 32)"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "max_iters": (lambda v: v >= 0, "0 (train --epochs) or more"),
    "lr": (lambda v: v > 0, "more than 0"),
    "min_lr": (lambda v: v >= 0, "0 or more"),
    "warmup": (lambda v: v >= 0, "0 or more iterations"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rotate": (lambda v: v >= 0, "0 or more degrees"),
    "zoom": (lambda v: 0 <= v < 1, "in [0, 1) (faces are scaled by a factor in [1 - zoom, 1 + zoom])"),
    "shift": (lambda v: 0 <= v < 1, "in [0, 1) (a fraction of the side)"),
    "mixup": (lambda v: v >= 0, "0 (off) or a Beta parameter above 0"),
    "cutmix": (lambda v: v >= 0, "0 (off) or a Beta parameter above 0"),
    "mix_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "switch_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "random_erase": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "eval_interval": (lambda v: v >= 0, "0 (each epoch) or more iterations"),
    "log_interval": (lambda v: v >= 1, "at least 1 iteration"),
    "max_bad_steps": (lambda v: v >= 1, "at least 1"),
    "threads": (lambda v: v >= 0, "0 (torch's default) or more"),
}


def check_args(args):
    """Ends the run with one line naming the flag and what it expects, for a value that cannot work."""
    cli.check_limits("train.py", args, LIMITS)
    if args.pretrained and not args.pretrained.startswith(("http://", "https://")) \
            and not os.path.isfile(args.pretrained):
        sys.exit(f"train.py: --pretrained: no such file {args.pretrained} (expected a checkpoint file or an "
                 "http(s):// URL)")
    cli.check_device("train.py", args.device)


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.data is None:
        args.data = data.find_default_data()
    if args.data != "synthetic":
        args.data = os.path.abspath(args.data)  # the checkpoint then names data that eval.py finds from anywhere
    if args.ferplus is not None:
        args.ferplus = os.path.abspath(args.ferplus)
    return args


# -----------------------------------------------------------------------------
# the pieces of a step and of its log: the lr schedule, weight decay's groups, the EMA, checks, accuracy, time

def lr_at(it, args, max_iters):
    """Linear warmup to args.lr, then cosine decay to args.min_lr at max_iters."""
    if it < args.warmup:
        return args.lr * ((it + 1) / args.warmup)  # lr * (k / k) is lr exactly; (lr * k) / k may be off by an ulp
    progress = (it - args.warmup) / max(1, max_iters - args.warmup)
    w = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0; the blend is exactly lr at 1, min_lr at 0
    return args.lr * w + args.min_lr * (1 - w)


def param_groups(model, weight_decay):
    """No weight decay on biases, norms and layer scales (all the 1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def update_ema(ema_model, model, decay):
    ema, live = ema_model.state_dict(), model.state_dict()
    floats = [k for k in ema if ema[k].dtype.is_floating_point]
    torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], 1.0 - decay)
    for k in ema.keys() - set(floats):
        ema[k].copy_(live[k])  # BatchNorm's num_batches_tracked


def all_finite(model):
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.dtype.is_floating_point)


def accuracy(logits, y):
    """Share of argmax predictions equal to y: classes (N,), or the most likely class of distributions (N, C)."""
    return (logits.argmax(-1) == data.target_classes(y)).double().mean().item()


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------
# several processes (torchrun): the process group, the global batch's statistics, decisions all processes share

def init_distributed(args):
    """(rank, world size) from torchrun's environment, with the process group started: NCCL on CUDA (each process
    on the GPU of its local rank), gloo on CPU. One process, however launched, gets (0, 1) and no process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.batch_size % world:
        sys.exit(f"train.py: --batch-size {args.batch_size} does not split evenly over {world} processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(args.device)
    if device.index is not None:
        sys.exit(f"train.py: --device {args.device}: under torchrun give {device.type}; each process takes its own")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # from here on "cuda" is this process's GPU
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank) if cuda else None)
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone logs; errors still reach stderr
    return rank, world


def end_distributed(run):
    """Leaves the process group, DDP first: were DDP's reducer to drop the group's last reference, it would join
    gloo's threads holding the GIL while one of them waits for the GIL to free a collective's tensors (a hang)."""
    run.train_model = None
    dist.destroy_process_group()


def stop(run, message):
    """Ends the run with `message`. Under DDP every process gets here at the same step (see all_processes): rank 0
    says why before any of them exits (torchrun then ends the rest), and all leave with status 1."""
    if run.world == 1:
        sys.exit(message)
    if run.rank == 0:
        print(message, file=sys.stderr, flush=True)
    dist.barrier()
    end_distributed(run)
    sys.exit(1)


def sum_over_processes(run, values):
    """A few numbers summed over all processes (one all-reduce); one process gets them back as they are."""
    if run.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.tolist()


def all_processes(run, ok):
    """Whether `ok` holds in every process, so that all of them take the same branch (and none is left waiting
    in a collective that the others skipped)."""
    return bool(ok) if run.world == 1 else sum_over_processes(run, [float(not ok)])[0] == 0


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d with the training statistics of the global batch, on every backend (SyncBatchNorm runs on CUDA
    only): each process's per-channel mean and variance are all-gathered with autograd and combined."""

    def forward(self, x):  # (b, C, H, W) with the same b in every process
        if not self.training:
            return super().forward(x)
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        means, variances = funcol.all_gather_single(torch.stack([mean, var]), 0, dist.group.WORLD).view(
            -1, 2, x.shape[1]).unbind(1)  # (world, C) each
        mean = means.mean(0)
        var = (variances + (means - mean) ** 2).mean(0)  # the variance of equal-sized parts pooled
        n = x.numel() // x.shape[1] * len(means)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x.float() * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


class GlobalBatchSelfAttention(BatchSelfAttention):
    """The self-attention regulariser across the global batch: the features of all processes, all-gathered with
    autograd in rank order (the order of the global batch), attend to each other."""

    def forward(self, x):  # (b, d) -> (B, B)
        return super().forward(funcol.all_gather_single(x, 0, dist.group.WORLD) if self.training else x)


def make_batch_global(model):
    """The two parts of EmoNeXt that look across the batch, the STN's BatchNorm and the self-attention
    regulariser, look across the global one. The subclasses hold no state of their own: parameters, buffers and
    state-dict keys stay as they are."""
    for m in model.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
        elif type(m) is BatchSelfAttention:
            m.__class__ = GlobalBatchSelfAttention


def training_model(model, args, world):
    """What train_step calls: the model itself in one process; under torchrun the model with global batch
    statistics wrapped in DDP (which averages the gradients); compiled with --compile."""
    if world > 1:
        make_batch_global(model)
        # find_unused_parameters: attention.value gets no gradient (kept for the official state-dict layout)
        model = DDP(model, find_unused_parameters=True)
    return torch.compile(model) if args.compile else model


# -----------------------------------------------------------------------------
# a run: its state, set up, train step by step, evaluate and save, test

@dataclass
class Run:
    """The state of a run, built by setup and passed to every step below."""
    # set by setup, then fixed (the model, EMA and optimizer change in place: train_step trains them, final_test
    # loads best.pt into the EMA)
    args: argparse.Namespace  # the flags; read_resume puts in the checkpoint's run flags, run_length the defaults
    device: torch.device  # where the training faces, the model and the batches are
    rank: int  # this process's rank under torchrun; 0 alone logs and writes files
    world: int  # the number of processes (1 without torchrun)
    train_x: torch.Tensor  # (N, 48, 48) uint8 training faces, whole on the device
    train_y: torch.Tensor  # (N,) classes, or (N, C) vote distributions for ferplus-soft / ferplus-draw
    val: tuple  # (faces, classes) of the validation split, on the CPU: model selection
    test: tuple  # (faces, classes) of the test split, on the CPU: final_test
    class_names: tuple  # the classes' names (FER2013's 7 or FER+'s 8), saved in the checkpoints
    iters_per_epoch: int  # full batches in the training split
    max_iters: int  # the run's length in iterations (--max-iters, or --epochs epochs)
    eval_interval: int  # iterations between evaluations (--eval-interval, or one epoch)
    model: EmoNeXt  # the live weights, which the optimizer trains
    ema_model: EmoNeXt  # their EMA (update_ema), which is validated, kept as best and tested
    optimizer: torch.optim.Optimizer  # AdamW over param_groups(model)
    autocast: torch.autocast  # bf16 autocast under --amp, else a no-op context
    ckpt_path: str  # OUT_DIR/ckpt.pt: the latest evaluated state, for --resume
    best_path: str  # OUT_DIR/best.pt: the state with the best val accuracy so far, for final_test
    train_model: torch.nn.Module | None = None  # what train_step calls (training_model); end_distributed drops it
    # the run's progress: updated as it trains, saved in the checkpoints and put back by restore
    it: int = 0  # iterations done (train_step counts them)
    best_acc: float = -1.0  # best val accuracy of the EMA so far (evaluate_and_save)
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient (train_step)
    bad_in_a_row: int = 0  # of those, how many in a row up to now (train_step; not saved: 0 on resume)
    rows: list = field(default_factory=list)  # metrics.csv's rows so far, one per evaluation (record_row)
    elapsed: float = 0.0  # seconds the run took before this process started it (restore), for elapsed_s
    started: float = field(default_factory=time.time)  # when this process started the run
    window: dict = field(default_factory=dict)  # sums since the last row: loss, steps, correct, faces (add_to_window)


def load_data(args):
    """(splits, description) of --data; when it has no val split, --val-fraction of train is held out as val."""
    try:
        splits, description = data.load_dataset(args.data, args.skip_bad_rows, args.labels, args.ferplus)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    print(description)
    if len(splits["val"][1]) == 0:
        try:
            splits = data.hold_out(splits, args.val_fraction, args.seed)
        except ValueError as e:
            sys.exit(f"train.py: --val-fraction: {e}")
        print(f"no val split: {len(splits['val'][1])} faces ({args.val_fraction:g} of each class of train, drawn with "
              f"seed {args.seed}) held out of train as val, {len(splits['train'][1])} left to train on; "
              + ("the test split is kept for the final test" if len(splits["test"][1]) else "there is no test split"))
    return splits, description


def run_length(args, n_train, description):
    """(iterations per epoch, iterations of the run) for n_train training faces; fills in the defaults of
    --epochs (32 on FER2013, 3 on the synthetic faces) and --warmup (one epoch)."""
    if args.epochs is None:
        args.epochs = 3 if args.data == "synthetic" or description.startswith("synthetic") else 32
    iters_per_epoch = n_train // args.batch_size
    if iters_per_epoch == 0:
        sys.exit(f"train.py: {n_train} training faces is fewer than one batch of {args.batch_size}")
    max_iters = args.max_iters or args.epochs * iters_per_epoch
    if args.warmup is None:
        args.warmup = min(iters_per_epoch, max_iters)
    return iters_per_epoch, max_iters


def build_model(args, class_names, device, resuming):
    """The model on the device, channels-last, from --pretrained unless resuming (the checkpoint's weights come
    later), and its EMA copy."""
    model = EmoNeXt.from_size(args.model, img_size=args.img_size, in_chans=args.in_chans, num_classes=len(class_names),
                              drop_path_rate=args.drop_path, layer_scale_init=args.layer_scale_init,
                              label_smoothing=args.label_smoothing, sa_weight=args.sa_weight,
                              class_names=tuple(class_names))
    if args.pretrained and not resuming:
        try:
            load_weights(model, args.pretrained)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # unreachable, unreadable, foreign
            where = "" if args.pretrained in str(e) else f"{args.pretrained}: "
            sys.exit(f"train.py: --pretrained: {where}{e}")
    # channels-last on every device: the blocks' permutes to (N, H, W, C) become free and CPU depthwise convs run
    # their fast path (BENCHMARKS.md, "Training on a 2-core CPU")
    model.to(device, memory_format=torch.channels_last)
    return model, copy.deepcopy(model).eval().requires_grad_(False)


def use_kernels(args, device):
    """Sets the --kernels backend and logs which implementation each hot path runs."""
    if emonext.kernels is not None:
        emonext.kernels.set_backend(args.kernels)
        print(emonext.kernels.describe(device))
    elif args.kernels != "torch":
        print("kernels/ not importable: plain PyTorch everywhere")


def setup(args, resume, rank=0, world=1):
    """Data on the device, the model, its EMA copy and the optimizer, restored from `resume` if given.
    Returns the Run that the steps below read and update."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # data: uint8 faces, kept whole on the device; augmentation happens there, batch by batch
    splits, description = load_data(args)
    train_x, train_y = (t.to(device) for t in splits["train"])
    iters_per_epoch, max_iters = run_length(args, len(train_y), description)
    if resume is not None:
        check_resume_length(args, resume, iters_per_epoch, max_iters)

    class_names = data.class_names(args.labels)
    model, ema_model = build_model(args, class_names, device, resuming=resume is not None)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    run = Run(args=args, device=device, rank=rank, world=world, train_x=train_x, train_y=train_y, val=splits["val"],
              test=splits["test"], class_names=class_names, iters_per_epoch=iters_per_epoch, max_iters=max_iters,
              eval_interval=args.eval_interval or iters_per_epoch, model=model, ema_model=ema_model,
              optimizer=optimizer, autocast=torch.autocast(device.type, torch.bfloat16, enabled=args.amp),
              ckpt_path=os.path.join(args.out_dir, "ckpt.pt"), best_path=os.path.join(args.out_dir, "best.pt"))
    if resume is not None:
        restore(run, resume)
    if rank:  # drop-path masks: a stream per process, apart from the (seed, iteration) augmentation seeds
        torch.manual_seed(args.seed * 1_000_003 + run.it + rank * 2 ** 40)
    use_kernels(args, device)
    run.train_model = training_model(model, args, world)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"EmoNeXt-{args.model}: {n_params / 1e6:.2f}M parameters, img_size {args.img_size}, in_chans "
          f"{args.in_chans}, {max_iters} iterations of {args.batch_size} ({max_iters / iters_per_epoch:.1f} epochs)"
          + (f", {world} processes of {args.batch_size // world} (DDP, {dist.get_backend()})" if world > 1 else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    return run


def epoch_batches(run):
    """Index batches from run.it to the end of its epoch. One permutation per epoch from (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""
    bs = run.args.batch_size
    epoch, offset = divmod(run.it, run.iters_per_epoch)
    order = torch.randperm(len(run.train_y), generator=torch.Generator().manual_seed(run.args.seed * 100_003 + epoch))
    for start in range(offset * bs, run.iters_per_epoch * bs, bs):
        yield order[start:start + bs].to(run.device)


def training_batch(run, idx, first, share):
    """This process's rows first..first+share of the global batch idx: augmented faces (b, 1, S, S) channels-last and
    their targets: classes (b,), or distributions (b, C) for ferplus-soft and for mixed batches. Everything random
    is drawn for the global batch from (seed, iteration), so any number of processes draws alike and a resumed run
    draws what it would have. Mixing pairs each face with the global batch reversed (timm's pairing), whose rows
    this process augments too when they are another process's."""
    args, total = run.args, len(idx)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + run.it)  # augmentation stream from (seed, iteration)
    pose = dict(rotate=args.rotate, scale=(1 - args.zoom, 1 + args.zoom), translate=args.shift, vflip=args.vflip)
    start = gen.get_state()  # the partner rows' augmentation draws the same poses
    xb = data.augment(run.train_x[idx[first:first + share]], args.img_size, gen, rows=(first, total), **pose)
    yb = run.train_y[idx]  # (B,) classes, or (B, C) distributions for ferplus-soft / ferplus-draw
    if args.labels == "ferplus-draw":  # drawn for the global batch, so any number of processes draws alike
        yb = data.draw_labels(yb, gen)
    erase = gen.get_state()  # ... and the same boxes to erase
    if args.random_erase:
        xb = data.random_erase(xb, args.random_erase, gen, rows=(first, total))
    mix = data.draw_mix(gen, args.img_size, args.mixup, args.cutmix, args.mix_prob, args.switch_prob)
    if mix is None:
        return xb.contiguous(memory_format=torch.channels_last), yb[first:first + share]
    p0 = total - first - share  # the partner rows: the global batch reversed
    if run.world == 1:
        partner = xb.flip(0)
    else:
        partner = data.augment(run.train_x[idx[p0:p0 + share]], args.img_size, torch.Generator().set_state(start),
                               rows=(p0, total), **pose)
        if args.random_erase:
            partner = data.random_erase(partner, args.random_erase, torch.Generator().set_state(erase),
                                        rows=(p0, total))
        partner = partner.flip(0)
    soft = data.soft_targets(yb, len(run.class_names))
    xb, yb = data.mix(xb, soft[first:first + share], partner, soft[p0:p0 + share].flip(0), *mix)
    return xb.contiguous(memory_format=torch.channels_last), yb


def train_step(run, idx):
    """One optimizer step on the faces `idx`, or none if the loss or the gradient is not finite (the STN's
    BatchNorm statistics are then restored, and the run stops after --max-bad-steps such steps in a row).
    Returns (logits, targets, loss, ce, sa, lr)."""
    args, model = run.args, run.model
    share = len(idx) // run.world
    first = run.rank * share
    mine = idx[first:first + share]  # this process's rows of the global batch
    xb, yb = training_batch(run, idx, first, share)
    lr = lr_at(run.it, args, run.max_iters)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    bn_stats = [b.clone() for b in model.buffers()]  # the STN's BatchNorm statistics, to undo a bad batch
    with run.autocast:
        logits, loss, (ce, sa) = run.train_model(xb, yb, loss_parts=True)
    loss_ok = all_processes(run, torch.isfinite(loss))
    if loss_ok:
        loss.backward()  # under DDP the gradients are averaged here, so grad_norm is the same in every process
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if loss_ok and torch.isfinite(grad_norm):
        run.optimizer.step()
        update_ema(run.ema_model, model, min(args.ema_decay, (1 + run.it) / (10 + run.it)))
        run.bad_in_a_row = 0
    else:
        torch._foreach_copy_(list(model.buffers()), bn_stats)
        run.nonfinite_total += 1
        run.bad_in_a_row += 1
        mean_loss = sum_over_processes(run, [loss.item()])[0] / run.world  # non-finite if any process's loss is
        print(f"iter {run.it}: non-finite loss or gradient ({mean_loss:.4g}), step skipped "
              f"({run.bad_in_a_row} in a row, {run.nonfinite_total} in all)")
        if run.bad_in_a_row >= args.max_bad_steps:
            stop(run, f"train.py: stopping: {run.bad_in_a_row} non-finite steps in a row at iteration {run.it}; "
                      f"the last good checkpoint is {run.ckpt_path} (try a lower --lr)")
    run.optimizer.zero_grad(set_to_none=True)
    run.it += 1
    return logits, yb, loss, ce, sa, lr


def checkpoint_state(run):
    state = {"config": config_dict(run.model), "model": run.model.state_dict(), "ema": run.ema_model.state_dict(),
             "optimizer": run.optimizer.state_dict(), "iter": run.it, "best_val_acc": run.best_acc,
             "nonfinite_steps": run.nonfinite_total, "args": vars(run.args), "class_names": list(run.class_names),
             "rng_cpu": torch.get_rng_state(), "metrics": run.rows, "elapsed_s": elapsed_s(run)}
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def ema_accuracy(run, x, y):
    """Accuracy of the EMA weights on (x, y). Each process scores its slice and the counts are summed, so every
    process gets the same number (and the same "improved or not")."""
    lo, hi = len(y) * run.rank // run.world, len(y) * (run.rank + 1) // run.world
    logits = run.ema_model.predict_logits(x[lo:hi], amp=run.args.amp)
    correct, = sum_over_processes(run, [(logits.argmax(-1) == y[lo:hi]).sum().item()])
    return correct / len(y) if len(y) else math.nan  # nan: the mean of no faces


@torch.no_grad()
def save_stn_picture(model, x, path):
    """Faces (uint8 (B, 48, 48)) beside what the STN makes of them at the model's img_size: pairs of columns,
    input | warped."""
    model.eval()
    c = model.config
    inputs = emonext.preprocess(x.to(next(model.parameters()).device), c.img_size, c.pixel_mean, c.pixel_std)
    warped, _ = model.stn(inputs.expand(-1, c.in_chans, -1, -1))
    pairs = torch.stack([inputs, warped[:, :1].float()], 1)  # (B, 2, 1, S, S), the warp's first channel
    pixels = (pairs * c.pixel_std + c.pixel_mean).clamp(0, 1).mul(255).round().byte().cpu()
    b, s, cols = len(x), c.img_size, 4
    rows = (b + cols - 1) // cols
    img = Image.new("L", (cols * (2 * s + 8), rows * (s + 4)), 255)
    for i in range(b):
        r, col = divmod(i, cols)
        for k in range(2):
            img.paste(Image.fromarray(pixels[i, k, 0].numpy()), (col * (2 * s + 8) + k * s, r * (s + 4)))
    emonext.write_atomically(path, lambda tmp: img.save(tmp, format="PNG"))


def evaluate_and_save(run):
    """Scores the EMA weights on the validation split, writes stn.png, ckpt.pt and (if improved) best.pt. A write
    that fails (a full disk, a read-only out-dir) stops the run in one line; the files written before stay whole."""
    t_eval = time.time()
    val_acc = ema_accuracy(run, *run.val)
    if not all_processes(run, all_finite(run.model)):
        stop(run, f"train.py: non-finite weights at iteration {run.it}; not saving over {run.ckpt_path}")
    improved = val_acc > run.best_acc
    run.best_acc = max(run.best_acc, val_acc)
    record_row(run, val_acc, t_eval)
    failed = ""
    if run.rank == 0:  # the other processes hold the same weights
        try:
            save_stn_picture(run.ema_model, run.val[0][:16], os.path.join(run.args.out_dir, "stn.png"))
            write_record(run)
            state = checkpoint_state(run)
            if improved:  # best.pt before ckpt.pt: a kill between the two then resumes from the older ckpt.pt
                save_checkpoint(state, run.best_path)
            save_checkpoint(state, run.ckpt_path)
        except OSError as e:
            failed = e.strerror
    if not all_processes(run, not failed):
        stop(run, f"train.py: {failed}; stopped at iteration {run.it}, the files saved before are as they were")
    print(f"epoch {run.it / run.iters_per_epoch:.2f} | iter {run.it} | val acc (EMA) {100 * val_acc:.2f}% | "
          f"best {100 * run.best_acc:.2f}%{' (saved)' if improved else ''} | eval "
          f"{time.time() - t_eval:.1f}s", flush=True)
    run.model.train()
    run.window = {"since": time.time()}  # the next row's images/s leaves this evaluation out
    return time.time() - t_eval


def load_best(run):
    """Puts best.pt's EMA weights into run.ema_model for the final test; returns what it tests. If best.pt is gone,
    the EMA weights in hand are tested (and it says so); a best.pt of another run (another config or run flags:
    someone else's file in this out-dir) is refused by name. Rank 0 alone runs the final test."""
    if not os.path.exists(run.best_path):
        print(f"train.py: {run.best_path} is gone (removed during the run?); testing the EMA weights in hand "
              f"instead", file=sys.stderr)
        return "the last EMA weights"
    try:
        best = read_checkpoint(run.best_path)
    except ValueError as e:
        sys.exit(f"train.py: final test: {e}")
    saved = best.get("args", {})
    differ = [cli.flag(k) for k in RUN_ARGS if k not in RESUME_MAY_CHANGE and saved.get(k) != getattr(run.args, k)]
    if differ or best.get("config") != config_dict(run.model):
        sys.exit(f"train.py: {run.best_path} is not this run's: its {' '.join(differ) or 'model config'} differ from "
                 f"this run's; not testing it (python eval.py {run.best_path} tests it as it is)")
    run.ema_model.load_state_dict(best["ema"])
    return run.best_path


def final_test(run):
    """Tests the best EMA weights on the test split (PrivateTest for FER2013), plain and ten-crop."""
    test_x, test_y = run.test
    if len(test_y) == 0:
        print(f"done; no test split. best val accuracy {100 * run.best_acc:.2f}%, checkpoint {run.best_path}")
        return None
    args = run.args
    tested = load_best(run)
    results = {"best_val_acc": run.best_acc, "nonfinite_steps": run.nonfinite_total}
    for tta in ("none", "tencrop"):
        results[f"test_acc_{tta}"] = accuracy(run.ema_model.predict_logits(test_x, tta, amp=args.amp), test_y)
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    try:
        emonext.write_atomically(os.path.join(args.out_dir, "results.json"), write)
    except OSError as e:
        sys.exit(f"train.py: {e.strerror}")
    print(f"test accuracy of {tested} (EMA): {100 * results['test_acc_none']:.2f}% plain, "
          f"{100 * results['test_acc_tencrop']:.2f}% ten-crop (best val {100 * run.best_acc:.2f}%)")
    return results


def log_progress(run, logits, yb, loss, ce, sa, lr, seconds, iters):
    """The last step's loss and accuracy over the global batch, its lr, images/s over the last `iters` steps
    (all processes, and per process under DDP) and the time left."""
    world = run.world
    loss, ce, acc = (v / world for v in sum_over_processes(run, [loss.item(), ce.item(), accuracy(logits, yb)]))
    speed = iters * run.args.batch_size / seconds
    eta = (run.max_iters - run.it) * seconds / iters
    per_process = f" ({speed / world:.0f} per process)" if world > 1 else ""
    print(f"iter {run.it}/{run.max_iters} | loss {loss:.4f} (ce {ce:.4f} sa {sa.item():.2e}) | acc {100 * acc:.1f}% | "
          f"lr {lr:.2e} | {speed:.0f} img/s{per_process} | eta {fmt_time(eta)}", flush=True)


# -----------------------------------------------------------------------------
# the run's record: OUT_DIR/metrics.csv (a row per evaluation) and curves.png, rewritten whole at each evaluation
# from the rows the checkpoint carries, so a resumed run goes on with the rows of the checkpoint it resumes

METRICS = ("iteration", "epoch", "lr", "train_loss", "train_acc", "val_acc", "images_per_s", "elapsed_s")


def add_to_window(run, logits, yb, loss):
    """Adds a step's loss and correct predictions to the sums since the last row; kept as tensors (no wait for the
    device each step), and a skipped step (non-finite loss) adds nothing."""
    w, ok = run.window, torch.isfinite(loss.detach())
    correct = (logits.detach().argmax(-1) == data.target_classes(yb)).sum()
    for key, value in (("loss", torch.where(ok, loss.detach().float(), 0.0)), ("steps", ok.float()),
                       ("correct", correct * ok), ("faces", len(yb) * ok)):
        w[key] = w.get(key, 0) + value
    w["iters"] = w.get("iters", 0) + 1


def elapsed_s(run):
    return run.elapsed + time.time() - run.started


def record_row(run, val_acc, t_eval):
    """Appends this evaluation's row to run.rows: the training loss and accuracy over the steps since the last row
    (all processes), the lr of the last step, val accuracy, images/s over those steps without the evaluations."""
    w = run.window
    loss, steps, correct, faces = sum_over_processes(run, [float(w.get(k, 0)) for k in
                                                           ("loss", "steps", "correct", "faces")])
    seconds = t_eval - w.get("since", run.started)
    run.rows.append({"iteration": run.it, "epoch": round(run.it / run.iters_per_epoch, 4),
                     "lr": float(f"{lr_at(run.it - 1, run.args, run.max_iters):.4e}"),
                     "train_loss": round(loss / steps, 5) if steps else math.nan,
                     "train_acc": round(correct / faces, 5) if faces else math.nan, "val_acc": round(val_acc, 5),
                     "images_per_s": round(w.get("iters", 0) * run.args.batch_size / max(seconds, 1e-9), 1),
                     "elapsed_s": round(elapsed_s(run), 1)})


def write_record(run):
    """metrics.csv and curves.png of run.rows, each through a temporary file."""
    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRICS)
            writer.writeheader()
            writer.writerows(run.rows)
    emonext.write_atomically(os.path.join(run.args.out_dir, "metrics.csv"), write_csv)
    img = draw_curves(run.rows)
    emonext.write_atomically(os.path.join(run.args.out_dir, "curves.png"), lambda tmp: img.save(tmp, format="PNG"))


CURVES = (("train loss", (("train", "train_loss"),)), ("accuracy", (("train", "train_acc"), ("val", "val_acc"))),
          ("learning rate", (("lr", "lr"),)))
COLOURS = {"train": (214, 39, 40), "val": (31, 119, 180), "lr": (44, 160, 44)}


def draw_curves(rows, w=320, h=240):
    """A picture of the rows against epochs, made with pillow: the train loss, train and val accuracy, the lr."""
    img = Image.new("RGB", (len(CURVES) * w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [r["epoch"] for r in rows]
    for i, (title, series) in enumerate(CURVES):
        draw_panel(draw, i * w, w, h, title, xs, [(name, [r[key] for r in rows]) for name, key in series])
    return img


def draw_panel(draw, left, w, h, title, xs, series):
    """One panel of draw_curves: the title with a legend in the series' colours, axes with their ranges written at
    the ends, a line per series."""
    x0, y0, x1, y1 = left + 56, 24, left + w - 16, h - 30  # the plot area
    draw.text((x0, 6), title, fill="black")
    at = x0 + draw.textlength(title) + 12
    for name, _ in series if len(series) > 1 else ():
        draw.text((at, 6), name, fill=COLOURS[name])
        at += draw.textlength(name) + 8
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    values = [v for _, ys in series for v in ys if math.isfinite(v)]
    if not xs or not values:
        return
    lo, hi = min(values), max(values)
    hi, x_hi = (hi if hi > lo else lo + 1), max(max(xs), 1e-9)
    for y, v in ((y0, hi), (y1, lo)):
        label = f"{v:.3g}"
        draw.text((x0 - 4 - draw.textlength(label), y - 5), label, fill="black")
    draw.text((x0, y1 + 4), "0", fill="black")
    label = f"epoch {x_hi:.3g}"
    draw.text((x1 - draw.textlength(label), y1 + 4), label, fill="black")
    for name, ys in series:
        points = [(x0 + (x1 - x0) * x / x_hi, y1 - (y1 - y0) * (y - lo) / (hi - lo))
                  for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[name], width=2)
        for px, py in points[-1:]:  # the last value, also when it is the only one
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=COLOURS[name])


# -----------------------------------------------------------------------------
# resume: read OUT_DIR/ckpt.pt back, check that its run can go on, and put its state back

# flags that say how and where a run goes, not what it computes; every other flag defines the run, and --resume
# takes those from the checkpoint so the run continues unchanged
RUNTIME_FLAGS = ("compile", "kernels", "out_dir", "resume", "log_interval", "threads", "device")
RUN_ARGS = tuple(a.dest for a in build_parser()._actions if a.dest not in RUNTIME_FLAGS + ("help",))

# the run flags a resumed run may change: how long it trains and how often it is evaluated (see --epochs)
RESUME_MAY_CHANGE = ("epochs", "max_iters", "eval_interval")


def given_flags(argv=None):
    """The dests of the flags written on the command line (argv; None: sys.argv), leaving out the defaults."""
    p = build_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS  # a flag left out is then left out of the namespace
    return set(vars(p.parse_args(argv)))


def read_resume(args, argv=None):
    """The checkpoint to continue from (None for a new run). Its run flags replace the defaults; a run flag given
    on the command line (argv) must equal the checkpoint's, except the RESUME_MAY_CHANGE ones."""
    if not args.resume:
        return None
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        sys.exit(f"train.py: --resume: no checkpoint at {path}")
    try:
        resume = read_checkpoint(path)
    except ValueError as e:
        sys.exit(f"train.py: --resume: {e}")
    saved = resume.get("args", {})
    missing = [cli.flag(k) for k in RUN_ARGS if k not in saved]
    if missing:
        sys.exit(f"train.py: --resume: {path} lacks the run flags {' '.join(missing)} (written by another version of "
                 f"train.py?), so its run cannot be continued; start a new run in another --out-dir (--pretrained "
                 f"{path} starts it from these weights)")
    given = given_flags(argv) & set(RUN_ARGS)
    changed = [f"{cli.flag(k)} {getattr(args, k)} (the run has {saved[k]})" for k in sorted(given)
               if k not in RESUME_MAY_CHANGE and getattr(args, k) != saved[k]]
    if changed:
        sys.exit(f"train.py: --resume: {', '.join(changed)}: a resumed run keeps the flags of {path}; only "
                 f"{', '.join(map(cli.flag, RESUME_MAY_CHANGE))} may change (start a new --out-dir to change others)")
    if "epochs" in given and "max_iters" not in given and saved["max_iters"] and args.epochs != saved["epochs"]:
        sys.exit(f"train.py: --resume: --epochs: the length of this run is --max-iters {saved['max_iters']}, which "
                 "overrides --epochs; change --max-iters, or add --max-iters 0 to count in epochs")
    for k in set(RUN_ARGS) - (given & set(RESUME_MAY_CHANGE)):
        setattr(args, k, saved[k])
    return resume


def check_resume_length(args, resume, iters_per_epoch, max_iters):
    """Ends a resume of a finished run with a message; says how a changed length moves the lr schedule."""
    it, saved = resume["iter"], SimpleNamespace(**resume["args"])
    if it >= max_iters:
        sys.exit(f"train.py: --resume: the run in {args.out_dir} is finished ({it} of {max_iters} iterations), nothing "
                 f"to train; give a larger --epochs or --max-iters to train it longer, or test it with "
                 f"python eval.py {os.path.join(args.out_dir, 'best.pt')}")
    saved_max = saved.max_iters or saved.epochs * iters_per_epoch
    if max_iters != saved_max:
        print(f"--resume: {saved_max} -> {max_iters} iterations; the cosine decay is recomputed to end at iteration "
              f"{max_iters}, so the lr at iteration {it} goes from {lr_at(it, saved, saved_max):.3e} to "
              f"{lr_at(it, args, max_iters):.3e}")


def restore(run, resume):
    """Puts the checkpoint `resume` back into the run set up for it: weights, EMA, optimizer, progress and the
    random number generators, so the run goes on as if it had not stopped."""
    run.model.load_state_dict(resume["model"])
    run.ema_model.load_state_dict(resume["ema"])
    run.optimizer.load_state_dict(resume["optimizer"])
    run.it, run.best_acc, run.nonfinite_total = resume["iter"], resume["best_val_acc"], resume["nonfinite_steps"]
    run.rows, run.elapsed = resume.get("metrics", []), resume.get("elapsed_s", 0.0)  # none before metrics.csv
    torch.set_rng_state(resume["rng_cpu"])
    if run.device.type == "cuda" and "rng_cuda" in resume:
        torch.cuda.set_rng_state(resume["rng_cuda"])
    print(f"resuming {run.ckpt_path} at iteration {run.it}/{run.max_iters}")


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """Holds OUT_DIR/train.lock (flock) while the run lives, in the process that writes files (rank 0; the others
    have RANK > 0 from torchrun): a second train.py on the same out-dir stops at once, naming the holder. The kernel
    drops the lock however the process ends, kill -9 included. Opening the file also proves the out-dir writable
    before any data is read."""
    if int(os.environ.get("RANK", "0")) > 0:
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, "train.lock"), "a+")
    except OSError as e:
        sys.exit(f"train.py: --out-dir {out_dir}: cannot write there ({e.strerror or e})")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            sys.exit(f"train.py: --out-dir {out_dir} is in use by another train.py ({holder}); let it finish or "
                     f"choose another --out-dir")
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        yield


# -----------------------------------------------------------------------------
# the story of a run

def main(argv=None):
    args = parse_args(argv)
    resume = read_resume(args, argv)
    with out_dir_lock(args.out_dir):  # one run per out-dir, proved writable before the data is read
        rank, world = init_distributed(args)
        run = setup(args, resume, rank, world)
        run.model.train()
        t_log, it_log = time.time(), run.it
        while run.it < run.max_iters:
            for idx in epoch_batches(run):
                step = train_step(run, idx)
                add_to_window(run, *step[:3])
                it = run.it
                if it % args.log_interval == 0 or it == run.max_iters:
                    log_progress(run, *step, time.time() - t_log, it - it_log)
                    t_log, it_log = time.time(), it
                if it % run.eval_interval == 0 or it == run.max_iters:
                    t_log += evaluate_and_save(run)  # keep the evaluation out of the images/s
                if it >= run.max_iters:
                    break
        results = final_test(run) if rank == 0 else None  # best.pt is rank 0's file
        if world > 1:
            end_distributed(run)
    return results


if __name__ == "__main__":
    record(main)()  # under torchrun, a failing process's traceback goes into torchrun's report
