"""Many processes (torchrun): this process's share of the images, and the sums that join the shares.

Under `torchrun --nproc-per-node K` every process runs the same command; renorm.cli calls
`setup` (gloo on the CPU, nccl on CUDA). Stages then call the functions here and read the
same with one process or eight: with no process group every function is a no-op (the
share is everything, a sum is the tensor itself).

What is split: re-normalization splits each chunk of images across the processes and
all-reduces every BatchNorm's chunk moments (count, mean, M2) before they are applied, as
SyncBatchNorm does, so each process sets the statistics of a single process over the same
images and chunks; evaluation splits the images and all-reduces its counts. Every other
stage (quantization, reconstruction, activation calibration, pruning) runs whole in each
process and gives the same result in each.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only one)."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo for the CPU, nccl for CUDA); True if this call made it."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(count: int) -> slice:
    """This process's contiguous share of `count` items (sizes differ by at most one)."""
    size, index = world_size(), rank()
    return slice(count * index // size, count * (index + 1) // size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (in place); the tensor itself with one process."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:  # nccl reduces GPU tensors only
        moved = tensor.cuda()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return tensor.copy_(moved)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def total(count: int) -> int:
    """The sum of `count` over all processes (`count` itself with one process)."""
    if not active():
        return count
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.float64)).item())


def reduce_moments(count: int, mean: torch.Tensor, m2: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean, M2) of all processes' batches together, from each one's own (float64).

    Two sums: counts and channel sums give the mean; then each process's M2 plus its
    count times its squared distance to that mean gives M2 (Chan's merge, no cancellation).
    """
    if not active():
        return count, mean, m2
    totals = all_reduce_sum(torch.cat([mean.new_tensor([count]), mean * count]))
    total = int(totals[0].item())
    joint = totals[1:] / max(total, 1)
    spread = all_reduce_sum(m2 + count * (mean - joint) ** 2)
    return total, joint, spread


def gather_lists(items: list[Any]) -> list[Any]:
    """Every process's `items`, concatenated in rank order (the list itself with one process)."""
    if not active():
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]
