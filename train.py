"""
Trains EmoNeXt on FER2013 (FER2013's or FER+'s labels) or on the built-in synthetic faces, on one device or,
under torchrun, on several (DistributedDataParallel: one process per GPU, or per CPU share with gloo).

    python train.py                                      # data/fer2013.{csv,npz} if present, else synthetic faces
    python train.py --data ../shared/data/fer2013.npz --amp --warmup 300  # FER2013 from scratch on a CPU (docs/training.md)
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
SIGTERM or Ctrl-C stops it at the end of a step with ckpt.pt written (a second one stops it at once).

The defaults (EmoNeXt-atto from scratch at 48 px on a CPU), why they were chosen and where the official code
(yelboudouri/EmoNeXt) differs: docs/training.md, "The defaults and the official code"; FER+ labels and torchrun:
its "FER+ labels" and "Many GPUs, many machines".
"""
import argparse
import contextlib
import copy
import math
import os
import pickle
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import cli
import data
import emonext
import run_record
from distributed import all_processes, any_process, distributed_model, end_distributed, init_distributed, \
    sum_over_processes
from emonext import SIZES, STEM_STRIDES, EmoNeXt, config_dict, load_weights, read_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# the flags: what each means, its default, what it accepts; --resume takes the run's flags from its checkpoint


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows this file's docstring as it is written, then each flag with its default where it has one."""

    def _get_help_string(self, action):
        shown = all(action.default is not v for v in (None, False, argparse.SUPPRESS)) \
            and "(default" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None,
                   help="FER2013 csv / npz / image folder, or 'synthetic' (default: data/fer2013.csv or .npz "
                        "under the repo if present, else the synthetic faces)")
    p.add_argument("--labels", default="fer2013", choices=data.LABELS,
                   help="FER2013's 7 classes, or FER+'s 8 as majority labels, vote distributions (soft) or labels "
                        "drawn from them (draw); val and test always use FER+'s majority labels")
    p.add_argument("--ferplus", default=None, help="FER+'s fer2013new.csv (default: the one beside --data)")
    p.add_argument("--model", default="atto", choices=list(SIZES), help="ConvNeXt size")
    p.add_argument("--img-size", type=int, default=48, help="faces are resized from 48 to this side")
    p.add_argument("--in-chans", type=int, default=1, choices=(1, 3), help="3 to use RGB ImageNet weights as they are")
    p.add_argument("--stem-stride", type=int, default=4, choices=STEM_STRIDES,
                   help="the stem's stride: 4 as in the paper, 2 for 4x the positions in every stage")
    p.add_argument("--batch-size", type=int, default=128, help="global batch: split evenly over torchrun's processes")
    p.add_argument("--epochs", type=int, default=None,
                   help="the run's length (default: 32 on FER2013, 3 on synthetic faces). --resume may change it (and "
                        "--max-iters, --eval-interval; no other run flag): the cosine decay is then recomputed as if "
                        "the run had started with the new length, and the log says how much the lr moves")
    p.add_argument("--max-iters", type=int, default=0,
                   help="if > 0, train this many iterations instead of --epochs (see --epochs for --resume)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate, used exactly as given")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup iterations (default: one epoch's)")
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
    p.add_argument("--pretrained", default=None, help="ConvNeXt ImageNet or EmoNeXt weights: path or URL (default: "
                                                      "none, from scratch)")
    p.add_argument("--teacher", nargs="+", default=None, metavar="CKPT",
                   help="distillation: train on (1 - W) x the labels + W x the mean of these checkpoints' "
                        "probabilities on the training faces (W: --teacher-weight), computed once before the first "
                        "step and kept in OUT_DIR/teacher.pt (default: none)")
    p.add_argument("--teacher-weight", type=float, default=0.5, help="W of --teacher")
    p.add_argument("--rotate", type=float, default=10.0, help="augmentation: rotation up to this many degrees")
    p.add_argument("--zoom", type=float, default=0.1, help="augmentation: zoom by a factor in [1 - zoom, 1 + zoom]")
    p.add_argument("--shift", type=float, default=0.05, help="augmentation: shift up to this fraction of the side")
    p.add_argument("--vflip", action="store_true", help="also flip faces vertically in augmentation")
    p.add_argument("--framing", type=float, default=0.0,
                   help="augmentation: the probability that a face is zoomed and shifted as predict.py frames the "
                        "faces a detector finds in photos (data.DETECTOR_CROP) instead of by --zoom and --shift")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup: mix each batch with itself reversed, by a weight drawn from Beta(A, A) (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="cutmix: paste a box of the reversed batch, its area 1 - Beta(A, A) (0: off)")
    p.add_argument("--mix-prob", type=float, default=1.0, help="the probability that a batch is mixed at all")
    p.add_argument("--switch-prob", type=float, default=0.5,
                   help="with --mixup and --cutmix: the probability that a mixed batch is cut-mixed")
    p.add_argument("--random-erase", type=float, default=0.0,
                   help="the probability that a face gets a box (2-33%% of it) of noise (timm's RandomErasing)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed csv rows (counted) instead of failing")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="when the data has no val split: this fraction of each class of train is held out as val "
                        "(drawn with --seed), so the best checkpoint is never chosen on the test split")
    p.add_argument("--out-dir", default="out",
                   help="where ckpt.pt, best.pt, stn.png, metrics.csv, curves.png, results.json go")
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


