"""What more than one test file uses: the real data's place, one torch thread per module, conftest's models and
faces (`shaken`, `faces`, `random_faces`, FER+'s `faces_with_votes` and `ferplus_args`), `run_emonext_alone` (a
script beside a copy of emonext.py alone), `check_splits`, `one_graph_code` and `largest_int8_weight`."""
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

# only now: these import emonext, which imports kernels/ and so triton
import data  # noqa: E402
import synthetic  # noqa: E402
from emonext import EmoNeXt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FER2013_NPZ = os.path.join(ROOT, "..", "shared", "data", "fer2013.npz")
FERPLUS_HEADER = "Usage,Image name," + ",".join(data.FERPLUS_COLUMNS)  # fer2013new.csv's first line
FER2013_TO_FERPLUS = np.array([4, 5, 6, 1, 3, 2, 0])  # angry, disgust, fear, happy, sad, surprise, neutral


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
    torch.manual_seed(0)
    m = EmoNeXt.from_size("atto", img_size=64, in_chans=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def faces():
    """12 synthetic faces, uint8 (12, 48, 48)."""
    return synthetic.synthetic_faces(n_train=12, n_val=0, n_test=0, seed=4)["train"][0]


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


def random_faces(n, seed=0):
    """n faces of uniform random grey levels, uint8 (n, 48, 48) numpy."""
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


@pytest.fixture(scope="module")
def faces_with_votes(tmp_path_factory):
    """Synthetic faces in the fer2013.npz layout (csv_index included) and a fer2013new.csv of synthetic votes:
    7 for the face's expression and 3 spread at random, so some faces have soft targets and no majority."""
    root = tmp_path_factory.mktemp("ferplus")
    d = synthetic.synthetic_faces(n_train=256, n_val=48, n_test=48, seed=3)
    y = torch.cat([d[name][1] for name in ("train", "val", "test")]).numpy()
    rng = np.random.default_rng(0)
    votes = rng.multinomial(3, np.full(10, 0.1), len(y))
    votes[np.arange(len(y)), FER2013_TO_FERPLUS[y]] += 7
    usage = ["Training"] * 256 + ["PublicTest"] * 48 + ["PrivateTest"] * 48
    (root / "fer2013new.csv").write_text("\n".join([FERPLUS_HEADER] + [
        f"{u},fer{i:07d}.png,{','.join(map(str, v))}" for i, (u, v) in enumerate(zip(usage, votes))]))
    arrays, start = {}, 0
    for name, prefix in (("train", "train"), ("val", "public_test"), ("test", "private_test")):
        x, yy = d[name]
        arrays.update({f"{prefix}_x": x.numpy(), f"{prefix}_y": yy.numpy(),
                       f"{prefix}_csv_index": np.arange(start, start + len(yy))})
        start += len(yy)
    np.savez(root / "faces.npz", **arrays)
    return root


def ferplus_args(root, labels, max_iters=8, *extra):
    """train.py's flags for a short run of atto at 32 px on faces_with_votes with these FER+ labels."""
    return ["--data", str(root / "faces.npz"), "--labels", labels, "--model", "atto", "--img-size", "32",
            "--batch-size", "32", "--max-iters", str(max_iters), "--eval-interval", str(max_iters), "--warmup", "2",
            "--log-interval", "4", "--out-dir", str(root / f"out-{labels}"), "--threads", "1", *extra]


def check_splits(splits, sizes):
    """splits is {"train", "val", "test"} -> (uint8 (N, 48, 48) faces, int64 (N,) labels) with these N."""
    assert set(splits) == {"train", "val", "test"}
    for name, n in zip(("train", "val", "test"), sizes):
        x, y = splits[name]
        assert x.shape == (n, 48, 48) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64


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


def largest_int8_weight(path) -> int:
    """max |w| over the int8 conv and linear weights of a quantised ONNX file (its zero points and scales are scalars
    or 1-d, so not among them); the file must have such weights."""
    onnx = pytest.importorskip("onnx")
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert weights, f"{path}: no int8 weights"
    return max(int(abs(w.astype(int)).max()) for w in weights)


def foreign_onnx(path):
    """Writes an ONNX file that is not one of export.py's (one Identity node, faces -> probs, no metadata) at path."""
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["faces"], ["probs"])], "g",
                         [h.make_tensor_value_info("faces", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 20)]), path)
    return path
