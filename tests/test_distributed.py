"""distributed.py in one process: the sums and decisions without a process group, and the global-batch layers in a
1-process gloo group, where the global batch is the local one (2-process runs: test_train.py, under torchrun)."""
import copy

import pytest
import torch
import torch.distributed as dist

import distributed
from emonext import BatchSelfAttention, EmoNeXt


def test_without_a_process_group_numbers_and_decisions_are_this_process_own():
    cpu = torch.device("cpu")
    assert distributed.sum_over_processes([1.5, 2.0], cpu) == [1.5, 2.0]
    assert distributed.all_processes(True, cpu) and not distributed.all_processes(False, cpu)
    assert distributed.any_process([15], cpu) and not distributed.any_process([], cpu)
    distributed.end_distributed()  # no group: nothing to end


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        distributed.end_distributed()


def test_global_batch_layers_in_one_process_are_the_plain_ones(one_process_group):
    torch.manual_seed(0)
    model = EmoNeXt.from_size("atto", img_size=32, in_chans=1).train()
    global_model = copy.deepcopy(model)
    distributed.make_batch_global(global_model)
    kinds = {type(m) for m in global_model.modules()}
    assert distributed.GlobalBatchNorm2d in kinds and distributed.GlobalBatchSelfAttention in kinds
    assert torch.nn.BatchNorm2d not in kinds and BatchSelfAttention not in kinds
    assert global_model.state_dict().keys() == model.state_dict().keys()  # no state of their own
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 7
    (logits, loss), (g_logits, g_loss) = model(x, y), global_model(x, y)
    torch.testing.assert_close(g_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_loss, loss, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # the running statistics move alike (unbiased variance)
        torch.testing.assert_close(global_model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert distributed.sum_over_processes([2.0], torch.device("cpu")) == [2.0]