# what each numeric flag accepts: (test, what to tell the user); None (a default worked out later) always passes
AT_LEAST_1, AT_LEAST_0 = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, "0 or more")
FRACTION, PROBABILITY = (lambda v: 0 <= v < 1, "in [0, 1)"), (lambda v: 0 <= v <= 1, "in [0, 1]")
BETA = (lambda v: v >= 0, "0 (off) or a Beta parameter above 0")
LIMITS = {
    "img_size": (lambda v: v >= 32, "at least 32 (the model downsamples by 32)"), "batch_size": AT_LEAST_1,
    "epochs": AT_LEAST_1, "max_iters": (lambda v: v >= 0, "0 (train --epochs) or more"),
    "lr": (lambda v: v > 0, "more than 0"), "min_lr": AT_LEAST_0, "warmup": AT_LEAST_0, "weight_decay": AT_LEAST_0,
    "label_smoothing": FRACTION, "drop_path": FRACTION, "ema_decay": PROBABILITY,
    "rotate": (lambda v: v >= 0, "0 or more degrees"),
    "zoom": (FRACTION[0], "in [0, 1) (faces are scaled by a factor in [1 - zoom, 1 + zoom])"),
    "shift": (FRACTION[0], "in [0, 1) (a fraction of the side)"), "mixup": BETA, "cutmix": BETA,
    "mix_prob": PROBABILITY, "switch_prob": PROBABILITY, "random_erase": PROBABILITY, "framing": PROBABILITY,
    "teacher_weight": PROBABILITY,
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "eval_interval": (lambda v: v >= 0, "0 (each epoch) or more"),
    "log_interval": AT_LEAST_1, "max_bad_steps": AT_LEAST_1,
    "threads": (lambda v: v >= 0, "0 (torch's default) or more"),
}

# the flags that say how and where this process runs, not what the run computes; all the others are the run flags,
# which the checkpoint keeps and --resume takes back from it; of those, a resumed run may change its length and
# how often it is evaluated (see --epochs)
LAUNCH_FLAGS = ("compile", "kernels", "out_dir", "resume", "log_interval", "threads", "device", "help")
RUN_FLAGS = tuple(a.dest for a in build_parser()._actions if a.dest not in LAUNCH_FLAGS)
RESUME_MAY_CHANGE = ("epochs", "max_iters", "eval_interval")


