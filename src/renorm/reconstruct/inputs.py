"""The inputs a reconstruction sees: sampled rows of each layer's input, in both networks.

Rows are taken at seeded random output positions of a conv (the patch each position
sees, ordered as the flattened weight) or are a linear layer's input vectors; the FP32
model and the quantized model are sampled at the same positions so that their rows pair
up. A TorchFunctionMode sees every conv/linear call, so padding done inside a layer's
own forward (e.g. TensorFlow-style "same" padding) is seen as the convolution sees it.
Two ways to get the quantized model's inputs layer after layer: one torch.fx traced
pass, each node run once per chunk of images (`layer_major`), or, for a model that does
not trace, one forward pass per layer that stops at that layer (`collect`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from renorm.data import Batches
from renorm.device import threads
from renorm.errors import RenormError

SMALL_K = 32  # Moments.add: products of K x K matrices up to this K run on one thread


@dataclass
class Layer:
    """A layer being reconstructed."""

    name: str
    module: nn.Module  # in the model being reconstructed
    reference: nn.Module  # the same layer in the FP32 model
    sink: nn.Module | None = None  # the BatchNorm that takes this layer's output, if any
    sink_reference: nn.Module | None = None  # that BatchNorm in the FP32 model


@dataclass
class Moments:
    """Second moments of one layer's input rows, per group of the weight: (groups, K, K)."""

    hessian: torch.Tensor | None = None  # sum X~^T X~
    cross: torch.Tensor | None = None  # sum X~^T X
    sum_quantized: torch.Tensor | None = None  # sum of X~ rows (groups, K)
    sum_reference: torch.Tensor | None = None  # sum of X rows
    count: int = 0

    def add(self, quantized: torch.Tensor, reference: torch.Tensor) -> None:
        """Merge rows (groups, n, K) of both networks, taken at the same positions."""
        # float32 products per chunk (batched float64 matmuls are ~25x slower), float64 running sums
        q, r = quantized.float(), reference.float()
        qt = q.transpose(1, 2)
        # Many tiny products (a depthwise layer: one K x K matrix per channel, K = 9 or 25) on one thread: as
        # fast alone, and much less slowed by another process on the same cores (two 2-thread renorm commands on 2
        # cores: reconstruction 134-139 s each against 283-284 s before; docs/results/threads_pair.md)
        with threads(1 if q.shape[-1] <= SMALL_K else None):
            hessian = (qt @ q).double()
            cross = hessian if quantized is reference else (qt @ r).double()
        parts = (hessian, cross, q.double().sum(1), r.double().sum(1))
        self._merge(parts, quantized.shape[1])

    def _merge(self, parts: tuple, count: int) -> None:
        if self.hessian is None:
            self.hessian, self.cross, self.sum_quantized, self.sum_reference = (part.clone() for part in parts)
        else:
            for total, part in zip((self.hessian, self.cross, self.sum_quantized, self.sum_reference), parts):
                total += part
        self.count += count

    def __add__(self, other: "Moments") -> "Moments":
        total = Moments()
        for part in (self, other):
            if part.hessian is not None:
                total._merge((part.hessian, part.cross, part.sum_quantized, part.sum_reference), part.count)
        return total


class LayerStats:
    """A layer's Moments in two folds (alternate chunks of images), to choose the damping by
    cross-validation; `total` is the sum of both."""

    def __init__(self) -> None:
        self.folds = [Moments(), Moments()]

    def add(self, quantized: torch.Tensor, reference: torch.Tensor, chunk_index: int = 0) -> None:
        self.folds[chunk_index % 2].add(quantized, reference)

    @property
    def total(self) -> Moments:
        return self.folds[0] + self.folds[1]


@dataclass
class _Site:
    """How a layer meets its input: conv geometry or linear."""

    kind: str  # "conv" or "linear"
    groups: int = 1
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()


