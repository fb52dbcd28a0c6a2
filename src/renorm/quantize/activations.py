"""Activation quantization: the tensors an INT8 graph quantizes, one calibrated scale and zero point each.

Where (see renorm.quantize.points): the input of every conv/linear layer, the inputs and
output of residual additions and concatenations, and the input and output of pooling,
each quantized once where it is made, as the exported ONNX graph does. A model that
torch.fx cannot trace gets the input of each conv/linear layer only (forward pre-hooks).
How: per-tensor uint8 levels 0..2^b-1 with a zero point, x ~ (q - z) * scale: z = 0 where
calibration shows the tensor is never negative (after ReLU), otherwise asymmetric over
the observed range, so a tensor after SiLU/hardswish (down to -0.28) wastes no levels.
The range comes from one calibration pass of observers (exact min/max and a sample of
values per tensor, `max_samples` over `num_images` images whatever the batches), then
one of `METHODS`: `minmax` (the default: the observed range), `mse` (the clipping range
with the least squared error on a histogram of the sample), `percentile`. Fake
quantization in float.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from renorm.data import Batches, no_readable_images
from renorm.errors import RenormError
from renorm.forward import eval_mode, forward
from renorm.layers import quantizable_layers
from renorm.quantize import points as graph_points

ATTRIBUTE = "_renorm_act"  # where a module keeps the ActivationQuantizer of its input (models fx cannot trace)
METHODS = ("minmax", "mse", "percentile")


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Activation bits, how many images calibrate, values kept per tensor, and how the range is chosen."""

    bits: int = 8
    num_images: int = 400
    max_samples: int = 1 << 20
    seed: int = 0
    method: str = "minmax"  # the most accurate on both references at W8A8 (docs/results/activations.md)
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise RenormError(f"--abits {self.bits} is out of range: choose 2..16 (or 32 for float activations)")
        if self.num_images < 1:
            raise RenormError(f"--act-images must be at least 1, got {self.num_images}")
        if self.method not in METHODS:
            raise RenormError(f"--act-method {self.method!r} is not a method; choose one of {', '.join(METHODS)}")
        if not 50 < self.percentile <= 100:
            raise RenormError(f"the activation percentile must be in (50, 100], got {self.percentile}")


@dataclass
class ActivationQuantizer:
    """Fake-quantizes a tensor to levels 0..2^bits-1 with one scale and zero point: x ~ (q - zero_point) * scale."""

    scale: float
    zero_point: int
    bits: int
    relative_error: float = float("nan")

    @property
    def limits(self) -> tuple[int, int]:
        return 0, 2 ** self.bits - 1

    @property
    def signed(self) -> bool:
        """True when the levels reach below zero."""
        return self.zero_point > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.limits
        if torch.jit.is_tracing():  # the ONNX exporter writes this op as a QuantizeLinear/DequantizeLinear pair
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, low, high)
        # as ONNX's QuantizeLinear computes it: x / scale (not x * (1 / scale)), rounded half to even
        return (torch.clamp(torch.round(x / self.scale) + self.zero_point, low, high) - self.zero_point) * self.scale


def quantizer_for_range(low: float, high: float, bits: int) -> ActivationQuantizer:
    """The quantizer whose levels span [min(low, 0), max(high, 0)], zero exactly on a level."""
    low, high = min(low, 0.0), max(high, 0.0)
    top = 2 ** bits - 1
    scale = (high - low) / top if high > low else 1.0
    zero_point = int(min(max(round(-low / scale), 0), top))
    return ActivationQuantizer(float(scale), zero_point, bits)


def _histogram_mse_range(values: torch.Tensor, low: float, high: float, bits: int, bins: int = 2048,
                         steps: int = 40, rounds: int = 3) -> tuple[float, float]:
    """The clipping range [a, b] (a in low..0, b in 0..high) with the least squared error on a histogram.

    Each bin counts as its centre, quantized with the candidate's scale and zero point (clipped
    values cost their distance to the edge). The two ends are searched in turn, `rounds` times
    each, over `steps` fractions of the observed range.
    """
    counts = torch.histc(values.double(), bins, low, high)
    width = (high - low) / bins
    centers = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    fractions = torch.linspace(1.0 / steps, 1.0, steps, dtype=torch.float64)
    top = 2 ** bits - 1

    def errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        step = ((b - a) / top).clamp_min(1e-30)[:, None]
        zero = torch.round(-a[:, None] / step).clamp(0, top)
        levels = torch.clamp(torch.round(centers / step) + zero, 0, top)
        return (((centers - (levels - zero) * step) ** 2) * counts).sum(-1)

    a, b = low, high
    for _ in range(rounds):
        if high > 0:
            candidates = fractions * high
            b = float(candidates[int(torch.argmin(errors(torch.full_like(candidates, a), candidates)))])
        if low < 0:
            candidates = fractions * low
            a = float(candidates[int(torch.argmin(errors(candidates, torch.full_like(candidates, b))))])
    return a, b


def fit_quantizer(values: torch.Tensor, low: float, high: float, config: ActivationQuantConfig) -> ActivationQuantizer:
    """A quantizer for a tensor observed in [low, high] with the sampled `values`, by `config.method`."""
    x = values.to(torch.float32)
    if config.method == "minmax" or not x.numel() or high <= low:
        quantizer = quantizer_for_range(low, high, config.bits)
    elif config.method == "percentile":
        sample = x if x.numel() <= 1 << 24 else x[: 1 << 24]
        tail = 1 - config.percentile / 100
        a = float(torch.quantile(sample, tail)) if low < 0 else 0.0
        quantizer = quantizer_for_range(min(a, 0.0), float(torch.quantile(sample, 1 - tail)), config.bits)
    else:
        quantizer = quantizer_for_range(*_histogram_mse_range(x, min(low, 0.0), max(high, 0.0), config.bits),
                                        config.bits)
    quantizer.relative_error = float(((x - quantizer(x)) ** 2).mean() / (x * x).mean().clamp_min(1e-30)) \
        if x.numel() else float("nan")
    return quantizer


class Observer(nn.Module):
    """Records a tensor's exact min and max and a random sample of its values (the budget per image)."""

    def __init__(self, per_image: float, generator: torch.Generator, point: str = "", group: int = 0):
        super().__init__()
        self.per_image, self.generator, self.point, self.group = per_image, generator, point, group
        self.low, self.high, self.samples, self.images = math.inf, -math.inf, [], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        if flat.numel():
            self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
            budget = max(1, round(self.per_image * self.images))
            if flat.numel() > budget:
                flat = flat[torch.randint(flat.numel(), (budget,), generator=self.generator).to(flat.device)]
            self.samples.append(flat.to(torch.float32).cpu().clone())
        return x

    def fit(self, config: ActivationQuantConfig, others: list["Observer"] = ()) -> ActivationQuantizer:
        observers = [self, *others]
        values = torch.cat([s for o in observers for s in o.samples]) if any(o.samples for o in observers) \
            else torch.zeros(0)
        low, high = min(o.low for o in observers), max(o.high for o in observers)
        if not math.isfinite(low):
            low = high = 0.0
        return fit_quantizer(values, low, high, config)


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    quantizer = getattr(module, ATTRIBUTE, None)
    if quantizer is None or not args:
        return args
    return (quantizer(args[0]),) + tuple(args[1:])


def attach(module: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Quantize `module`'s input with `quantizer` from now on."""
    setattr(module, ATTRIBUTE, quantizer)
    # The hook is found by identity, not by a stored handle: handles do not survive deepcopy.
    if _quantize_input not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_quantize_input)


