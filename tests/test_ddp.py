"""train.py under torchrun (issue 9): 2 gloo processes on CPU against 1 process, resume across world sizes, a
crashing process, a NaN in one process only.

Each 2-process run is `python -m torch.distributed.run --standalone` (a free port each time) running this file,
which calls train.main with the instruments below: one thread per process, on the CPU whatever the machine has,
and a timeout after which torchrun and its processes are killed. The 1-process runs are train.main in this
process. EmoNeXt-atto at 32 px, global batch 32 (16 per process), 8 iterations, drop path 0 (its masks are drawn
per process, see train.py).
"""
import glob
import io
import json
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # when torchrun runs this file as a script

import numpy as np
import pytest
import torch
import torch.distributed as dist

import data
import synthetic
import train
from emonext import EmoNeXt
from test_train import faces_npz  # noqa: F401  (a fixture: 448 / 70 / 70 synthetic faces in an .npz)

ITERS = 8


def instrument(set_attr, records, raise_at=None, nan_from=None):
    """Wraps train.train_step, data.augment and EmoNeXt.forward. Each process appends, per step, the iteration, its
    rows of the global batch and the sum of each augmented face to records/batches.<rank>.jsonl.
    raise_at=[rank, iteration]: that process raises there, after writing the time to records/raised.
    nan_from=[rank, iteration]: that process's loss (its own part; the other processes' stay finite) is NaN from
    that iteration on."""
    step, augment, forward, now = train.train_step, data.augment, EmoNeXt.forward, {}

    def instrumented_step(run, idx):
        now["it"], now["rank"] = run.it, run.rank
        if [run.rank, run.it] == raise_at:
            with open(os.path.join(records, "raised"), "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError(f"injected failure in rank {run.rank} at iteration {run.it}")
        return step(run, idx)

    def instrumented_augment(x, *a, rows, **kw):
        out = augment(x, *a, rows=rows, **kw)
        with open(os.path.join(records, f"batches.{now['rank']}.jsonl"), "a") as f:
            f.write(json.dumps({"it": now["it"], "rows": rows, "sums": out.double().sum((1, 2, 3)).tolist()}) + "\n")
        return out

    def instrumented_forward(self, x, targets=None, loss_parts=False):
        poisoned = nan_from and now["rank"] == nan_from[0] and now["it"] >= nan_from[1]
        if targets is None or not poisoned:
            return forward(self, x, targets, loss_parts)
        logits, loss, parts = forward(self, x, targets, loss_parts=True)  # train_step asks for the parts
        return logits, loss * float("nan"), parts
    set_attr(train, "train_step", instrumented_step)
    set_attr(data, "augment", instrumented_augment)
    set_attr(EmoNeXt, "forward", instrumented_forward)


def worker():
    """One process of a torchrun run: the instruments from $DDP_TEST (JSON), then train.py's entry point."""
    from torch.distributed.elastic.multiprocessing.errors import record
    instrument(setattr, **json.loads(os.environ["DDP_TEST"]))
    record(train.main)(sys.argv[1:])


def run_args(npz, out_dir, *extra):
    return ["--data", npz, "--model", "atto", "--img-size", "32", "--batch-size", "32", "--max-iters", str(ITERS),
            "--eval-interval", "4", "--log-interval", "2", "--warmup", "3", "--drop-path", "0", *resume_args(out_dir),
            *extra]


def resume_args(out_dir):
    """The runtime flags, which --resume does not take from the checkpoint."""
    return ["--out-dir", str(out_dir), "--threads", "1", "--device", "cpu"]


def torchrun(argv, records, timeout=240, **instruments):
    """train.main in 2 processes under torchrun, instrumented (records and torchrun's logs in `records`). Returns
    its exit code, the time it ended, torchrun's own output and each rank's stdout and stderr."""
    logs = os.path.join(records, "torchrun-logs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir", logs,
           "--redirects", "3", os.path.abspath(__file__), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST": json.dumps({"records": str(records), **instruments})}
    proc = subprocess.Popen(cmd, cwd=records, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun ends its processes (each in a session of its own, out of our reach) and exits
        try:
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        pytest.fail(f"torchrun did not finish in {timeout}s: {cmd}")
    ended = time.time()
    ranks = [{s: open(glob.glob(os.path.join(logs, "*", "attempt_0", str(r), f"{s}.log"))[0]).read()
              for s in ("stdout", "stderr")} for r in (0, 1)]
    return SimpleNamespace(returncode=proc.returncode, ended=ended, output=output, ranks=ranks)


def batches(records):
    """{iteration: the sums of the global batch's augmented faces}, from every process's record, rows in place."""
    seen = {}
    for path in sorted(glob.glob(os.path.join(records, "batches.*.jsonl"))):
        for line in open(path):
            r = json.loads(line)
            start, total = r["rows"]
            seen.setdefault(r["it"], [None] * total)[start:start + len(r["sums"])] = r["sums"]
    return seen


def relative_difference(a, b):
    """Relative L2 difference of two whole state dicts (parameters and buffers)."""
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    return (diff / sum((a[k].double() ** 2).sum() for k in keys)).sqrt().item()


def assert_same_run(records, out, reference):
    """Every step saw the reference's faces with the reference's augmentation, and the weights ended within float
    summation order of the reference's. (Of that order: 1.5e-5 here; most of it is in the biases of the convs in
    front of the STN's BatchNorms, whose true gradient is zero and whose float noise AdamW turns into steps.)"""
    seen, expected = batches(records), batches(reference.records)
    assert sorted(seen) == list(range(ITERS))
    for it in range(ITERS):
        assert None not in seen[it] and np.allclose(seen[it], expected[it], rtol=1e-6, atol=1e-6), it
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == ITERS
    for part in ("model", "ema"):
        assert ckpt[part].keys() == reference.ckpt[part].keys()
        assert relative_difference(reference.ckpt[part], ckpt[part]) < 1e-4, part
    return ckpt


LOG = re.compile(r"iter (\d+)/\d+ \| loss ([\d.]+) \(ce ([\d.]+) sa ([\d.e+-]+)\) \| acc ([\d.]+)%")


@pytest.fixture(scope="module")
def reference(faces_npz, tmp_path_factory):
    """The 1-process run every 2-process run is compared with."""
    records = tmp_path_factory.mktemp("one")
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(buf):
        instrument(mp.setattr, str(records))
        train.main(run_args(faces_npz, records / "out"))
    return SimpleNamespace(records=records, out=records / "out", stdout=buf.getvalue(),
                           ckpt=torch.load(records / "out" / "ckpt.pt", weights_only=True))


def test_two_processes_train_as_one(faces_npz, reference, tmp_path):
    """Same faces, augmentation, logged losses, validation and weights (all of them, STN BatchNorm statistics and
    attention included) as one process; rank 0 alone writes one checkpoint and logs; rank 1 prints nothing."""
    out = tmp_path / "out"
    r = torchrun(run_args(faces_npz, out), tmp_path)
    assert r.returncode == 0, r.output[-3000:] + r.ranks[0]["stderr"][-3000:]
    ckpt = assert_same_run(tmp_path, out, reference)
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "curves.png", "metrics.csv", "results.json", "stn.png",
                                       "train.lock"]
    assert r.ranks[1]["stdout"] == ""
    log = r.ranks[0]["stdout"]
    assert "32 (0.6 epochs), 2 processes of 16 (DDP, gloo)" in log
    assert len(re.findall(r"\| \d+ img/s \(\d+ per process\) \|", log)) == ITERS // 2
    ours, theirs = LOG.findall(log), LOG.findall(reference.stdout)
    assert [m[0] for m in ours] == [m[0] for m in theirs] == ["2", "4", "6", "8"]
    for a, b in zip(ours, theirs):  # loss, ce and accuracy over the global batch, as one process logs them
        assert np.allclose([float(v) for v in a[1:]], [float(v) for v in b[1:]], rtol=2e-3, atol=2e-3)
    # the sharded validation counted every face: the same accuracies and the same best checkpoint as one process
    assert ckpt["best_val_acc"] == reference.ckpt["best_val_acc"]
    assert torch.load(out / "best.pt", weights_only=True)["iter"] == torch.load(
        reference.out / "best.pt", weights_only=True)["iter"]
    # a plain checkpoint: no DDP "module." prefix, loadable by one process and by eval.py
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = EmoNeXt.from_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    assert json.load(open(out / "results.json")).keys() == {"best_val_acc", "nonfinite_steps", "test_acc_none",
                                                            "test_acc_tencrop"}


def test_a_crashing_process_ends_the_run_and_one_process_resumes_it(faces_npz, reference, tmp_path, monkeypatch,
                                                                     capsys):
    """Rank 1 raises at iteration 4 (after the checkpoint of iteration 4): the run ends within seconds with a
    non-zero status and torchrun's report names the error; one process then resumes it to the same end."""
    out = tmp_path / "out"
    r = torchrun(run_args(faces_npz, out), tmp_path, raise_at=[1, 4])
    assert r.returncode != 0
    assert r.ended - float(open(tmp_path / "raised").read()) < 30, "the other process was left waiting"
    assert "injected failure in rank 1 at iteration 4" in r.output
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 4 and not os.path.exists(out / "results.json")

    capsys.readouterr()
    instrument(monkeypatch.setattr, str(tmp_path))
    train.main(["--resume", *resume_args(out)])
    assert f"resuming {out / 'ckpt.pt'} at iteration 4/{ITERS}" in capsys.readouterr().out
    assert_same_run(tmp_path, out, reference)


def test_two_processes_resume_a_one_process_run(faces_npz, reference, tmp_path, monkeypatch):
    """A 1-process run that ended at iteration 4 is continued by two processes to the same end."""
    out = tmp_path / "out"
    instrument(monkeypatch.setattr, str(tmp_path), raise_at=[0, 4])
    with pytest.raises(RuntimeError, match="injected failure"):
        train.main(run_args(faces_npz, out))
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 4
    r = torchrun(["--resume", *resume_args(out)], tmp_path)
    assert r.returncode == 0, r.output[-3000:] + r.ranks[0]["stderr"][-3000:]
    assert f"resuming {out / 'ckpt.pt'} at iteration 4/{ITERS}" in r.ranks[0]["stdout"]
    assert_same_run(tmp_path, out, reference)


def test_a_nan_in_one_process_stops_all_of_them_together(faces_npz, tmp_path):
    """Only rank 1's loss is NaN from iteration 2: both processes skip steps 2 and 3 (rank 0's finite loss is not
    backpropagated, which would leave it waiting for rank 1 in DDP's gradient all-reduce) and stop together after
    --max-bad-steps 2 with rank 0's message; the last checkpoint is finite."""
    out = tmp_path / "out"
    r = torchrun(run_args(faces_npz, out, "--eval-interval", "2", "--max-bad-steps", "2"), tmp_path, nan_from=[1, 2])
    assert r.returncode != 0
    skipped = re.findall(r"iter (\d): non-finite loss or gradient \(nan\), step skipped", r.ranks[0]["stdout"])
    assert skipped == ["2", "3"]  # the loss logged is the mean over the processes: NaN
    stop = "train.py: stopping: 2 non-finite steps in a row at iteration 3"
    assert stop in r.ranks[0]["stderr"] and stop not in r.ranks[1]["stderr"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_flags_that_cannot_work_under_torchrun_are_refused_before_it_starts(faces_npz, tmp_path, monkeypatch):
    """A global batch that does not split evenly, a device pinned for every process: one clear error each, before
    any process group exists (this test plays rank 0 of 2; a started group would wait for rank 1)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="train.py: --batch-size 33 does not split evenly over 2 processes"):
        train.main(run_args(faces_npz, tmp_path, "--batch-size", "33"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the no-GPU check, to the torchrun one
    with pytest.raises(SystemExit, match="train.py: --device cuda:1: under torchrun give cuda; each process takes"):
        train.main(run_args(faces_npz, tmp_path, "--device", "cuda:1"))
    assert not dist.is_initialized()


def test_augment_draws_the_whole_batch_for_any_split():
    x = synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=0)["train"][0]
    whole = data.augment(x, 32, torch.Generator().manual_seed(5))
    parts = [data.augment(x[i:i + 4], 32, torch.Generator().manual_seed(5), rows=(i, 12)) for i in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[1], data.augment(x[4:8], 32, torch.Generator().manual_seed(5)))


if __name__ == "__main__":
    worker()
