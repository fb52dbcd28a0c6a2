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

from renorm.data import Batches, no_readable_images
from renorm.errors import RenormError
from renorm.forward import as_logits, eval_mode, forward


@torch.no_grad()
def predict(model: nn.Module, images: Any, batch_size: int = 50, progress: bool = False,
            desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (logits (N, classes), labels (N,) or None) of `model` over the images."""
    outputs, labels = [], []
    with eval_mode(model):
        for batch, batch_labels in Batches(images, batch_size, progress, desc):
            outputs.append(as_logits(forward(model, batch)).float())
            if batch_labels is not None:
                labels.append(batch_labels)
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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    if labels.max() >= logits.shape[1]:
        raise RenormError(f"the data has label {int(labels.max())} but the model has {logits.shape[1]} classes; "
                          "check --num-classes and the class folders")
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {"top1": 100.0 * float((top[:, 0] == labels).float().mean()),
            "top5": 100.0 * float((top == labels[:, None]).any(1).float().mean())}


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 agreement (percent) and mean KL(reference || model) in nats."""
    if logits.shape != reference_logits.shape:
        raise RenormError(f"model and reference disagree on the output shape: {tuple(logits.shape[1:])} "
                          f"vs {tuple(reference_logits.shape[1:])}")
    target = reference_logits.argmax(1)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference_logits, 1), log_target=True,
                  reduction="batchmean")
    return {"agreement_top1": 100.0 * float((top[:, 0] == target).float().mean()),
            "agreement_top5": 100.0 * float((top == target[:, None]).any(1).float().mean()),
            "kl": float(kl)}


def evaluate(model: nn.Module, images: Any, reference: nn.Module | torch.Tensor | None = None,
             batch_size: int = 50, progress: bool = False, desc: str = "evaluate") -> dict[str, float]:
    """Metrics of `model` on the images: accuracy when labeled, agreement when a reference is given.

    reference may be a model or its precomputed logits on the same images.
    """
    start = time.perf_counter()
    logits, labels = predict(model, images, batch_size, progress, desc)
    metrics: dict[str, float] = {}
    if labels is not None:
        metrics.update(accuracy(logits, labels))
    if reference is not None:
        if isinstance(reference, nn.Module):
            reference, _ = predict(reference, images, batch_size, progress, "evaluate reference")
        metrics.update(agreement(logits, reference))
    if not metrics:
        raise RenormError("the images have no labels: give labeled data (one folder per class) "
                          "or a reference model to measure agreement with")
    metrics["images"] = len(logits)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics
