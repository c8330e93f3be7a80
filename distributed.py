"""
The pieces train.py needs under torchrun (DistributedDataParallel, one process per GPU or per CPU share with gloo):
starting and ending the process group, sums and decisions all processes share, and the two parts of EmoNeXt that
look across the batch made to look across the global batch, so that N processes train as one.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # collectives with autograd that torch.compile traces
from torch.nn.parallel import DistributedDataParallel as DDP

from emonext import BatchSelfAttention


def init_distributed(args):
    """(rank, world size) from torchrun's environment, with the process group started: NCCL on CUDA (each process
    on the GPU of its local rank), gloo on CPU. One process, however launched, gets (0, 1) and no process group.
    args: train.py's, for --batch-size (it must split evenly) and --device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.batch_size % world:
        sys.exit(f"train.py: --batch-size {args.batch_size} does not split evenly over {world} processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(args.device)
    if device.index is not None:
        sys.exit(f"train.py: --device {args.device}: under torchrun give {device.type}; each process takes its own")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # from here on "cuda" is this process's GPU
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank) if cuda else None)
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone logs; errors still reach stderr
    return rank, world


def end_distributed():
    """Leaves the process group. Drop the DDP model first: were DDP's reducer to drop the group's last reference,
    it would join gloo's threads holding the GIL while one of them waits for the GIL to free a collective's tensors
    (a hang)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_processes(values, device):
    """A few numbers summed over all processes (one all-reduce on `device`); one process gets them back as they are."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_processes(ok, device):
    """Whether `ok` holds in every process, so that all of them take the same branch (and none is left waiting
    in a collective that the others skipped)."""
    return sum_over_processes([float(not ok)], device)[0] == 0


def any_process(flag, device):
    """Whether `flag` holds in some process (a stop asked of one is a stop of all)."""
    return not all_processes(not flag, device)


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d with the training statistics of the global batch, on every backend (SyncBatchNorm runs on CUDA
    only): each process's per-channel mean and variance are all-gathered with autograd and combined."""

    def forward(self, x):  # (b, C, H, W) with the same b in every process
        if not self.training:
            return super().forward(x)
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        means, variances = funcol.all_gather_single(torch.stack([mean, var]), 0, dist.group.WORLD).view(
            -1, 2, x.shape[1]).unbind(1)  # (world, C) each
        mean = means.mean(0)
        var = (variances + (means - mean) ** 2).mean(0)  # the variance of equal-sized parts pooled
        n = x.numel() // x.shape[1] * len(means)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x.float() * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


class GlobalBatchSelfAttention(BatchSelfAttention):
    """The self-attention regulariser across the global batch: the features of all processes, all-gathered with
    autograd in rank order (the order of the global batch), attend to each other."""

    def forward(self, x):  # (b, d) -> (B, B)
        return super().forward(funcol.all_gather_single(x, 0, dist.group.WORLD) if self.training else x)


def make_batch_global(model):
    """The two parts of EmoNeXt that look across the batch, the STN's BatchNorm and the self-attention
    regulariser, look across the global one. The subclasses hold no state of their own: parameters, buffers and
    state-dict keys stay as they are."""
    for m in model.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
        elif type(m) is BatchSelfAttention:
            m.__class__ = GlobalBatchSelfAttention


def distributed_model(model):
    """The model with global batch statistics, wrapped in DDP (which averages the gradients in backward)."""
    make_batch_global(model)
    # find_unused_parameters: attention.value gets no gradient (kept for the official state-dict layout)
    return DDP(model, find_unused_parameters=True)
