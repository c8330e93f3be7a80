"""The Python side of .ci/gpu, the budgeted GPU campaign (the bash script runs each stage under its own timeout).

    python -m tools.campaign fer2013 --out OUT --seconds 240       # stage e: FER2013 from scratch, then PrivateTest
    python -m tools.campaign fer2013 --out OUT --seconds 60 --dry-run     # the same on tiny synthetic faces
    python -m tools.campaign summary OUT                            # the final table; exit 1 if a stage failed
    python -m tools.campaign tables OUT                             # every stage's rows, for BENCHMARKS.md

Stage e trains the 64 px CPU recipe of docs/training.md, "How the defaults were chosen" (EmoNeXt-atto, fp32,
eager) unchanged but for the epoch count, so its accuracy reads against the CPU run's (67.79% ten-crop after 42
epochs). Its time budget is kept from outside
train.py: a probe run of PROBE_ITERS iterations (which also runs validation and both test passes, so every path of
the real run is proven on this machine first) measures the step, the evaluation and the fixed costs, and the real
run gets the most epochs (at most the recipe's 42) that fit the stage's seconds with a 10% margin.
"""
import argparse
import glob
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import synthetic
from bench import markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_DATA = os.path.join("data", "fer2013-device.npz.xz")  # ../shared/data's copy for machines without ../shared
RECIPE = {"model": "atto", "img-size": 64, "batch-size": 128, "lr": 1.5e-3, "layer-scale-init": 1, "drop-path": 0,
          "rotate": 10, "zoom": 0.1, "shift": 0.05}  # that 42-epoch run's flags
MAX_EPOCHS, PROBE_ITERS = 42, 60
DRY_RECIPE, DRY_MAX_EPOCHS, DRY_PROBE_ITERS = {**RECIPE, "img-size": 32, "batch-size": 16}, 1, 3


