import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FER2013_NPZ = os.path.join(ROOT, "..", "shared", "data", "fer2013.npz")


def save_npz(path, splits):
    """Writes splits as synthetic.synthetic_faces gives them ({"train" | "val" | "test": (faces, labels)}) as a
    FER2013 .npz (Training, PublicTest, PrivateTest)."""
    np.savez(path, **{f"{name}_{xy}": t.numpy() for split, name in (("train", "train"), ("val", "public_test"),
                                                                   ("test", "private_test"))
                      for xy, t in zip("xy", splits[split])})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread per test module: on a shared 2-core machine more threads oversubscribe and crawl;
    train.py's --threads may change it inside a test, so it is restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shaken():
    """An untrained EmoNeXt-atto (64 px, grey) in eval mode whose weights are shaken so that different faces get
    clearly different probabilities: two inference paths compare without training a model."""
    from emonext import EmoNeXt  # not at the top: emonext imports kernels/, so triton, after TRITON_INTERPRET is set
    torch.manual_seed(0)
    m = EmoNeXt.from_size("atto", img_size=64, in_chans=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture
def run_emonext_alone(tmp_path):
    """run(script) runs a Python script in tmp_path beside a copy of emonext.py and nothing else of the repo (no
    PYTHONPATH; the folder is its sys.argv[1]) and returns its stdout; a failing script fails the test with its stderr."""
    shutil.copy(os.path.join(ROOT, "emonext.py"), tmp_path / "emonext.py")

    def run(script):
        (tmp_path / "run.py").write_text(script)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "run.py", str(tmp_path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    return run


def one_graph_code(fn, *args):
    """The code of the one graph torch.compile would make of fn(*args), asserting that it traces without graph
    breaks (dynamo only: no inductor, seconds)."""
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    return "\n".join(g.code for g in explanation.graphs)
