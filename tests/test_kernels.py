"""kernels/__init__.py: what `--kernels auto|torch|fused` runs, in particular on CUDA, decided here without a GPU.

`auto` runs a fused op on CUDA only at the (C, H, W, dtype) a GPU benchmark measured faster (MEASURED_FASTER);
a CPU cannot make a CUDA tensor, so the dispatch functions get an object with a CUDA tensor's device, shape, dtype.
"""
import types

import pytest
import torch

import kernels
from kernels import dwconv_ln, sampler

OPS = [("dwconv_layernorm", kernels.use_dwconv_layernorm, dwconv_ln, "triton_available"),
       ("affine_sample", kernels.use_affine_sample, sampler, "cuda_available")]
T_STAGE1 = (96, 56, 56, torch.bfloat16)


def cuda_like(shape, dtype):
    """What the dispatch reads of a tensor, as a CUDA tensor of this shape and dtype would have it."""
    return types.SimpleNamespace(device=torch.device("cuda"), shape=torch.Size(shape), dtype=dtype, is_cuda=True)


@pytest.fixture
def table(monkeypatch):
    """MEASURED_FASTER emptied for the test (as shipped today); the test adds entries to it."""
    monkeypatch.setattr(kernels, "MEASURED_FASTER", {op: frozenset() for op in kernels.MEASURED_FASTER})
    yield kernels.MEASURED_FASTER
    kernels.set_backend("auto")


def well_formed(op, entry) -> bool:
    """An entry of MEASURED_FASTER as auto_uses_fused compares it: (C, H, W, dtype), which it then matches."""
    return (isinstance(entry, tuple) and len(entry) == 4 and all(isinstance(v, int) for v in entry[:3])
            and isinstance(entry[3], torch.dtype) and kernels.auto_uses_fused(op, "cuda", (1, *entry[:3]), entry[3]))


def test_shipped_table_names_shapes_dtypes(monkeypatch):
    shipped = dict(kernels.MEASURED_FASTER)
    assert list(shipped) == ["dwconv_layernorm", "affine_sample"]  # the two ops, by the names the dispatch asks
    assert all(isinstance(entries, frozenset) for entries in shipped.values())
    for op, entries in shipped.items():
        assert all(well_formed(op, entry) for entry in entries), op
    # the check tells a good entry from bad ones (the shipped table may be empty: it must still be able to fail)
    monkeypatch.setattr(kernels, "MEASURED_FASTER", {**shipped, "dwconv_layernorm": frozenset({T_STAGE1})})
    assert well_formed("dwconv_layernorm", T_STAGE1)
    for bad in ((96, 56, 56), (128, 96, 56, 56), (96, 56, 56, "bfloat16"), [96, 56, 56, torch.bfloat16],
                (192, 28, 28, torch.bfloat16)):  # the last: well typed, but not in the table
        assert not well_formed("dwconv_layernorm", bad), bad


@pytest.mark.parametrize("op", ["dwconv_layernorm", "affine_sample"])
def test_auto_uses_a_fused_op_only_on_cuda_at_a_measured_shape(table, op):
    assert not kernels.auto_uses_fused(op, "cuda", (128, *T_STAGE1[:3]), T_STAGE1[3])  # nothing measured yet
    table[op] = frozenset({T_STAGE1})
    assert kernels.auto_uses_fused(op, "cuda", (128, 96, 56, 56), torch.bfloat16)
    assert kernels.auto_uses_fused(op, "cuda", (7, 96, 56, 56), torch.bfloat16)  # any batch
    assert not kernels.auto_uses_fused(op, "cuda", (128, 96, 56, 56), torch.float32)
    assert not kernels.auto_uses_fused(op, "cuda", (128, 192, 28, 28), torch.bfloat16)
    assert not kernels.auto_uses_fused(op, "cpu", (128, 96, 56, 56), torch.bfloat16)


@pytest.mark.parametrize("op,use,module,available", OPS)
def test_dispatch_on_cuda_follows_the_backend_and_the_table(table, monkeypatch, op, use, module, available):
    x = cuda_like((128, 96, 56, 56), torch.bfloat16)
    monkeypatch.setattr(module, available, lambda: True)
    kernels.set_backend("auto")
    assert not use(x)  # the kernel is there, but no benchmark showed it faster: PyTorch
    table[op] = frozenset({T_STAGE1})
    assert use(x) and not use(cuda_like((128, 96, 56, 56), torch.float32))
    monkeypatch.setattr(module, available, lambda: False)
    assert not use(x)  # measured faster, but not built here
    kernels.set_backend("torch")
    assert not use(x)
    kernels.set_backend("fused")
    assert use(x) and use(torch.zeros(1, 96, 5, 5))  # fused: always the op (on CPU its CPU implementation)


def test_auto_on_cpu_is_pytorch(table):
    table["dwconv_layernorm"] = frozenset({(8, 5, 5, torch.float32)})
    kernels.set_backend("auto")
    x = torch.zeros(2, 8, 5, 5)
    assert not kernels.use_dwconv_layernorm(x) and not kernels.use_affine_sample(x)


def test_describe_says_what_auto_picks(table, monkeypatch):
    kernels.set_backend("auto")
    assert kernels.describe("cpu") == "kernels=auto: dwconv+layernorm -> torch, stn sampler -> torch"
    line = kernels.describe(torch.device("cuda"))
    assert line.count("torch (auto: no shape measured faster on a GPU yet") == 2, line
    monkeypatch.setattr(dwconv_ln, "triton_available", lambda: True)
    table["dwconv_layernorm"] = frozenset({T_STAGE1, (192, 28, 28, torch.bfloat16)})
    line = kernels.describe("cuda")
    assert "dwconv+layernorm -> triton at 192x28x28 bfloat16, 96x56x56 bfloat16 (measured faster), torch " \
           "elsewhere" in line, line
    kernels.set_backend("fused")
    assert kernels.describe("cpu") == "kernels=fused: dwconv+layernorm -> op:cpu, stn sampler -> op:cpu"
    assert "dwconv+layernorm -> triton" in kernels.describe("cuda")


def test_auto_rule_traces_without_graph_breaks(table):
    table["dwconv_layernorm"] = frozenset({(8, 5, 5, torch.float32)})

    def f(x, device_type):
        return x * 2 if kernels.auto_uses_fused("dwconv_layernorm", device_type, x.shape, x.dtype) else x - 1

    torch._dynamo.reset()
    x = torch.ones(2, 8, 5, 5)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x, "cuda"), x * 2)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x, "cpu"), x - 1)
    torch._dynamo.reset()
