"""cli.py: what the scripts' flags accept, checked the same way in train.py, eval.py and predict.py: flag names
as typed, a table of limits (a value that cannot work ends the script in one line naming the flag; None passes)
and --device (a name torch does not know, or CUDA where there is none, ends it in one line); the one onnxruntime
session set-up; and that a process without torch imports it."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import cli
from conftest import foreign_onnx

LIMITS = {"batch_size": (lambda v: v >= 1, "at least 1"),
          "lr": (lambda v: v > 0, "more than 0"),  # NaN fails it too: NaN > 0 is False
          "zoom": (lambda v: 0 <= v < 1, "in [0, 1)")}


def exit_line(fn, *args):
    """What fn(*args) ends the script with: one line, which is returned."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("dest, typed", [("lr", "--lr"), ("batch_size", "--batch-size"),
                                         ("max_bad_steps", "--max-bad-steps")])
def test_flag_is_the_flag_as_typed(dest, typed):
    assert cli.flag(dest) == typed


def test_values_within_the_limits_and_none_pass():
    assert cli.check_limits("train.py", SimpleNamespace(batch_size=1, lr=1e-3, zoom=0.0), LIMITS) is None
    # None (a default worked out later) is never tested: these tests would raise TypeError on it
    assert cli.check_limits("train.py", SimpleNamespace(batch_size=None, lr=None, zoom=None), LIMITS) is None


@pytest.mark.parametrize("args, says", [
    (dict(batch_size=0), "eval.py: --batch-size: expected at least 1, got 0"),
    (dict(lr=-1.0), "eval.py: --lr: expected more than 0, got -1.0"),
    (dict(lr=math.nan), "eval.py: --lr: expected more than 0, got nan"),
    (dict(zoom=1.0), "eval.py: --zoom: expected in [0, 1), got 1.0"),
    (dict(batch_size=0, zoom=2.0), "eval.py: --batch-size: expected at least 1, got 0"),  # the table's first
])
def test_a_value_outside_its_limits_ends_in_one_line_naming_the_flag(args, says):
    args = SimpleNamespace(**{"batch_size": 32, "lr": 1e-3, "zoom": 0.1, **args})
    assert exit_line(cli.check_limits, "eval.py", args, LIMITS) == says


def test_a_device_torch_does_not_know_ends_in_one_line():
    for name in ("gpu", "cuda:x", ""):
        assert exit_line(cli.check_device, "predict.py", name) == \
            f"predict.py: --device: expected cpu, cuda or cuda:N, got {name!r}"


def test_cuda_without_a_gpu_ends_in_one_line_and_cpu_is_always_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        assert exit_line(cli.check_device, "train.py", name) == (
            f"train.py: --device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
            "use --device cpu")
    assert cli.check_device("train.py", "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU: the device as asked
    assert cli.check_device("train.py", "cuda:1") == torch.device("cuda", 1)


def test_cli_imports_without_torch():
    """A torch-free process (an .onnx model served without torch) imports cli and never loads torch through it."""
    code = "import sys; sys.modules['torch'] = None; import cli; print(cli.flag('batch_size'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(cli.__file__)))
    assert out.returncode == 0 and out.stdout == "--batch-size\n", out.stderr


def test_onnx_session_sets_the_threads_and_says_what_cannot_load(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path, garbage = foreign_onnx(tmp_path / "id.onnx"), tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    options = cli.onnx_session(str(path), threads=2).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert cli.onnx_session(str(path)).get_session_options().intra_op_num_threads == 0  # onnxruntime's choice
    with pytest.raises(ValueError, match=f"^not found: {tmp_path / 'gone.onnx'}$"):
        cli.onnx_session(str(tmp_path / "gone.onnx"))
    with pytest.raises(ValueError, match=r"garbage.onnx: onnxruntime cannot load it \(") as e:
        cli.onnx_session(str(garbage))
    assert "\n" not in str(e.value)


def test_an_onnx_file_is_known_by_its_name_or_its_first_byte(tmp_path):
    renamed = foreign_onnx(str(tmp_path / "model.bin"))
    ckpt = tmp_path / "model.pt"
    torch.save({"config": {}}, ckpt)
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04N.")
    assert cli.is_onnx(renamed) and cli.is_onnx(tmp_path / "absent.ONNX")
    assert not cli.is_onnx(ckpt) and not cli.is_onnx(tmp_path / "pickle.pt") and not cli.is_onnx(tmp_path / "absent.pt")