def parse_args(argv=None):
    """(the flags, the checkpoint to continue or None). With --resume the checkpoint's run flags are the defaults
    and the command line is parsed again over them. A value that cannot work, or a run flag of --resume that differs
    from the run's (but RESUME_MAY_CHANGE), ends the run in one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resume = read_resume(args.out_dir) if args.resume else None
    if resume is not None:
        parser.set_defaults(**{k: resume["args"][k] for k in RUN_FLAGS})
        args = parser.parse_args(argv)
    cli.check_limits("train.py", args, LIMITS)
    if args.pretrained and not args.pretrained.startswith(("http://", "https://")) \
            and not os.path.isfile(args.pretrained):
        sys.exit(f"train.py: --pretrained: no such file {args.pretrained} (expected a checkpoint file or an "
                 "http(s):// URL)")
    missing = [t for t in (args.teacher or []) if resume is None and not os.path.isfile(t)]
    if missing:
        sys.exit(f"train.py: --teacher: no such file {missing[0]} (expected a checkpoint file)")
    args.teacher = args.teacher and [os.path.abspath(t) for t in args.teacher]
    cli.check_device("train.py", args.device)
    args.data = args.data or data.find_default_data()
    if args.data != "synthetic":
        args.data = os.path.abspath(args.data)  # the checkpoint then names data that eval.py finds from anywhere
    args.ferplus = args.ferplus and os.path.abspath(args.ferplus)
    if resume is None:
        return args, None
    saved, path = resume["args"], os.path.join(args.out_dir, "ckpt.pt")
    changed = [f"{cli.flag(k)} {getattr(args, k)} (the run has {saved[k]})" for k in changed_run_flags(args, saved)]
    if changed:
        sys.exit(f"train.py: --resume: {', '.join(changed)}: a resumed run keeps the flags of {path}; only "
                 f"{', '.join(map(cli.flag, RESUME_MAY_CHANGE))} may change (start a new --out-dir to change others)")
    if args.epochs != saved["epochs"] and args.max_iters == saved["max_iters"] != 0:
        sys.exit(f"train.py: --resume: --epochs: the length of this run is --max-iters {saved['max_iters']}, which "
                 "overrides --epochs; change --max-iters, or add --max-iters 0 to count in epochs")
    return args, resume


def read_resume(out_dir):
    """OUT_DIR/ckpt.pt, if it holds a run this train.py can continue; else the run ends in one line saying why."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        sys.exit(f"train.py: --resume: no checkpoint at {path}")
    try:
        resume = read_checkpoint(path)
    except ValueError as e:
        sys.exit(f"train.py: --resume: {e}")
    if "optimizer" not in resume or "model" not in resume:
        sys.exit(f"train.py: --resume: {path} holds a model's weights only (a file to ship, as export.py writes and "
                 f"weights/ holds), not a run to continue; start a run from it in another --out-dir with "
                 f"--pretrained {path}")
    missing = [cli.flag(k) for k in RUN_FLAGS if k not in resume.get("args", {})]
    if missing:
        sys.exit(f"train.py: --resume: {path} lacks the run flags {' '.join(missing)} (written by another version of "
                 f"train.py?), so its run cannot be continued; start a new run in another --out-dir (--pretrained "
                 f"{path} starts it from these weights)")
    return resume


def changed_run_flags(args, saved):
    """The run flags that a resumed run may not change whose value in `args` is not the one in `saved`."""
    return [k for k in RUN_FLAGS if k not in RESUME_MAY_CHANGE and getattr(args, k) != saved.get(k)]


# -----------------------------------------------------------------------------
# the pieces of a step: the lr schedule, weight decay's groups, the EMA, accuracy

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
def update_ema(ema, model, decay):
    ema, live = ema.state_dict(), model.state_dict()
    floats = [k for k in ema if ema[k].dtype.is_floating_point]
    torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], 1.0 - decay)
    for k in ema.keys() - set(floats):
        ema[k].copy_(live[k])  # BatchNorm's num_batches_tracked


def accuracy(logits, y):
    """Share of argmax predictions equal to y: classes (N,), or the most likely class of distributions (N, C)."""
    return (logits.argmax(-1) == data.target_classes(y)).double().mean().item()


# -----------------------------------------------------------------------------
# a run: its state, set up from the flags (and restored from the checkpoint it resumes)

@dataclass
class Run:
    """The state of a run, built by setup and passed to every step below. The fields iter ... metrics and model,
    ema, optimizer are saved in the checkpoints under their own names (checkpoint_state)."""
    args: argparse.Namespace  # the flags (a resumed run's), with the defaults setup works out filled in
    device: torch.device
    rank: int  # this process's rank under torchrun; 0 alone logs and writes files
    world: int  # the number of processes (1 without torchrun)
    train_x: torch.Tensor  # (N, 48, 48) uint8 training faces, whole on the device
    train_y: torch.Tensor  # (N,) classes, or (N, C) distributions: FER+'s votes (soft, draw), --teacher's targets
    val: tuple  # (faces, classes) of the validation split, on the CPU: model selection
    test: tuple  # (faces, classes) of the test split, on the CPU: final_test
    class_names: tuple  # FER2013's 7 or FER+'s 8 (the checkpoints keep them in the model's config)
    iters_per_epoch: int
    max_iters: int  # the run's length (--max-iters, or --epochs epochs)
    eval_interval: int  # iterations between evaluations (--eval-interval, or one epoch)
    model: EmoNeXt  # the live weights, which the optimizer trains
    ema: EmoNeXt  # their EMA, which is validated, kept as best and tested
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast  # bf16 under --amp, else a no-op
    ckpt_path: str  # OUT_DIR/ckpt.pt: the latest state, for --resume
    best_path: str  # OUT_DIR/best.pt: the state with the best val accuracy so far
    train_model: torch.nn.Module | None = None  # what train_step calls: DDP and/or compiled
    iter: int = 0  # iterations done
    best_val_acc: float = -1.0  # of the EMA so far
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    metrics: list = field(default_factory=list)  # metrics.csv's rows, one per evaluation
    bad_in_a_row: int = 0  # non-finite steps in a row up to now (0 on resume)
    started: float = field(default_factory=time.time)  # when the run started, less the time it ran before a resume
    window: dict = field(default_factory=dict)  # sums since the last row: loss, steps, correct, faces, iters