def _pair(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _conv_site(weight: torch.Tensor, args: tuple, kwargs: dict) -> _Site:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    dims = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, dilation = _pair(bound.get("stride", 1), dims), _pair(bound.get("dilation", 1), dims)
    padding = bound.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        elif any(s != 1 for s in stride):
            raise RenormError("padding='same' with a stride is not supported by reconstruction")
        else:  # 'same': torch pads (total // 2) on the left; odd totals get the extra on the right
            padding = tuple(d * (k - 1) for k, d in zip(kernel, dilation))
            return _Site("conv", int(bound.get("groups", 1)), kernel, stride, ("same",) + padding, dilation)
    return _Site("conv", int(bound.get("groups", 1)), kernel, stride, _pair(padding, dims), dilation)


def _rows(x: torch.Tensor, site: _Site, count: int, generator: torch.Generator) -> torch.Tensor:
    """Sampled input rows of a layer as (groups, n, K), K ordered as the flattened weight."""
    x = x.detach().float()
    if site.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) > count:
            rows = rows[torch.randperm(len(rows), generator=generator, device=generator.device)[:count].to(x.device)]
        return rows[None]
    if x.dim() != 4:
        raise RenormError("reconstruction supports 2-D convolutions and linear layers; use --reconstruct-method "
                          "nearest or leave this layer out with --layer-bits")
    if site.padding and site.padding[0] == "same":
        total = site.padding[1:]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
    elif any(site.padding):
        x = F.pad(x, (site.padding[1], site.padding[1], site.padding[0], site.padding[0]))
    n, channels, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = site.kernel, site.stride, site.dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    per_image = max(1, min(out_h * out_w, -(-count // n)))
    if per_image == out_h * out_w:
        position = torch.arange(out_h * out_w, device=generator.device).expand(n, -1)
    else:
        position = torch.rand(n, out_h * out_w, generator=generator, device=generator.device).argsort(1)[:, :per_image]
    top = (position // out_w) * sh
    left = (position % out_w) * sw
    offsets_h = (torch.arange(kh, device=generator.device) * dh).repeat_interleave(kw)
    offsets_w = (torch.arange(kw, device=generator.device) * dw).repeat(kh)
    rows_index = top[..., None] + offsets_h  # (n, P, kh*kw)
    cols_index = left[..., None] + offsets_w
    image_index = torch.arange(n, device=generator.device)[:, None, None]
    # positions drawn on the generator's device (the CPU: the same rows wherever the model runs)
    image_index, rows_index, cols_index = (t.to(x.device) for t in (image_index, rows_index, cols_index))
    patches = x.permute(0, 2, 3, 1)[image_index, rows_index, cols_index]  # (n, P, kh*kw, C)
    patches = patches.reshape(n * per_image, kh * kw, site.groups, channels // site.groups)
    # weight (out, C/groups, kh, kw) flattens channel-major: K index = c * kh*kw + k
    return patches.permute(2, 0, 3, 1).reshape(site.groups, n * per_image, -1)


class _Stop(Exception):
    """Raised inside a forward pass once every layer of the group has shown its input."""


class _Capture(TorchFunctionMode):
    """Sees each conv/linear call: records the input rows of the watched weights."""

    def __init__(self, watched: dict[int, str], on_input: Callable[[str, torch.Tensor, _Site], None]):
        super().__init__()
        self.watched, self.on_input, self.seen = watched, on_input, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and id(args[1]) in self.watched:
            name = self.watched[id(args[1])]
            if name not in self.seen:
                site = _Site("linear") if args[1].dim() == 2 else _conv_site(args[1], args, kwargs)
                if func in (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d):
                    raise RenormError(f"reconstruction does not support transposed convolutions ({name})")
                self.seen.add(name)
                self.on_input(name, args[0], site)
                if len(self.seen) == len(self.watched):
                    raise _Stop
        return func(*args, **kwargs)


def count_images(images: Any, limit: int) -> int:
    try:
        return min(limit, len(images.dataset) if hasattr(images, "dataset") else len(images))
    except TypeError:
        return limit


def limited(stream: Batches, limit: int, chunk: int):
    """At most `limit` images from the stream, in tensors of `chunk` images."""
    from renorm.renormalize import rechunk

    seen = 0
    for batch in rechunk(stream.images(), chunk):
        batch = batch[: limit - seen]
        if len(batch):
            yield batch
        seen += len(batch)
        if seen >= limit:
            return


def _run_until(model: nn.Module, images: torch.Tensor, capture: _Capture) -> None:
    try:
        with capture:
            model(images)
    except _Stop:
        pass


class Sampler:
    """Input rows of each layer at seeded positions: the same positions in both networks."""

    def __init__(self, layers: list[Layer], count: int, config: Any):
        self.index = {layer.name: i for i, layer in enumerate(layers)}
        self.budget = {layer.name: min(config.max_rows, max(config.min_rows,
                                                            config.rows * layer.module.weight[0].numel()))
                       for layer in layers}
        self.count, self.seed = count, config.seed

    def __call__(self, name: str, chunk_index: int, x: torch.Tensor, site: _Site) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk_index * 7919 + self.index[name])
        return _rows(x, site, -(-self.budget[name] * len(x) // self.count), generator)


def sample_reference(layers: list[Layer], reference: nn.Module, chunks: Callable, sampler: Sampler
                    ) -> dict[str, list[torch.Tensor]]:
    """One pass of the FP32 model: every layer's sampled input rows, per chunk of images."""
    cached: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    reference_ids = {id(layer.reference.weight): layer.name for layer in layers}
    for chunk_index, images in enumerate(chunks()):
        def on_reference(name: str, x: torch.Tensor, site: _Site) -> None:
            cached[name].append(sampler(name, chunk_index, x, site))

        _run_until(reference, images, _Capture(reference_ids, on_reference))
    return cached


def collect(layer: Layer, model: nn.Module, chunks: Callable, sampler: Sampler,
             reference_rows: list[torch.Tensor], inputs: str) -> LayerStats:
    """The layer's statistics: its inputs in the model as it now is (one pass that stops at the layer)."""
    stats = LayerStats()
    if inputs == "fp32":
        for chunk_index, rows in enumerate(reference_rows):
            stats.add(rows, rows, chunk_index)
        return stats
    for chunk_index, images in enumerate(chunks()):
        def on_model(name: str, x: torch.Tensor, site: _Site) -> None:
            stats.add(sampler(name, chunk_index, x, site), reference_rows[chunk_index], chunk_index)

        _run_until(model, images, _Capture({id(layer.module.weight): layer.name}, on_model))
    return stats


def graph_of(model: nn.Module, layers: list[Layer]) -> tuple[Any, dict] | None:
    """The model as a torch.fx graph and the node where each layer's weight is used; None if it cannot be traced."""
    import torch.fx

    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any model code may defeat symbolic tracing
        return None
    by_module = {id(layer.module): layer for layer in layers}
    by_weight = {id(layer.module.weight): layer for layer in layers}
    sites: dict[Any, Layer] = {}
    for node in graph_module.graph.nodes:
        found = None
        if node.op == "call_module":
            found = by_module.get(id(graph_module.get_submodule(node.target)))
        elif node.op in ("call_function", "call_method"):
            for argument in (*node.args, *node.kwargs.values()):
                if isinstance(argument, torch.fx.Node) and argument.op == "get_attr":
                    found = found or by_weight.get(id(_attribute(graph_module, argument.target)))
        if found is not None and found not in sites.values():
            sites[node] = found
    return (graph_module, sites) if len(sites) == len(layers) else None


def _attribute(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _last_uses(nodes: list) -> dict:
    last_use = {}
    for index, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = index
    return last_use


@torch.no_grad()
def cut_bytes(graph: tuple[Any, dict], layers: list[Layer], example: torch.Tensor) -> int:
    """Peak bytes per image of the node values layer_major keeps (run on one image)."""
    graph_module, sites = graph
    nodes = list(graph_module.graph.nodes)
    last_use = _last_uses(nodes)
    env: dict = {}
    live = peak = 0
    for index, node in enumerate(nodes):
        if node.op == "output":
            break
        env[node] = _run_node(graph_module, node, env, example[:1])
        live += _nbytes(env[node]) if node.op != "get_attr" else 0
        peak = max(peak, live)
        for used in node.all_input_nodes:
            if last_use.get(used) == index:
                live -= _nbytes(env.pop(used)) if used.op != "get_attr" else 0
    return peak


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return 0


def layer_major(graph: tuple[Any, dict], layers: list[Layer], chunks: Callable, sampler: Sampler,
                 cached: dict[str, list[torch.Tensor]], solve: Callable, bar) -> None:
    """Run the traced model node by node over all chunks, solving each layer just before its node runs.

    Each node runs once per chunk, so the whole reconstruction costs one forward pass of the
    quantized model (not one per layer); the values kept are those of the nodes still to be
    used, for every chunk (one cut through the network, not every layer's activations).
    """
    graph_module, sites = graph
    nodes = list(graph_module.graph.nodes)
    last_use = _last_uses(nodes)
    inputs = list(chunks())
    values: list[dict] = [{} for _ in inputs]
    remaining = len(layers)
    for index, node in enumerate(nodes):
        if node.op == "output" or remaining == 0:
            break
        layer = sites.get(node)
        if layer is not None:
            stats = LayerStats()
            reference_rows = cached.pop(layer.name)
            for chunk_index, env in enumerate(values):
                def on_model(name: str, x: torch.Tensor, site: _Site, chunk_index=chunk_index) -> None:
                    stats.add(sampler(name, chunk_index, x, site), reference_rows[chunk_index], chunk_index)

                try:
                    with _Capture({id(layer.module.weight): layer.name}, on_model):
                        _run_node(graph_module, node, env, inputs[chunk_index])
                except _Stop:
                    pass
            solve(layer, stats)
            remaining -= 1
            bar.update(1)
        for chunk_index, env in enumerate(values):
            env[node] = _run_node(graph_module, node, env, inputs[chunk_index])
            for used in node.all_input_nodes:
                if last_use.get(used) == index:
                    del env[used]


def _run_node(graph_module: nn.Module, node: Any, env: dict, images: torch.Tensor) -> Any:
    import torch.fx

    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "placeholder":  # the images; further inputs of forward() keep their defaults
        return images if node.prev.op == "root" else (node.args[0] if node.args else None)
    if node.op == "get_attr":
        return _attribute(graph_module, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return graph_module.get_submodule(node.target)(*args, **kwargs)
    raise RenormError(f"cannot run graph node {node.op!r}")
