"""Folding each BatchNorm into the conv/linear layer before it, keeping the layer's integer codes.

The fold multiplies each output channel by gamma / sqrt(var + eps): for a quantized layer
only the per-channel scale (and the sign of the codes) changes. A BatchNorm is folded
only where it is the one reader of the layer's output, found by a torch.fx trace (conv
and linear subclasses kept whole), or, for a model that does not trace, by running it
once with hooks.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _LayerTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every conv/linear (subclasses too, e.g. same-padding convs) as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _FOLDABLE) or super().is_leaf_module(module, qualified_name)


def _conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv or linear, BatchNorm) names where the BatchNorm is the only user of the layer's output.

    From a torch.fx trace; a model that does not trace is run once on `example` with hooks
    instead, pairing a BatchNorm with the layer whose output tensor it receives, unless
    another module receives that tensor too.
    """
    modules = dict(model.named_modules())
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - tracing a user's model may fail in many ways
        return _pairs_by_hooks(model, example)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if isinstance(modules.get(source.target), _FOLDABLE) and calls[source.target] == 1 and calls[node.target] == 1:
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _pairs_by_hooks(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id of a layer's output -> (layer, the tensor: kept
    # alive for the pass, so that its id is not reused by a later tensor)
    readers: Counter = Counter()  # layer name -> modules that received its output
    calls: Counter = Counter()
    pairs = []

    def record(name: str, module: nn.Module):
        def before(_module: nn.Module, args: tuple) -> None:
            calls[name] += 1
            found = outputs.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            source = found[0] if found is not None and found[1] is args[0] else None
            if source is not None:
                readers[source] += 1
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    pairs.append((source, name))

        def after(_module: nn.Module, _args: tuple, output: object) -> None:
            if isinstance(module, _FOLDABLE) and isinstance(output, torch.Tensor):
                outputs[id(output)] = (name, output)
        return before, after

    handles = []
    for name, module in model.named_modules():
        if name and (not list(module.children()) or isinstance(module, _FOLDABLE)):  # a conv may hold its padding
            before, after = record(name, module)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(layer, bn) for layer, bn in pairs if readers[layer] == 1 and calls[layer] == 1 and calls[bn] == 1]


@torch.no_grad()
def fold_batchnorms(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
                     example: torch.Tensor) -> int:
    """Fold each BatchNorm into the layer before it (in place); return how many were folded."""
    pairs = _conv_batchnorm_pairs(model, example)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + shift
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        # A channel with zero variance was constant on every calibration image (a dead input): its output
        # is the BatchNorm's shift. Folding 1/sqrt(eps) into its weights would make its scale huge.
        constant = bn.running_var <= 1e-12
        factor, new_bias = torch.where(constant, 0.0, factor), torch.where(constant, shift, new_bias)
        if layer_name in weights:
            values, scale, axis = weights[layer_name]
            sign = torch.where(factor < 0, -1, 1).to(torch.int8)
            values = values * sign.reshape(shape)
            scale = scale * factor.abs()
            zero = scale == 0  # a channel BatchNorm multiplies by 0: weight 0, any positive scale
            values[zero] = 0
            scale[zero] = 1.0
            weights[layer_name] = (values, scale, axis)
            layer.weight.copy_(values.to(torch.float32) * scale.reshape(shape))
        else:
            layer.weight.mul_(factor.reshape(shape))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.clone())
        else:
            layer.bias.copy_(new_bias)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())
    return len(pairs)