def setup(args, resume, rank=0, world=1):
    """The Run: the data on the device, the model, its EMA and the optimizer, restored from `resume` if given; fills
    in the defaults of --epochs and --warmup."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    splits = load_data(args)
    class_names = data.class_names(args.labels)
    if args.teacher:
        splits["train"] = splits["train"][0], teacher_targets(args, splits, class_names, device, rank)
    train_x, train_y = (t.to(device) for t in splits["train"])  # augmented on the device, batch by batch
    args.epochs = args.epochs or (3 if args.data == "synthetic" else 32)
    iters_per_epoch = len(train_y) // args.batch_size
    if iters_per_epoch == 0:
        sys.exit(f"train.py: {len(train_y)} training faces is fewer than one batch of {args.batch_size}")
    max_iters = args.max_iters or args.epochs * iters_per_epoch
    args.warmup = min(iters_per_epoch, max_iters) if args.warmup is None else args.warmup
    model = build_model(args, class_names, device, resuming=resume is not None)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=device.type == "cuda")
    run = Run(args, device, rank, world, train_x, train_y, splits["val"], splits["test"], class_names,
              iters_per_epoch, max_iters, args.eval_interval or iters_per_epoch, model,
              copy.deepcopy(model).eval().requires_grad_(False), optimizer,
              torch.autocast(device.type, torch.bfloat16, enabled=args.amp),
              os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "best.pt"))
    if resume is not None:
        restore(run, resume)
    if rank:  # drop-path masks: a stream per process, apart from the (seed, iteration) augmentation seeds
        torch.manual_seed(args.seed * 1_000_003 + run.iter + rank * 2 ** 40)
    if emonext.kernels is not None:
        emonext.kernels.set_backend(args.kernels)
        print(emonext.kernels.describe(device))
    elif args.kernels != "torch":
        print("kernels/ not importable: plain PyTorch everywhere")
    run.train_model = distributed_model(model) if world > 1 else model
    run.train_model = torch.compile(run.train_model) if args.compile else run.train_model
    print(f"EmoNeXt-{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, img_size "
          f"{args.img_size}, in_chans {args.in_chans}, {max_iters} iterations of {args.batch_size} "
          f"({max_iters / iters_per_epoch:.1f} epochs)"
          + (f", {world} processes of {args.batch_size // world} (DDP, {dist.get_backend()})" if world > 1 else ""))
    return run


def load_data(args):
    """The splits of --data; when it has no val split, --val-fraction of train is held out as val."""
    try:
        splits, description = data.load_dataset(args.data, args.skip_bad_rows, args.labels, args.ferplus)
        print(description)
        if len(splits["val"][1]) == 0:
            splits = data.hold_out(splits, args.val_fraction, args.seed)
            print(f"no val split: {len(splits['val'][1])} faces ({args.val_fraction:g} of each class of train, drawn "
                  f"with seed {args.seed}) held out of train as val, {len(splits['train'][1])} left to train on; "
                  + ("the test split is kept for the final test" if len(splits["test"][1]) else "there is no test "
                                                                                                  "split"))
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    names = data.class_names(args.labels)
    counts = torch.bincount(data.target_classes(splits["train"][1]), minlength=len(names)).tolist()
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        print(f"train.py: warning: the training split has no faces of {', '.join(empty)}; the model cannot learn to "
              "predict them", file=sys.stderr)
    return splits


def teacher_targets(args, splits, class_names, device, rank):
    """(N, C) training targets of a --teacher run: (1 - W) x the labels as distributions + W x the teachers' mean
    probabilities on the training faces, plain and unaugmented. Those are computed once and kept in
    OUT_DIR/teacher.pt with the teachers' paths; a resumed run reads them there, so the teachers never run in the
    training loop and need not be there any more."""
    x, y = splits["train"]
    path = os.path.join(args.out_dir, "teacher.pt")
    try:
        cache = read_checkpoint(path) if os.path.exists(path) else {}
    except ValueError as e:  # damaged: computed again below
        print(f"--teacher: {e}; the probabilities are computed again")
        cache = {}
    probs = cache.get("probs")
    if cache.get("teachers") == args.teacher and probs is not None and probs.shape == (len(x), len(class_names)):
        print(f"--teacher: the probabilities of {len(args.teacher)} teachers from {path}")
    else:
        probs = teacher_probs(args.teacher, x, splits["val"], class_names, device)
        if rank == 0:
            save_checkpoint({"teachers": args.teacher, "probs": probs}, path)
    return (1 - args.teacher_weight) * data.soft_targets(y, len(class_names)) + args.teacher_weight * probs


def teacher_probs(paths, x, val, class_names, device):
    """The mean (N, C) of the probabilities of the checkpoints `paths` (EMA weights, plain input) on the faces x;
    prints each one's val accuracy and the mean's."""
    total, val_total = 0, 0
    for path in paths:
        try:
            model = EmoNeXt.from_checkpoint(path).to(device)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            sys.exit(load_failure("--teacher", path, e))
        if model.config.class_names != tuple(class_names):
            sys.exit(f"train.py: --teacher {path}: its classes ({', '.join(model.config.class_names)}) are not "
                     f"this run's ({', '.join(class_names)})")
        val_probs = model.predict_logits(val[0]).softmax(-1)
        print(f"--teacher {path}: val {100 * accuracy(val_probs, val[1]):.2f}% (plain)")
        total, val_total = total + model.predict_logits(x).softmax(-1), val_total + val_probs
    print(f"--teacher: the mean of {len(paths)}: val {100 * accuracy(val_total, val[1]):.2f}% (plain)")
    return total / len(paths)


def load_failure(flag, path, e):
    """The one line a checkpoint that would not load ends the run with: the flag, the path (once) and why."""
    return f"train.py: {flag}: {'' if path in str(e) else f'{path}: '}{e}"


def build_model(args, class_names, device, resuming):
    """The model on the device, channels-last, from --pretrained unless resuming."""
    model = EmoNeXt.from_size(args.model, img_size=args.img_size, in_chans=args.in_chans, stem_stride=args.stem_stride,
                              num_classes=len(class_names),
                              drop_path_rate=args.drop_path, layer_scale_init=args.layer_scale_init,
                              label_smoothing=args.label_smoothing, sa_weight=args.sa_weight,
                              class_names=tuple(class_names))
    if args.pretrained and not resuming:
        try:
            load_weights(model, args.pretrained)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # unreachable, unreadable, foreign
            sys.exit(load_failure("--pretrained", args.pretrained, e))
    # channels-last on every device: the blocks' permutes become free and CPU depthwise convs run their fast path
    return model.to(device, memory_format=torch.channels_last)


def restore(run, resume):
    """Puts the checkpoint back into the run set up for it: weights, EMA, optimizer, progress and the random number
    generators, so the run goes on as if it had not stopped. A finished run ends here; a changed length says how
    it moves the lr."""
    it, saved = resume["iter"], SimpleNamespace(**resume["args"])
    if it >= run.max_iters:
        sys.exit(f"train.py: --resume: the run in {run.args.out_dir} is finished ({it} of {run.max_iters} "
                 f"iterations), nothing to train; give a larger --epochs or --max-iters to train it longer, or test "
                 f"it with python eval.py {run.best_path}")
    saved_max = saved.max_iters or saved.epochs * run.iters_per_epoch
    if run.max_iters != saved_max:
        print(f"--resume: {saved_max} -> {run.max_iters} iterations; the cosine decay is recomputed to end at "
              f"iteration {run.max_iters}, so the lr at iteration {it} goes from {lr_at(it, saved, saved_max):.3e} to "
              f"{lr_at(it, run.args, run.max_iters):.3e}")
    for name in ("model", "ema", "optimizer"):
        getattr(run, name).load_state_dict(resume[name])
    run.iter, run.best_val_acc, run.nonfinite_steps = it, resume["best_val_acc"], resume["nonfinite_steps"]
    run.metrics, run.started = resume.get("metrics", []), time.time() - resume.get("elapsed_s", 0.0)
    torch.set_rng_state(resume["rng_cpu"])
    if run.device.type == "cuda" and "rng_cuda" in resume:
        torch.cuda.set_rng_state(resume["rng_cuda"])
    print(f"resuming {run.ckpt_path} at iteration {run.iter}/{run.max_iters}")


def checkpoint_state(run):
    """What restore puts back, and the model's config and the run flags, which eval.py and --resume read."""
    state = {name: getattr(run, name).state_dict() for name in ("model", "ema", "optimizer")}
    state.update({name: getattr(run, name) for name in ("iter", "best_val_acc", "nonfinite_steps", "metrics")},
                 config=config_dict(run.model), args=vars(run.args), elapsed_s=time.time() - run.started,
                 rng_cpu=torch.get_rng_state())
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


# -----------------------------------------------------------------------------
# training, step by step

def epoch_batches(run):
    """Index batches from run.iter to the end of its epoch. One permutation per epoch from (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""
    bs = run.args.batch_size
    epoch, offset = divmod(run.iter, run.iters_per_epoch)
    order = torch.randperm(len(run.train_y), generator=torch.Generator().manual_seed(run.args.seed * 100_003 + epoch))
    for start in range(offset * bs, run.iters_per_epoch * bs, bs):
        yield order[start:start + bs].to(run.device)


def training_batch(run, idx, first, share):
    """This process's rows first..first+share of the global batch idx: augmented faces (b, 1, S, S) channels-last and
    their targets: classes (b,), or distributions (b, C) for ferplus-soft, --teacher and mixed batches. Everything
    random is drawn for the global batch from (seed, iteration), so any number of processes draws alike and a
    resumed run draws what it would have. Mixing pairs each face with the global batch reversed (timm's pairing),
    whose rows this process augments too when they are another process's."""
    args, total = run.args, len(idx)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + run.iter)  # augmentation stream from (seed, iteration)
    pose = dict(rotate=args.rotate, scale=(1 - args.zoom, 1 + args.zoom), translate=args.shift, vflip=args.vflip,
                framing=args.framing)
    start = gen.get_state()  # the partner rows' augmentation draws the same poses
    xb = data.augment(run.train_x[idx[first:first + share]], args.img_size, gen, rows=(first, total), **pose)
    yb = run.train_y[idx]  # (B,) classes, or (B, C) distributions (see Run.train_y)
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
    BatchNorm statistics are then restored, and the run stops after --max-bad-steps such steps in a row). Adds the
    step to the sums of the next metrics row; returns (logits, targets, loss, ce, sa, lr)."""
    args, model = run.args, run.model
    share = len(idx) // run.world
    xb, yb = training_batch(run, idx, run.rank * share, share)
    lr = lr_at(run.iter, args, run.max_iters)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    bn_stats = [b.clone() for b in model.buffers()]  # the STN's BatchNorm statistics, to undo a bad batch
    with run.autocast:
        logits, loss, (ce, sa) = run.train_model(xb, yb, loss_parts=True)
    loss_ok = all_processes(torch.isfinite(loss), run.device)
    if loss_ok:
        loss.backward()  # under DDP the gradients are averaged here, so grad_norm is the same in every process
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if loss_ok and torch.isfinite(grad_norm):
        run.optimizer.step()
        update_ema(run.ema, model, min(args.ema_decay, (1 + run.iter) / (10 + run.iter)))
        run.bad_in_a_row = 0
    else:
        torch._foreach_copy_(list(model.buffers()), bn_stats)
        run.nonfinite_steps += 1
        run.bad_in_a_row += 1
        mean_loss = sum_over_processes([loss.item()], run.device)[0] / run.world  # NaN if any process's is
        print(f"iter {run.iter}: non-finite loss or gradient ({mean_loss:.4g}), step skipped "
              f"({run.bad_in_a_row} in a row, {run.nonfinite_steps} in all)")
        if run.bad_in_a_row >= args.max_bad_steps:
            stop(run, f"train.py: stopping: {run.bad_in_a_row} non-finite steps in a row at iteration {run.iter}; "
                      f"the last good checkpoint is {run.ckpt_path} (try a lower --lr)")
    run.optimizer.zero_grad(set_to_none=True)
    run.iter += 1
    # the sums stay tensors (no wait for the device each step); a skipped step adds nothing
    ok, correct = torch.isfinite(loss.detach()), (logits.detach().argmax(-1) == data.target_classes(yb)).sum()
    for key, value in (("loss", torch.where(ok, loss.detach().float(), 0.0)), ("steps", ok.float()),
                       ("correct", correct * ok), ("faces", len(yb) * ok), ("iters", 1)):
        run.window[key] = run.window.get(key, 0) + value
    return logits, yb, loss, ce, sa, lr


def log_progress(run, logits, yb, loss, ce, sa, lr, seconds, iters):
    """The last step's loss and accuracy over the global batch, its lr, images/s over the last `iters` steps
    (all processes, and per process under DDP) and the time left."""
    world, sums = run.world, sum_over_processes([loss.item(), ce.item(), accuracy(logits, yb)], run.device)
    loss, ce, acc = (v / world for v in sums)
    speed = iters * run.args.batch_size / seconds
    m, s = divmod(int((run.max_iters - run.iter) * seconds / iters), 60)
    per_process = f" ({speed / world:.0f} per process)" if world > 1 else ""
    eta = f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"
    print(f"iter {run.iter}/{run.max_iters} | loss {loss:.4f} (ce {ce:.4f} sa {sa.item():.2e}) | acc {100 * acc:.1f}% "
          f"| lr {lr:.2e} | {speed:.0f} img/s{per_process} | eta {eta}", flush=True)


# -----------------------------------------------------------------------------
# evaluate and save: the val accuracy, the run's record (run_record.py), ckpt.pt and best.pt

def evaluate_and_save(run):
    """Scores the EMA weights on the validation split, saves the record, ckpt.pt and (if improved) best.pt; returns
    the seconds it took."""
    t_eval, (x, y) = time.time(), run.val
    lo, hi = len(y) * run.rank // run.world, len(y) * (run.rank + 1) // run.world  # each process scores its slice
    logits = run.ema.predict_logits(x[lo:hi], amp=run.args.amp)
    correct, = sum_over_processes([(logits.argmax(-1) == y[lo:hi]).sum().item()], run.device)
    val_acc = correct / len(y) if len(y) else math.nan  # the same in every process; nan: the mean of no faces
    finite = all(torch.isfinite(t).all() for t in run.model.state_dict().values() if t.dtype.is_floating_point)
    if not all_processes(finite, run.device):
        stop(run, f"train.py: non-finite weights at iteration {run.iter}; not saving over {run.ckpt_path}")
    improved = val_acc > run.best_val_acc
    run.best_val_acc = max(run.best_val_acc, val_acc)
    run.metrics.append(metrics_row(run, val_acc, t_eval))
    save(run, best=improved, with_record=True)
    print(f"epoch {run.iter / run.iters_per_epoch:.2f} | iter {run.iter} | val acc (EMA) {100 * val_acc:.2f}% | "
          f"best {100 * run.best_val_acc:.2f}%{' (saved)' if improved else ''} | eval "
          f"{time.time() - t_eval:.1f}s", flush=True)
    run.model.train()
    run.window = {"since": time.time()}  # the next row's images/s leaves this evaluation out
    return time.time() - t_eval


def metrics_row(run, val_acc, t_eval):
    """This evaluation's row of metrics.csv: the training loss and accuracy over the steps since the last row (all
    processes), the lr of the last step, val accuracy, images/s over those steps without the evaluations."""
    w = run.window
    sums = [float(w.get(k, 0)) for k in ("loss", "steps", "correct", "faces")]
    loss, steps, correct, faces = sum_over_processes(sums, run.device)
    seconds = max(t_eval - w.get("since", run.started), 1e-9)
    return {"iteration": run.iter, "epoch": round(run.iter / run.iters_per_epoch, 4),
            "lr": float(f"{lr_at(run.iter - 1, run.args, run.max_iters):.4e}"),
            "train_loss": round(loss / steps, 5) if steps else math.nan,
            "train_acc": round(correct / faces, 5) if faces else math.nan, "val_acc": round(val_acc, 5),
            "images_per_s": round(w.get("iters", 0) * run.args.batch_size / seconds, 1),
            "elapsed_s": round(time.time() - run.started, 1)}


def save(run, best=False, with_record=False):
    """Rank 0 writes the run's record (with_record), best.pt (if best; before ckpt.pt, so a kill between the two
    resumes from the older ckpt.pt) and ckpt.pt. A write that fails (a full disk, a read-only out-dir) stops every
    process in one line; the files written before stay whole."""
    failed = ""
    if run.rank == 0:  # the other processes hold the same weights
        try:
            if with_record:
                run_record.write(run.args.out_dir, run.metrics, run.ema, run.val[0][:16])
            state = checkpoint_state(run)
            for path in (run.best_path, run.ckpt_path) if best else (run.ckpt_path,):
                save_checkpoint(state, path)
        except OSError as e:
            failed = e.strerror
    if not all_processes(not failed, run.device):
        stop(run, f"train.py: {failed}; stopped at iteration {run.iter}, the files saved before are as they were")


# -----------------------------------------------------------------------------
# how a run ends: early (an error, a signal: every process together), or with the test of best.pt

def stop(run, message, status=1):
    """Ends the run with `message`. Under DDP every process gets here at the same step (see all_processes): rank 0
    says why before any of them exits (torchrun then ends the rest)."""
    if run.world == 1 and status == 1:
        sys.exit(message)
    if run.rank == 0:
        print(message, file=sys.stderr, flush=True)
    if run.world > 1:
        dist.barrier()
    leave_process_group(run)
    sys.exit(status)


def leave_process_group(run):
    if run.world > 1:
        run.train_model = None  # DDP before the process group (end_distributed)
        end_distributed()


@contextlib.contextmanager
def signals_stop_the_run():
    """SIGTERM (schedulers, docker stop) and SIGINT (Ctrl-C) ask the run to stop at the end of its step (main then
    saves ckpt.pt and exits 128 + the signal); a second one ends the process at once. Yields the signals seen."""
    seen = []

    def ask(signum, frame):
        if seen:
            os._exit(128 + signum)  # the files already written are whole (atomic writes)
        seen.append(signum)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: {signal.Signals(signum).name}: stopping at the end of this step, saving ckpt.pt "
                  "(again to stop at once, without saving)", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def save_and_stop(run, signum):
    """ckpt.pt at this step's end, one line saying where and how to resume, exit 128 + signum (all processes)."""
    save(run)
    launch = f"torchrun --nproc_per_node={run.world}" if run.world > 1 else "python"
    stop(run, f"train.py: stopped by {signal.Signals(signum).name} at iteration {run.iter}/{run.max_iters}, saved in "
              f"{run.ckpt_path}; continue with: {launch} train.py --resume --out-dir {shlex.quote(run.args.out_dir)}",
         128 + signum)


