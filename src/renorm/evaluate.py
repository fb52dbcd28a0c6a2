"""Accuracy on labeled images; agreement with a reference model on unlabeled ones.

Labeled data gives top1 / top5 (percent). With a reference model (the FP32 network),
evaluation also gives agreement_top1 (same top-1 class), agreement_top5 (the reference's
top-1 class within the model's top 5) and kl, the mean KL(reference || model) in nats.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from renorm import distributed
from renorm.data import Batches, ImageSource, SubsetImages, no_readable_images
from renorm.errors import RenormError
from renorm.forward import as_logits, eval_mode, forward


@torch.no_grad()
def predict(model: nn.Module, images: Any, batch_size: int = 50, progress: bool = False,
            desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (logits (N, classes), labels (N,) or None) of `model` over the images.

    With several processes (renorm.distributed), over this process's share of them: pass
    across_processes=True to accuracy() and agreement() to count all shares.
    """
    outputs, labels = [], []
    with eval_mode(model):
        for batch, batch_labels in Batches(my_share(images), batch_size, progress, desc):
            outputs.append(as_logits(forward(model, batch)).float().cpu())  # metrics are computed on the CPU
            if batch_labels is not None:
                labels.append(batch_labels)
    if isinstance(images, ImageSource) and distributed.active():  # every process names every skipped file
        images.skipped[:] = list(dict.fromkeys(distributed.gather_lists(images.skipped)))
    if not outputs:
        raise no_readable_images(images, "to evaluate on")
    logits = torch.cat(outputs)
    if logits.dim() != 2:
        raise RenormError(f"the model's output has shape {tuple(logits.shape[1:])} per image; "
                          "evaluation expects one score per class")
    known = torch.cat(labels) if labels and len(torch.cat(labels)) == len(logits) else None
    if known is not None and bool((known < 0).any()):
        known = None
    return logits, known


def my_share(images: Any) -> Any:
    """This process's share of the images (all of them with one process).

    An ImageSource or a tensor: a contiguous share, and only it is decoded. Other inputs
    (DataLoaders, lists of batches): every process reads them and keeps every K-th batch.
    """
    if not distributed.active():
        return images
    if isinstance(images, ImageSource):
        return SubsetImages(name=images.name, base=images, indices=list(range(len(images)))[distributed.share(len(images))])
    if isinstance(images, torch.Tensor):
        return images[distributed.share(len(images))]
    return _EveryKthBatch(images, distributed.rank(), distributed.world_size())


class _EveryKthBatch:
    """Batches number index, index + size, index + 2 size, ... of a re-iterable of batches."""

    def __init__(self, data: Any, index: int, size: int):
        self.data, self.index, self.size = data, index, size

    def __iter__(self):
        for number, batch in enumerate(Batches(self.data)):
            if number % self.size == self.index:
                yield batch


def accuracy(logits: torch.Tensor, labels: torch.Tensor, across_processes: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (of the images of all processes with across_processes=True)."""
    if len(labels) and labels.max() >= logits.shape[1]:
        raise RenormError(f"the data has label {int(labels.max())} but the model has {logits.shape[1]} classes; "
                          "check --num-classes and the class folders")
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    counts = [(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum()]
    return _percentages({"top1": counts[0], "top5": counts[1]}, len(logits), {}, across_processes)


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor, across_processes: bool = False) -> dict[str, float]:
    """Top-1 / top-5 agreement (percent) and mean KL(reference || model) in nats."""
    if logits.shape != reference_logits.shape:
        raise RenormError(f"model and reference disagree on the output shape: {tuple(logits.shape[1:])} "
                          f"vs {tuple(reference_logits.shape[1:])}")
    target = reference_logits.argmax(1)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference_logits, 1), log_target=True,
                  reduction="sum")
    return _percentages({"agreement_top1": (top[:, 0] == target).sum(),
                         "agreement_top5": (top == target[:, None]).any(1).sum()}, len(logits), {"kl": kl},
                        across_processes)


def _percentages(counts: dict[str, torch.Tensor], images: int, sums: dict[str, torch.Tensor],
                 across_processes: bool) -> dict[str, float]:
    """Counts as percentages of the images, sums as means per image; over all processes when asked."""
    names = list(counts) + list(sums)
    values = torch.stack([torch.tensor(images, dtype=torch.float64, device="cpu")]
                         + [counts[n].double().cpu() for n in counts] + [sums[n].double().cpu() for n in sums])
    if across_processes:
        values = distributed.all_reduce_sum(values)
    total = max(float(values[0]), 1.0)
    return {name: (100.0 if name in counts else 1.0) * float(value) / total
            for name, value in zip(names, values[1:].tolist())}


def images_counted(logits: torch.Tensor, across_processes: bool = False) -> int:
    """How many images the logits hold (in all processes with across_processes=True)."""
    count = torch.tensor([len(logits)], dtype=torch.float64, device="cpu")
    return int((distributed.all_reduce_sum(count) if across_processes else count).item())


def evaluate(model: nn.Module, images: Any, reference: nn.Module | torch.Tensor | None = None,
             batch_size: int = 50, progress: bool = False, desc: str = "evaluate") -> dict[str, float]:
    """Metrics of `model` on the images: accuracy when labeled, agreement when a reference is given.

    reference may be a model or its precomputed logits on the same images.
    """
    start = time.perf_counter()
    logits, labels = predict(model, images, batch_size, progress, desc)
    metrics: dict[str, float] = {}
    if labels is not None:
        metrics.update(accuracy(logits, labels, across_processes=True))
    if reference is not None:
        if isinstance(reference, nn.Module):
            reference, _ = predict(reference, images, batch_size, progress, "evaluate reference")
        elif distributed.active():
            reference = my_share(reference)
        metrics.update(agreement(logits, reference, across_processes=True))
    if not metrics:
        raise RenormError("the images have no labels: give labeled data (one folder per class) "
                          "or a reference model to measure agreement with")
    metrics["images"] = images_counted(logits, across_processes=True)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics
