"""
Trains EmoNeXt on FER2013, or on the built-in synthetic faces, on one device. Read it top to bottom.

    python train.py                                      # data/fer2013.{csv,npz} if present, else synthetic faces
    python train.py --data ../shared/data/fer2013.npz --model atto --img-size 64 --epochs 42 --lr 1.5e-3 \\
        --layer-scale-init 1 --drop-path 0 --rotate 10 --zoom 0.1 --shift 0.05   # from scratch on a CPU
    python train.py --data data/fer2013.csv --model tiny --img-size 224 --in-chans 3 --amp --compile \\
        --pretrained https://dl.fbaipublicfiles.com/convnext/convnext_tiny_22k_224.pth --lr 1e-4
    python train.py --resume --out-dir out               # continue the run saved in out/ckpt.pt

Recipe (the official one where it is sound): AdamW, linear warmup then cosine decay from --lr to --min-lr,
label smoothing 0.2, drop path 0.1, EMA of the weights, gradient clipping at 1.0, bf16 autocast with --amp.
Each epoch the EMA weights are scored on the validation split (PublicTest) and the best is kept; at the end the
best is tested on the test split (PrivateTest) with ten-crop and plain inputs.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

import data
import emonext
from emonext import SIZES, EmoNeXt, config_dict, load_weights
from eval import predict, save_stn_picture

# arguments that define a run; --resume takes them from the checkpoint so the run continues unchanged
RUN_ARGS = ("data", "model", "img_size", "in_chans", "batch_size", "epochs", "max_iters", "lr", "min_lr",
            "warmup", "weight_decay", "label_smoothing", "sa_weight", "drop_path", "layer_scale_init", "ema_decay",
            "amp", "pretrained", "seed", "eval_interval", "rotate", "zoom", "shift", "vflip", "skip_bad_rows",
            "max_bad_steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train EmoNeXt on FER2013 (or synthetic faces).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="FER2013 csv / npz / image folder, or 'synthetic' (default: data/fer2013.csv or .npz "
                        "under the repo if present, else the synthetic faces)")
    p.add_argument("--model", default="atto", choices=list(SIZES))
    p.add_argument("--img-size", type=int, default=64, help="faces are resized from 48 to this side")
    p.add_argument("--in-chans", type=int, default=1, choices=(1, 3), help="3 to use RGB ImageNet weights as they are")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default: 30 on FER2013, 8 on synthetic faces")
    p.add_argument("--max-iters", type=int, default=0, help="if > 0, train this many iterations instead of --epochs")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, used exactly as given")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup iterations (default: one epoch)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--sa-weight", type=float, default=1.0, help="weight of the self-attention regulariser")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--layer-scale-init", type=float, default=1e-6, help="initial ConvNeXt layer scale (<= 0: none)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="per-iteration decay of the weight EMA")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; CPUs with AVX512-BF16/AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--kernels", default="auto", help="fused kernels: auto (on CUDA when available), torch, fused")
    p.add_argument("--pretrained", default=None, help="ConvNeXt ImageNet or EmoNeXt weights: path or URL")
    p.add_argument("--rotate", type=float, default=20.0, help="augmentation: rotation up to this many degrees")
    p.add_argument("--zoom", type=float, default=0.2, help="augmentation: zoom by a factor in [1 - zoom, 1 + zoom]")
    p.add_argument("--shift", type=float, default=0.1, help="augmentation: shift up to this fraction of the side")
    p.add_argument("--vflip", action="store_true", help="also flip faces vertically in augmentation")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed csv rows (counted) instead of failing")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT_DIR/ckpt.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-interval", type=int, default=0, help="iterations between evaluations (0: each epoch)")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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


def save_checkpoint(state, path):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, never half of one


def accuracy(logits, y):
    return (logits.argmax(-1) == y).double().mean().item()


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def main(argv=None):
    args = parse_args(argv)
    ckpt_path, best_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "best.pt")
    resume = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"train.py: --resume: no checkpoint at {ckpt_path}")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for k in RUN_ARGS:
            setattr(args, k, resume["args"][k])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # data: uint8 faces, kept whole on the device; augmentation happens there, batch by batch
    try:
        splits, description = data.load_dataset(args.data, args.skip_bad_rows)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    print(description)
    train_x, train_y = (t.to(device) for t in splits["train"])
    val_x, val_y = splits["val"] if len(splits["val"][1]) else splits["test"]
    test_x, test_y = splits["test"]
    if args.epochs is None:
        args.epochs = 8 if args.data == "synthetic" or description.startswith("synthetic") else 30
    iters_per_epoch = len(train_y) // args.batch_size
    if iters_per_epoch == 0:
        sys.exit(f"train.py: {len(train_y)} training faces is fewer than one batch of {args.batch_size}")
    max_iters = args.max_iters or args.epochs * iters_per_epoch
    if args.warmup is None:
        args.warmup = min(iters_per_epoch, max_iters)
    eval_interval = args.eval_interval or iters_per_epoch

    # model, EMA copy, optimizer
    model = EmoNeXt.from_size(args.model, img_size=args.img_size, in_chans=args.in_chans,
                              drop_path_rate=args.drop_path, layer_scale_init=args.layer_scale_init,
                              label_smoothing=args.label_smoothing, sa_weight=args.sa_weight)
    if args.pretrained and resume is None:
        load_weights(model, args.pretrained)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    it, best_acc, nonfinite_total = 0, -1.0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema_model.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        it, best_acc, nonfinite_total = resume["iter"], resume["best_val_acc"], resume["nonfinite_steps"]
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resume:
            torch.cuda.set_rng_state(resume["rng_cuda"])
        print(f"resuming {ckpt_path} at iteration {it}/{max_iters}")
    if emonext.kernels is not None:
        emonext.kernels.set_backend(args.kernels)
        print(emonext.kernels.describe(device))
    elif args.kernels != "torch":
        print("kernels/ not importable: plain PyTorch everywhere")
    train_model = torch.compile(model) if args.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"EmoNeXt-{args.model}: {n_params / 1e6:.2f}M parameters, img_size {args.img_size}, in_chans "
          f"{args.in_chans}, {max_iters} iterations of {args.batch_size} ({max_iters / iters_per_epoch:.1f} epochs)")
    os.makedirs(args.out_dir, exist_ok=True)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp)

    def checkpoint():
        state = {"config": config_dict(model), "model": model.state_dict(), "ema": ema_model.state_dict(),
                 "optimizer": optimizer.state_dict(), "iter": it, "best_val_acc": best_acc,
                 "nonfinite_steps": nonfinite_total, "args": vars(args), "class_names": list(data.CLASS_NAMES),
                 "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    # training loop: one permutation per epoch from (seed, epoch) and one augmentation stream per iteration from
    # (seed, iteration), so a resumed run sees the same batches as an uninterrupted one
    model.train()
    bad_in_a_row, t_log, it_log = 0, time.time(), it
    while it < max_iters:
        epoch, offset = divmod(it, iters_per_epoch)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        for start in range(offset * args.batch_size, iters_per_epoch * args.batch_size, args.batch_size):
            idx = order[start:start + args.batch_size].to(device)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
            xb = data.augment(train_x[idx], args.img_size, gen, rotate=args.rotate,
                              scale=(1 - args.zoom, 1 + args.zoom), translate=args.shift, vflip=args.vflip)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = train_y[idx]
            lr = lr_at(it, args, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            bn_stats = [b.clone() for b in model.buffers()]  # the STN's BatchNorm statistics, to undo a bad batch
            with autocast:
                logits, loss, (ce, sa) = train_model(xb, yb, loss_parts=True)
            if torch.isfinite(loss):
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                optimizer.step()
                update_ema(ema_model, model, min(args.ema_decay, (1 + it) / (10 + it)))
                bad_in_a_row = 0
            else:
                torch._foreach_copy_(list(model.buffers()), bn_stats)
                nonfinite_total += 1
                bad_in_a_row += 1
                print(f"iter {it}: non-finite loss or gradient ({loss.item():.4g}), step skipped "
                      f"({bad_in_a_row} in a row, {nonfinite_total} in all)")
                if bad_in_a_row >= args.max_bad_steps:
                    sys.exit(f"train.py: stopping: {bad_in_a_row} non-finite steps in a row at iteration {it}; "
                             f"the last good checkpoint is {ckpt_path} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            it += 1

            if it % args.log_interval == 0 or it == max_iters:
                dt = time.time() - t_log
                speed = (it - it_log) * args.batch_size / dt
                eta = (max_iters - it) * dt / (it - it_log)
                print(f"iter {it}/{max_iters} | loss {loss.item():.4f} (ce {ce.item():.4f} sa {sa.item():.2e}) | "
                      f"acc {100 * accuracy(logits, yb):.1f}% | lr {lr:.2e} | {speed:.0f} img/s | "
                      f"eta {fmt_time(eta)}", flush=True)
                t_log, it_log = time.time(), it

            if it % eval_interval == 0 or it == max_iters:
                t_eval = time.time()
                val_acc = accuracy(predict(ema_model, val_x, args.img_size, amp=args.amp), val_y)
                save_stn_picture(ema_model, val_x[:16], args.img_size, os.path.join(args.out_dir, "stn.png"))
                if not all_finite(model):
                    sys.exit(f"train.py: non-finite weights at iteration {it}; not saving over {ckpt_path}")
                improved = val_acc > best_acc
                best_acc = max(best_acc, val_acc)
                state = checkpoint()
                if improved:  # best.pt before ckpt.pt: a kill between the two then resumes from the older ckpt.pt
                    save_checkpoint(state, best_path)
                save_checkpoint(state, ckpt_path)
                print(f"epoch {it / iters_per_epoch:.2f} | iter {it} | val acc (EMA) {100 * val_acc:.2f}% | "
                      f"best {100 * best_acc:.2f}%{' (saved)' if improved else ''} | eval "
                      f"{time.time() - t_eval:.1f}s", flush=True)
                model.train()
                t_log += time.time() - t_eval  # keep the evaluation out of the images/s
            if it >= max_iters:
                break

    # final test of the best EMA weights on the test split (PrivateTest for FER2013)
    if len(test_y) == 0:
        print(f"done; no test split. best val accuracy {100 * best_acc:.2f}%, checkpoint {best_path}")
        return None
    ema_model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["ema"])
    results = {"best_val_acc": best_acc, "nonfinite_steps": nonfinite_total}
    for tta in ("none", "tencrop"):
        results[f"test_acc_{tta}"] = accuracy(predict(ema_model, test_x, args.img_size, tta, amp=args.amp), test_y)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"test accuracy of {best_path} (EMA): {100 * results['test_acc_none']:.2f}% plain, "
          f"{100 * results['test_acc_tencrop']:.2f}% ten-crop (best val {100 * best_acc:.2f}%)")
    return results


if __name__ == "__main__":
    main()
