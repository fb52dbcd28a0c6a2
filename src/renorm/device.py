"""Where the work runs: how many CPU threads, and which device holds the model and its tensors.

Every stage moves images to the device of the model it runs (renorm.forward.forward);
helper tensors are created on the device of the tensor they combine with. This module
only chooses: the thread count (torch.set_num_threads) and the device a spec names.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from renorm.errors import RenormError

DEVICES = "cpu, cuda, cuda:N or auto"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """OMP_NUM_THREADS when it is set to a positive number; else the cores this process may use, less
    those that other processes keep busy, at least 1. Busy: the 1-minute load average, or the
    threads of other processes running right now (/proc/loadavg), whichever is higher.

    On a shared machine a thread that waits for a busy core stalls every parallel operation.
    On this project's 2-core machine with two other busy processes, 2 threads took 74.5 s for
    W4 weight quantization of resnet18 where 1 took 7.4 s, and 9.3 s for an inference pass
    where 1 took 3.7 s; with no extra busy process, 2 threads ran that pass in 0.86 s against
    1.67 s (docs/results/threads.md, python -m benchmarks.threads). The load average lags by
    a minute: two renorm commands started together on an idle machine both saw it near 0, took
    2 threads each and reconstructed mobilenet_v2 in minutes instead of seconds; the processes
    running at the moment catch that (docs/results/threads_pair.md).
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):  # no load average on this system
        busy = 0
    free = (os.cpu_count() or cores) - max(busy, running_elsewhere())
    return max(1, min(cores, free))


def _running_now() -> tuple[int, int] | None:
    """(threads running on the machine, threads of this process among them), from /proc; None elsewhere."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rpartition(")")[2].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                continue
        return running, own
    except (OSError, ValueError, IndexError):
        return None


def running_elsewhere(samples: int = 3, interval: float = 0.01) -> int:
    """Threads of other processes running now: the median of a few samples of /proc/loadavg's
    running count less this process's running threads (0 where there is no /proc)."""
    counts = []
    for i in range(samples):
        now = _running_now()
        if now is None:
            return 0
        counts.append(max(0, now[0] - now[1]))
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def check_threads(threads: int) -> int:
    if threads < 1:
        raise RenormError(f"--threads must be at least 1, got {threads}")
    return threads


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block (None: left as it is), then restored."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(check_threads(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_workers(in_memory: bool, threads_used: int | None = None) -> int:
    """Image-decoding processes for a data set: 0 for images already in memory, else up to 4, one core left free."""
    if in_memory:
        return 0
    cores = threads_used if threads_used is not None else available_cores()
    return max(0, min(4, cores - 1))


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device that `spec` names: cpu, cuda, cuda:N, or auto (the GPU when PyTorch sees one, else the CPU).

    Under torchrun with CUDA, 'cuda' and 'auto' mean this process's GPU (cuda:LOCAL_RANK).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise RenormError(f"--device {spec!r} is not a device; choose {DEVICES}")
    if not torch.cuda.is_available():
        raise RenormError(f"--device {spec}: PyTorch sees no CUDA GPU on this machine; use --device cpu "
                          "(or auto), or install a CUDA build of PyTorch where a GPU is present")
    if not index:
        index = os.environ.get("LOCAL_RANK", "0")
    if int(index) >= torch.cuda.device_count():
        raise RenormError(f"--device cuda:{index}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); name one of them")
    return torch.device(f"cuda:{index}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without tensors)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