def unpack(xz_path: str) -> str:
    """The .npz beside xz_path, decompressed on first use (written to a temporary name, then renamed)."""
    npz = xz_path.removesuffix(".xz")
    if not os.path.exists(npz):
        if not os.path.exists(xz_path):
            sys.exit(f"tools.campaign: {xz_path} is missing: copy ../shared/data/fer2013-device.npz.xz into data/ "
                     "and let data/ travel with the checkout (BENCHMARKS.md)")
        with lzma.open(xz_path) as src, open(npz + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(npz + ".part", npz)
    return npz


def write_tiny_data(path: str) -> None:
    """Synthetic faces in the device file's layout (train/public_test/private_test x and y), xz-compressed."""
    splits = synthetic.synthetic_faces(n_train=96, n_val=32, n_test=32)
    arrays = {f"{prefix}_{k}": t.numpy() for prefix, split in zip(("train", "public_test", "private_test"),
                                                                  ("train", "val", "test"))
              for k, t in zip("xy", splits[split])}
    with lzma.open(path, "wb") as f:
        np.savez(f, **arrays)


def train(args: list, out_dir: str, timeout: float) -> tuple[int, str, float]:
    """Runs train.py (its output echoed line by line); returns (exit code or "timeout", its output, seconds)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, "--out-dir", out_dir]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0, lines = time.time(), []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        for line in proc.stdout:  # the bash stage's timeout is the hard stop; this one leaves time to report
            print(line, end="", flush=True)
            lines.append(line)
            if time.time() - t0 > timeout:
                proc.kill()
                break
        rc = proc.wait()
    return ("timeout" if time.time() - t0 > timeout else rc), "".join(lines), time.time() - t0


def last_number(pattern: str, log: str, what: str) -> float:
    found = re.findall(pattern, log)
    if not found:
        sys.exit(f"tools.campaign: no {what} in train.py's output (pattern {pattern!r}): has its log format "
                 "changed? tools/campaign.py reads it")
    return float(found[-1])


def plan_epochs(log: str, seconds: float, probe_iters: int, batch: int, iters_per_epoch: int, budget: float,
                max_epochs: int) -> tuple[int, dict]:
    """Epochs that fit `budget` seconds, from a probe's output and wall time, and what the estimate rests on."""
    step_s = batch / last_number(r"\| (\d+) img/s \|", log, "images/s")  # the last interval: warmed up
    eval_s = last_number(r"\| eval ([\d.]+)s", log, "evaluation time")
    fixed_s = max(0.0, seconds - probe_iters * step_s - eval_s)  # start-up, warm-up, final tests, checkpoints
    epoch_s = iters_per_epoch * step_s + eval_s
    epochs = max(0, min(max_epochs, math.floor((0.9 * budget - fixed_s) / epoch_s)))
    return epochs, {"step ms": 1e3 * step_s, "epoch s": epoch_s, "fixed s": fixed_s}


def fer2013(opts) -> None:
    """Stage e: probe, plan, train, report (one JSON line in OUT/e_fer2013.jsonl)."""
    t0 = time.time()
    if opts.dry_run:
        xz, recipe, max_epochs, probe_iters = os.path.join(opts.out, "tiny-faces.npz.xz"), DRY_RECIPE, \
            DRY_MAX_EPOCHS, DRY_PROBE_ITERS
        write_tiny_data(xz)
    else:
        xz, recipe, max_epochs, probe_iters = os.path.join(ROOT, DEVICE_DATA), RECIPE, MAX_EPOCHS, PROBE_ITERS
    npz = unpack(xz)
    batch = recipe["batch-size"]
    with np.load(npz) as d:
        iters_per_epoch = len(d["train_y"]) // batch
    flags = [s for k, v in recipe.items() for s in (f"--{k}", str(v))]
    common = ["--data", npz, *flags, "--log-interval", str(max(1, probe_iters // 3))]
    work = tempfile.mkdtemp(prefix="emonext-fer2013-")  # checkpoints stay out of $OUT, which travels back
    rc, log, seconds = train(common + ["--max-iters", str(probe_iters), "--eval-interval", str(probe_iters)],
                             os.path.join(work, "probe"), opts.seconds - (time.time() - t0))
    if rc != 0:
        sys.exit(f"tools.campaign: the probe run failed ({rc})")
    epochs, basis = plan_epochs(log, seconds, probe_iters, batch, iters_per_epoch,
                                opts.seconds - (time.time() - t0), max_epochs)
    print(f"plan: {epochs} epochs of {iters_per_epoch} iterations ({basis})", flush=True)
    if epochs == 0:
        sys.exit("tools.campaign: not one epoch fits the time left")
    out = os.path.join(work, "run")
    rc, log, seconds = train(common + ["--epochs", str(epochs)], out, opts.seconds - (time.time() - t0))
    if rc != 0:
        sys.exit(f"tools.campaign: the FER2013 run did not finish ({rc})")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    shutil.copy(os.path.join(out, "stn.png"), os.path.join(opts.out, "e_stn.png"))
    row = {"section": "fer2013", "data": os.path.basename(npz), "recipe": " ".join(flags), "epochs": epochs,
           "train+eval s": round(seconds), **{k: round(v, 2) for k, v in basis.items()},
           "best val %": 100 * results["best_val_acc"], "test plain %": 100 * results["test_acc_none"],
           "test ten-crop %": 100 * results["test_acc_tencrop"]}
    with open(os.path.join(opts.out, "e_fer2013.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)


# --- the summary table ---


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def span(values) -> str:
    values = [v for v in values if isinstance(v, float)]
    return "-" if not values else f"{min(values):.2f}x" if len(values) == 1 else f"{min(values):.2f}-{max(values):.2f}x"


def headline(name: str, rows: list[dict], log: str) -> str:
    """One line of a stage's results, or "" when the stage left none."""
    if name == "tests":
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log, re.M)
        return found[-1] if found else ""
    if name == "env" and rows:
        r = rows[-1]
        return f"{r['device']}: copy {r['copy GB/s']:.0f} GB/s, matmul {r['matmul TFLOP/s']:.4g} TFLOP/s"
    if name == "kernels" and rows:
        parts = []
        for section in ("dwconv", "sampler", "dwconv_fp32"):
            fb = [r for r in rows if r["section"] == section and r["pass"] == "f+b"]
            if fb:
                parts.append(f"{section} f+b fused vs eager {span([r['fused vs eager'] for r in fb])}, vs compile "
                             f"{span([r['fused vs compile'] for r in fb])}, "
                             f"{span([r['fused % of floor'] / 100 for r in fb])} the floor")
        return "; ".join(parts)
    if name == "train" and rows:
        return ", ".join(f"{r['variant']} {r['img/s']:.0f}" for r in rows) + f" img/s ({rows[0]['model']}, " \
            f"batch {rows[0]['batch']})"
    if name == "fer2013" and rows:
        r = rows[-1]
        return f"{r['epochs']} epochs, {r['train+eval s']} s: PrivateTest {r['test plain %']:.2f}% plain, " \
            f"{r['test ten-crop %']:.2f}% ten-crop (val {r['best val %']:.2f}%)"
    return ""


def summary(out: str) -> int:
    """Prints one line per stage from OUT/status.tsv and the stages' files; returns 1 if any stage failed."""
    lines = ["| stage | result | seconds (limit) | headline |", "|---|---|---|---|"]
    failed, status = 0, os.path.join(out, "status.tsv")
    if not os.path.exists(status):
        print(f"no stage ran ({status} is missing)")
        return 1
    with open(status) as f:
        stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for letter, name, rc, seconds, limit in stages:
        base = os.path.join(out, f"{letter}_{name}")
        log = open(base + ".log", errors="replace").read() if os.path.exists(base + ".log") else ""
        rows = read_rows(base + ".jsonl")
        head = headline(name, rows, log)
        result = {"0": "ok", "124": "timed out", "137": "timed out", "skipped": "skipped: budget spent"}.get(
            rc, f"failed (exit {rc})") + (f", {len(rows)} rows kept" if rows and rc != "0" else "")
        if rc == "0" and not head:
            result = "no results"
        failed += result != "ok"
        lines.append(f"| {letter} {name} | {result} | {seconds} ({limit}) | {head or '-'} |")
    print("\n".join(lines))
    return int(failed > 0)


def tables(out: str) -> None:
    """Every stage's rows as markdown tables, one per section, for BENCHMARKS.md."""
    for path in sorted(glob.glob(os.path.join(out, "[a-e]_*.jsonl"))):
        rows = read_rows(path)
        for section in dict.fromkeys(r["section"] for r in rows):
            picked = [{k: v for k, v in r.items() if k != "section"} for r in rows if r["section"] == section]
            print(f"### {os.path.basename(path)}: {section}\n\n{markdown(picked)}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("fer2013", help="stage e")
    e.add_argument("--out", required=True)
    e.add_argument("--seconds", type=float, required=True, help="the stage's time limit")
    e.add_argument("--dry-run", action="store_true")
    for name, what in (("summary", "the final table"), ("tables", "every stage's rows as markdown tables")):
        sub.add_parser(name, help=what).add_argument("out")
    opts = p.parse_args(argv)
    if opts.command == "fer2013":
        fer2013(opts)
    elif opts.command == "tables":
        tables(opts.out)
    else:
        sys.exit(summary(opts.out))


if __name__ == "__main__":
    main()
