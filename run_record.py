"""
What a training run keeps in its --out-dir beside the checkpoints: metrics.csv (a row per evaluation), curves.png
(those rows drawn by figures.py), stn.png (faces beside the STN's warps of them), results.json (the final test), and
train.lock, which keeps a second train.py out of the folder while the run lives. The files are written atomically
(emonext.write_atomically): a kill leaves the old file or the new one.
"""
import contextlib
import csv
import fcntl
import json
import os
import socket
import sys
import time

import torch

import emonext
import figures
from emonext import write_atomically

METRICS = ("iteration", "epoch", "lr", "train_loss", "train_acc", "val_acc", "images_per_s", "elapsed_s")


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """Holds OUT_DIR/train.lock (flock) while the run lives, in the process that writes files (rank 0): a second
    train.py on the same out-dir stops at once, naming the holder. The kernel drops the lock however the process
    ends, kill -9 included. Opening the file also proves the out-dir writable before any data is read."""
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


def write(out_dir, metrics, model, faces):
    """metrics.csv and curves.png of the rows so far (dicts with the METRICS keys), stn.png of `faces` through
    `model`. Raises OSError saying what could not be written."""
    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRICS)
            writer.writeheader()
            writer.writerows(metrics)
    write_atomically(os.path.join(out_dir, "metrics.csv"), write_csv)
    save_png(figures.training_curves(metrics), os.path.join(out_dir, "curves.png"))
    save_stn_picture(model, faces, os.path.join(out_dir, "stn.png"))


def write_results(out_dir, results):
    """results.json: the final test's numbers."""
    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    write_atomically(os.path.join(out_dir, "results.json"), write_json)


@torch.no_grad()
def save_stn_picture(model, x, path):
    """Faces (uint8 (B, 48, 48)) beside what the STN makes of them at the model's img_size (figures.stn_pairs)."""
    model.eval()
    c = model.config
    inputs = emonext.preprocess(x.to(next(model.parameters()).device), c.img_size, c.pixel_mean, c.pixel_std)
    warped, _ = model.stn(inputs.expand(-1, c.in_chans, -1, -1))
    pairs = torch.stack([inputs, warped[:, :1].float()], 1)[:, :, 0]  # (B, 2, S, S), the warp's first channel
    pixels = (pairs * c.pixel_std + c.pixel_mean).clamp(0, 1).mul(255).round().byte().cpu().numpy()
    save_png(figures.stn_pairs(pixels), path)


def save_png(img, path):
    write_atomically(path, lambda tmp: img.save(tmp, format="PNG"))
