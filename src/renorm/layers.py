"""Which layers a stage works on: conv/linear layers, their names, the model's first and last.

Quantization, pruning, activation calibration and sensitivity all ask the same
questions of a model; this is the one place that answers them.
"""
from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from renorm.errors import RenormError
from renorm.forward import eval_mode, forward

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every group is one input channel."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def check_layer_names(model: nn.Module, names: Iterable[str], flag: str) -> None:
    """Raise a RenormError naming `flag` unless every name is a conv/linear layer of `model`."""
    known = [name for name, _ in quantizable_layers(model)]
    modules = dict(model.named_modules())
    for name in names:
        if name in modules and name not in known:
            raise RenormError(f"{flag} {name!r} is a {type(modules[name]).__name__}, not a conv/linear layer")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"layers are e.g. {', '.join(known[:5])}"
            raise RenormError(f"{flag} names no conv/linear layer {name!r}; {hint}")


@torch.no_grad()
def first_and_last(model: nn.Module, example: torch.Tensor | None = None) -> tuple[str, ...]:
    """Names of the first and the last conv/linear layer a forward pass runs (the stem and the classifier).

    With an example batch the order is the order of execution, found by one forward pass
    of its first image with hooks on the layers. Without one, or when no conv/linear
    layer runs, it falls back to registration order, which is the same for the usual
    architectures but not for a model that registers its classifier before its stem.
    Returns () for a model without conv/linear layers.
    """
    layers = quantizable_layers(model)
    if not layers:
        return ()
    order: list[str] = []
    if example is not None:
        handles = [module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
                   for name, module in layers]
        try:
            with eval_mode(model):
                forward(model, example[:1])
        finally:
            for handle in handles:
                handle.remove()
    if not order:
        order = [name for name, _ in layers]
    return order[0], order[-1]
