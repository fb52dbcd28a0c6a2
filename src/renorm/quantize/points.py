"""Where activations are quantized: the tensors an INT8 graph quantizes, found by a torch.fx trace.

A quantization point is a tensor of the traced graph (an fx node), quantized where it is
made, so that every reader sees the quantized tensor, as in an exported QDQ graph:
  - the input of every conv/linear layer;
  - the inputs and the output of every residual addition and concatenation (an output
    that only a ReLU/ReLU6 reads is quantized after it, as an INT8 graph fuses them);
  - the input and the output of every pooling.
Ops that commute with rounding (max pooling, zero padding, flatten/reshape, dropout and
identity in eval mode) share one quantizer between their input and output, so the
simulation quantizes them exactly once, and the exported graph can still run them on
integers. The model keeps its class, modules and state_dict: its forward is replaced by
an fx interpreter of the graph with the quantizers in it (`install`), and `remove`
restores it.
"""
from __future__ import annotations


import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from renorm.layers import QUANTIZABLE

CONTAINER = "_renorm_activations"  # the ModuleDict of a model's point quantizers (no tensors: no state_dict keys)

_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                       torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_avg_pool3d, torch.mean, torch.avg_pool1d}
_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {torch.relu, F.relu, F.relu6, torch.relu_}
_SHAPE_MODULES = (nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.ZeroPad2d)
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.dropout}
_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every conv/linear (subclasses too) as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QUANTIZABLE) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's graph (its class's forward), or None when torch.fx cannot trace it."""
    try:
        return Tracer().trace(model)
    except Exception:  # noqa: BLE001 - tracing a user's model may fail in many ways
        return None


class PointQuantizer(nn.Module):
    """One call site of a quantizer in the graph; `quantizer` is shared by the points of one group."""

    def __init__(self, quantizer: Callable[[torch.Tensor], torch.Tensor], point: str, group: int):
        super().__init__()
        self.quantizer, self.point, self.group = quantizer, point, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)


class PointsForward:
    """model.forward replaced: runs the graph (with its quantizers) on the model's own modules."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph):
        self.model, self.graph = model, graph

    def __call__(self, *args: Any) -> Any:
        return torch.fx.Interpreter(self.model, graph=self.graph).run(*args)


def _module(modules: dict, node: torch.fx.Node) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _is(node: torch.fx.Node, modules: dict, module_types: tuple, functions: set, methods: set = frozenset()) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), module_types)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_zero_pad(node: torch.fx.Node, modules: dict) -> bool:
    module = _module(modules, node)
    if isinstance(module, nn.ZeroPad2d) or (isinstance(module, nn.modules.padding._ConstantPadNd) and module.value == 0):
        return True
    if node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    return False


def _exact(node: torch.fx.Node, modules: dict) -> bool:
    """An op whose output on quantized inputs is already quantized with the same quantizer."""
    return _is(node, modules, _MAX_POOLS + _SHAPE_MODULES, _MAX_POOL_FUNCTIONS | _SHAPE_FUNCTIONS, _SHAPE_METHODS) \
        or _is_zero_pad(node, modules)


def _tensor_inputs(node: torch.fx.Node, floats: set) -> list[torch.fx.Node]:
    args = node.args[0] if node.target in _CATS else node.args[:2]
    return [a for a in args if isinstance(a, torch.fx.Node) and a in floats]


def find_points(model: nn.Module, graph: torch.fx.Graph, floats: set) -> tuple[list[torch.fx.Node], list[int], dict]:
    """(points in graph order, the group of each, the quantized layers reading each point).

    floats: the nodes whose values are floating-point tensors (from a shape propagation).
    """
    modules = dict(model.named_modules())
    points: dict[torch.fx.Node, None] = {}
    layers: dict[torch.fx.Node, list[str]] = {}

    def after_relu(node: torch.fx.Node) -> torch.fx.Node:
        users = list(node.users)
        relu = users[0] if len(users) == 1 and _is(users[0], modules, _RELUS, _RELU_FUNCTIONS, {"relu"}) else None
        return relu if relu is not None else node

    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), QUANTIZABLE) and node.args \
                and isinstance(node.args[0], torch.fx.Node):
            points[node.args[0]] = None
            layers.setdefault(node.args[0], []).append(node.target)
        elif node in floats and ((node.op == "call_function" and node.target in (_ADDS | _CATS))
                                 or (node.op == "call_method" and node.target in ("add", "add_"))):
            inputs = _tensor_inputs(node, floats)
            if len(inputs) >= 2 or node.target in _CATS:
                points.update(dict.fromkeys(inputs))
                points[after_relu(node)] = None
        elif node in floats and _is(node, modules, _MAX_POOLS + _AVG_POOLS, _MAX_POOL_FUNCTIONS | _AVG_POOL_FUNCTIONS,
                                    {"mean"}) and node.args and isinstance(node.args[0], torch.fx.Node):
            points[node.args[0]] = None
            points[node] = None
    parent = {node: node for node in graph.nodes}

    def root(node: torch.fx.Node) -> torch.fx.Node:
        while parent[node] is not node:
            node = parent[node]
        return node

    changed = True
    while changed:  # exact ops join their input's and output's points into one group, through chains
        changed = False
        for node in graph.nodes:
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if source is None or node not in floats or source not in floats or not _exact(node, modules):
                continue
            if node in points or source in points:
                if node not in points or source not in points or root(node) is not root(source):
                    changed = True
                points[node] = points[source] = None
                if root(node) is not root(source):
                    parent[root(node)] = root(source)
    ordered = [node for node in graph.nodes if node in points]
    roots: dict[torch.fx.Node, int] = {}
    groups = [roots.setdefault(root(node), len(roots)) for node in ordered]
    return ordered, groups, {node.name: layers.get(node, []) for node in ordered}


def float_nodes(model: nn.Module, graph: torch.fx.Graph, example: torch.Tensor) -> set:
    """Nodes whose value on `example` is a floating-point tensor (one run of the graph)."""
    found = set()

    class Probe(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                found.add(node)
            return value

    with torch.no_grad():
        Probe(model, graph=graph).run(example)
    return found


def insert(model: nn.Module, graph: torch.fx.Graph, points: list[str], make: Callable[[str, int], nn.Module],
           groups: list[int]) -> None:
    """Put `make(point, group)` after each named node of `graph`, then make it the model's forward."""
    remove(model)
    container = nn.ModuleDict()
    by_name = {node.name: node for node in graph.nodes}
    for index, (name, group) in enumerate(zip(points, groups)):
        node = by_name[name]
        key = f"p{index}"
        container[key] = make(name, group)
        with graph.inserting_after(node):
            call = graph.call_module(f"{CONTAINER}.{key}", (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
    graph.lint()
    model.add_module(CONTAINER, container)
    model.forward = PointsForward(model, graph)


def installed(model: nn.Module) -> list[PointQuantizer]:
    """The model's point quantizers, in graph order ([] when none are installed)."""
    container = model._modules.get(CONTAINER)
    return list(container.values()) if container is not None else []


def remove(model: nn.Module) -> None:
    """Restore the model's own forward and drop its point quantizers."""
    if isinstance(model.__dict__.get("forward"), PointsForward):
        del model.__dict__["forward"]
    model._modules.pop(CONTAINER, None)