def final_test(run):
    """Tests best.pt's EMA weights on the test split (PrivateTest for FER2013), plain and ten-crop: results.json.
    If best.pt is gone the EMA weights in hand are tested (and it says so); a best.pt of another run is refused."""
    test_x, test_y = run.test
    if len(test_y) == 0:
        print(f"done; no test split. best val accuracy {100 * run.best_val_acc:.2f}%, checkpoint {run.best_path}")
        return None
    tested = run.best_path
    if not os.path.exists(run.best_path):
        print(f"train.py: {run.best_path} is gone (removed during the run?); testing the EMA weights in hand "
              f"instead", file=sys.stderr)
        tested = "the last EMA weights"
    else:
        try:
            best = read_checkpoint(run.best_path)
        except ValueError as e:
            sys.exit(f"train.py: final test: {e}")
        differ = [cli.flag(k) for k in changed_run_flags(run.args, best.get("args", {}))]
        if differ or best.get("config") != config_dict(run.model):
            sys.exit(f"train.py: {run.best_path} is not this run's: its {' '.join(differ) or 'model config'} differ "
                     f"from this run's; not testing it (python eval.py {run.best_path} tests it as it is)")
        run.ema.load_state_dict(best["ema"])
    results = {"best_val_acc": run.best_val_acc, "nonfinite_steps": run.nonfinite_steps}
    for tta in ("none", "tencrop"):
        results[f"test_acc_{tta}"] = accuracy(run.ema.predict_logits(test_x, tta, amp=run.args.amp), test_y)
    try:
        run_record.write_results(run.args.out_dir, results)
    except OSError as e:
        sys.exit(f"train.py: {e.strerror}")
    print(f"test accuracy of {tested} (EMA): {100 * results['test_acc_none']:.2f}% plain, "
          f"{100 * results['test_acc_tencrop']:.2f}% ten-crop (best val {100 * run.best_val_acc:.2f}%)")
    return results


# -----------------------------------------------------------------------------
# the story of a run

def main(argv=None):
    args, resume = parse_args(argv)
    # the out-dir proved writable (and ours) before anything is read
    with run_record.out_dir_lock(args.out_dir), signals_stop_the_run() as signals:
        rank, world = init_distributed(args)
        run = setup(args, resume, rank, world)
        run.model.train()
        t_log, it_log = time.time(), run.iter
        while run.iter < run.max_iters:
            for idx in epoch_batches(run):
                step = train_step(run, idx)
                it = run.iter
                if it % args.log_interval == 0 or it == run.max_iters:
                    log_progress(run, *step, time.time() - t_log, it - it_log)
                    t_log, it_log = time.time(), it
                if it % run.eval_interval == 0 or it == run.max_iters:
                    t_log += evaluate_and_save(run)  # keep the evaluation out of the images/s
                if any_process(signals, run.device):  # all processes stop at the same step
                    save_and_stop(run, signals[0] if signals else signal.SIGTERM)
                if it >= run.max_iters:
                    break
        results = final_test(run) if rank == 0 else None  # best.pt is rank 0's file
        leave_process_group(run)
    return results


if __name__ == "__main__":
    record(main)()  # under torchrun, a failing process's traceback goes into torchrun's report