def detach_input(module: nn.Module) -> None:
    """Remove the input hook quantizer of one module."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _quantize_input:
            del module._forward_pre_hooks[key]
    module.__dict__.pop(ATTRIBUTE, None)


def detach(model: nn.Module) -> None:
    """Remove every activation quantizer from `model` (graph points and input hooks)."""
    graph_points.remove(model)
    for module in model.modules():
        detach_input(module)


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: Any, config: ActivationQuantConfig = ActivationQuantConfig(),
                          batch_size: int = 50, progress: bool = False, inplace: bool = False) -> nn.Module:
    """Return `model` with a quantizer on every tensor an INT8 graph quantizes (a copy unless inplace=True).

    One pass over the first `config.num_images` images with an observer on each tensor, then
    one fit per tensor (see the module's docstring). A model torch.fx cannot trace gets
    quantizers on its conv/linear inputs only.
    """
    if not quantizable_layers(model):
        raise RenormError("the model has no conv or linear layer whose input could be quantized")
    model = model if inplace else copy.deepcopy(model)
    detach(model)
    example = Batches(images, batch_size).first(1)
    graph = graph_points.trace(model)
    generator = torch.Generator().manual_seed(config.seed)
    per_image = config.max_samples / config.num_images
    if graph is not None:
        with eval_mode(model):
            floats = graph_points.float_nodes(model, graph, example.to(_device(model)))
        nodes, groups, _ = graph_points.find_points(model, graph, floats)
        names = [node.name for node in nodes]
        graph_points.insert(model, graph, names, lambda name, group: Observer(per_image, generator, name, group), groups)
        observers = graph_points.installed(model)
    else:
        observers = [Observer(per_image, generator, name) for name, _ in quantizable_layers(model)]
        handles = [module.register_forward_pre_hook(_observing(o)) for o, (_, module) in
                   zip(observers, quantizable_layers(model))]
    try:
        seen = _observe(model, images, observers, config, batch_size, progress)
    finally:
        if graph is None:
            for handle in handles:
                handle.remove()
    if seen == 0:
        detach(model)
        raise no_readable_images(images, "to calibrate activations on")
    if graph is None:
        for observer, (_, module) in zip(observers, quantizable_layers(model)):
            attach(module, observer.fit(config))
        return model
    by_group: dict[int, list[Observer]] = {}
    for observer in observers:
        by_group.setdefault(observer.group, []).append(observer)
    fitted = {group: members[0].fit(config, members[1:]) for group, members in by_group.items()}
    container = model._modules[graph_points.CONTAINER]
    for key, observer in list(container.items()):
        container[key] = graph_points.PointQuantizer(fitted[observer.group], observer.point, observer.group)
    return model


def _observing(observer: Observer):
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        observer(args[0])
    return hook


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _observe(model: nn.Module, images: Any, observers: list[Observer], config: ActivationQuantConfig,
             batch_size: int, progress: bool) -> int:
    """Run the first config.num_images images through the model once; return how many ran."""
    seen = 0
    with eval_mode(model):
        for batch in Batches(images, batch_size, progress, "calibrate activations").images():
            batch = batch[: config.num_images - seen]
            for observer in observers:
                observer.images = len(batch)  # the budget counts the images of this batch, whatever its size
            forward(model, batch)
            seen += len(batch)
            if seen >= config.num_images:
                break
    return seen


def install_points(model: nn.Module, entries: list[dict]) -> None:
    """Re-create saved graph points on a rebuilt model (entries as `activation_points` returns them)."""
    graph = graph_points.trace(model)
    known = {node.name for node in graph.nodes} if graph is not None else set()
    missing = [e["point"] for e in entries if e["point"] not in known]
    if graph is None or missing:
        raise RenormError("the saved activation quantizers do not fit the rebuilt model (its torch.fx graph "
                          f"{'does not trace' if graph is None else 'lacks ' + ', '.join(missing[:3])})")
    quantizers: dict[int, ActivationQuantizer] = {}
    for e in entries:
        quantizers.setdefault(e["group"], ActivationQuantizer(e["scale"], e["zero_point"], e["bits"],
                                                              e.get("relative_error", float("nan"))))
    graph_points.insert(model, graph, [e["point"] for e in entries],
                        lambda name, group: graph_points.PointQuantizer(quantizers[group], name, group),
                        [e["group"] for e in entries])


def activation_points(model: nn.Module) -> list[dict]:
    """The model's graph points as plain records: point (fx node), group, scale, zero point, bits, error."""
    return [{"point": p.point, "group": p.group, "scale": p.quantizer.scale, "zero_point": p.quantizer.zero_point,
             "bits": p.quantizer.bits, "relative_error": p.quantizer.relative_error}
            for p in graph_points.installed(model)]


def input_quantizer(model: nn.Module, layer: str) -> ActivationQuantizer | None:
    """The quantizer of `layer`'s input: its graph point, or its input hook."""
    module = model.get_submodule(layer)
    if getattr(module, ATTRIBUTE, None) is not None:
        return getattr(module, ATTRIBUTE)
    forward_ = model.__dict__.get("forward")
    if not isinstance(forward_, graph_points.PointsForward):
        return None
    for node in forward_.graph.nodes:
        if node.op == "call_module" and node.target == layer:
            source = node.args[0]
            if source.op == "call_module" and source.target.startswith(graph_points.CONTAINER + "."):
                return model.get_submodule(source.target).quantizer
    return None


def activation_quantization_stats(model: nn.Module) -> list[dict]:
    """Per quantized tensor: the point (fx node, or the layer whose input it is), the layers reading it,
    bits, zero point, signed, scale, relative MSE on the calibration sample."""
    rows = []
    forward_ = model.__dict__.get("forward")
    if isinstance(forward_, graph_points.PointsForward):
        readers: dict[str, list[str]] = {}
        for node in forward_.graph.nodes:
            if node.op == "call_module" and not node.target.startswith(graph_points.CONTAINER + ".") and node.args \
                    and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module":
                readers.setdefault(node.args[0].target, []).append(node.target)
        for key, p in model._modules[graph_points.CONTAINER].items():
            q = p.quantizer
            rows.append({"point": p.point, "layers": [r for r in readers.get(f"{graph_points.CONTAINER}.{key}", [])
                                                      if hasattr(model.get_submodule(r), "weight")],
                         "bits": q.bits, "zero_point": q.zero_point, "signed": q.signed, "scale": q.scale,
                         "relative_mse": q.relative_error})
        return rows
    return [{"point": name, "layers": [name], "bits": q.bits, "zero_point": q.zero_point, "signed": q.signed,
             "scale": q.scale, "relative_mse": q.relative_error}
            for name, module in model.named_modules() if (q := getattr(module, ATTRIBUTE, None)) is not None]
