"""Running a model on images: eval mode for a block, a forward pass whose errors name the fix, logits.

Every stage runs models through these three, so a caller's training flags always come
back as they were, and a forward pass that fails says why in one line: images of the
wrong size (set --resize/--crop), a model in another dtype or on another device, or
the model's own error.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from renorm.errors import RenormError

# Phrases of torch's errors when an input has the wrong number of channels, pixels or dimensions.
_SHAPE_ERROR = re.compile(r"shape|size|dimension|channels|cannot be multiplied|expected input|must match|"
                          r"too small|out of bounds|kernel", re.IGNORECASE)


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put the models in eval mode for the block; then give every module back its own training flag."""
    saved = [(module, module.training) for model in models if model is not None for module in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def forward(model: nn.Module, images: torch.Tensor) -> Any:
    """model(images), the images first moved to the model's device; an error raised in it becomes a
    one-line RenormError that says what to change."""
    images = to_model(model, images)
    try:
        return model(images)
    except RenormError:
        raise
    except Exception as error:  # noqa: BLE001 - the model's own code may raise anything
        raise RenormError(explain_failure(model, images, error)) from None


def to_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`images` on the device of `model`'s first parameter (as they are for a model without parameters)."""
    for tensor in model.parameters():
        return images.to(tensor.device, non_blocking=True)
    return images


def explain_failure(model: nn.Module, images: torch.Tensor, error: BaseException) -> str:
    """One line: why `model` could not run on `images`, and the fix."""
    message = " ".join(str(error).split()) or type(error).__name__
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tensors = list(model.parameters()) + list(model.buffers()) if isinstance(model, nn.Module) else []
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    devices = {t.device for t in tensors}
    if len(dtypes) == 1 and images.dtype not in dtypes:
        return (f"the model's weights are {_name(*dtypes)} but the images are {_name(images.dtype)}; "
                f"renorm runs models in float32: convert it first (model.float())")
    if len(devices) > 1:
        return (f"the model's tensors are on {' and '.join(sorted(_name(d) for d in devices))}; "
                f"move the whole model to one device first (model.to(device))")
    if isinstance(error, RuntimeError) and _SHAPE_ERROR.search(first):
        return (f"images of shape {tuple(images.shape[1:])} do not fit the model ({first}); "
                "set --resize/--crop to the model's input size")
    kind = "" if isinstance(error, RuntimeError) else f"{type(error).__name__}: "
    return f"the model failed on images of shape {tuple(images.shape[1:])}: {kind}{message}"


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def as_logits(output: Any) -> torch.Tensor:
    """The class scores in a model's output: a tensor, a dict's or object's 'logits', or a tuple's only tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        found = [item for item in output if isinstance(item, torch.Tensor)]
        if len(found) == 1:
            return found[0]
    raise RenormError(f"the model returns {_describe(output)}, not one tensor of class scores; make its forward "
                      "return the logits (N, classes), or a dict with a 'logits' entry")


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a dict with keys {', '.join(repr(k) for k in list(output)[:5])}"
    if isinstance(output, (tuple, list)):
        kinds = sorted({type(item).__name__ for item in output})
        return f"a {type(output).__name__} of {len(output)} ({', '.join(kinds)})"
    return f"a {type(output).__name__}"
