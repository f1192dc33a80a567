"""Data-parallel training under `torchrun`: process-group set-up, model wrapping, cross-rank helpers.

    torchrun --nproc_per_node=8 main.py ...                       # one machine, 8 GPUs
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
             --nproc_per_node=8 main.py ...                       # two machines

torchrun starts one process per GPU and sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a
single process and every helper here is a no-op. Each rank computes the loss on its own slice of the
global batch (--batch_size images per rank); DDP averages the gradients, so with SyncBatchNorm the
update equals one process on the whole global batch.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Rank 0 alone logs, samples, talks to visdom and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def dist_info():
    """Where this process sits, read from torchrun's environment (rank 0 of 1 when not under torchrun)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def setup_distributed(device_name="auto"):
    """Pick this rank's device and join the process group: NCCL between GPUs, gloo on CPU.

    Returns (DistInfo, torch.device). On CUDA every rank drives the GPU numbered by its LOCAL_RANK.
    """
    info = dist_info()
    device = pick_device(device_name)
    if not info.enabled:
        return info, device
    if device_name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device_name}: under torchrun each rank uses cuda:LOCAL_RANK; "
                         f"pass --device auto, cuda or cpu")
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module, device, info):
    """The module DDP trains (gradients averaged over ranks), or the module itself on one process.

    Keep the unwrapped module for saving, sampling and the EMA; use the wrapper for the forward passes
    whose backward should be synchronised.
    """
    if not info.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(module, device):
    """BatchNorm statistics over the global batch instead of each rank's slice.

    torch.nn.SyncBatchNorm on GPUs; torch's version refuses CPU tensors, so on CPU (gloo) the
    BatchNorm2d layers become CrossRankBatchNorm2d, the same computation with plain all_reduce.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, CrossRankBatchNorm2d.from_batchnorm(child))
        else:
            sync_batchnorm(child, device)
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks too: every rank's input affects every
    rank's output."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover every rank's batch (any backend).

    Same state dict as BatchNorm2d, so checkpoints load into either.
    """

    @classmethod
    def from_batchnorm(cls, bn):
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.to(bn.weight.device)

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        B, C, H, W = x.shape
        n = torch.tensor(float(B * H * W), device=x.device)
        n = _AllReduceSum.apply(n)
        mean = _AllReduceSum.apply(x.sum(dim=(0, 2, 3))) / n                      # (C,)
        centred = x - mean.view(1, C, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum(dim=(0, 2, 3))) / n          # (C,), biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None means a cumulative average, as in BatchNorm2d
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1), m)  # running_var is unbiased, as in torch
        out = centred * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return out


def mean_over_ranks(values):
    """{name: scalar tensor} averaged over ranks (the logged loss of the global batch); collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].float() for k in names])  # (len(names),)
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(names, stacked))


def max_over_ranks(value):
    """The largest int any rank holds (e.g. a stop signal number): every rank decides alike; collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
