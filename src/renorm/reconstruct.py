"""Reconstruction: choose each quantized weight's code so the layer's output matches FP32.

Re-normalization fixes the statistics compression changes; it cannot fix what rounding
does to each sample. Reconstruction re-rounds every quantized conv/linear layer, on its
existing grid (pow2 or uniform levels, one scale per output channel), so that on the
unlabeled images the layer's output in the quantized network matches the FP32
network's output of the same layer:

    minimise over codes q (and the row scale s)   || X~ (s q)^T + b - X w^T ||^2

X are the layer's inputs in the FP32 network, X~ the inputs the same images produce in
the partly quantized network (everything before the layer already reconstructed), w
the FP32 weights, b a free per-channel offset that the BatchNorm after the layer (or the
layer's bias) absorbs. Only second moments are needed: H = X~^T X~, G = X~^T X and the
means, summed over sampled positions (rows) of the inputs, so memory is O(K^2) per
layer, never the activations of all images. With the offset profiled out and
W* = G^T-solve, the objective is (q - w*) H (q - w*)^T per output channel.

Methods (each on the same statistics):
  gptq      closed-form second-order rounding with error feedback, column by column
            (the OBQ/GPTQ family), largest-curvature columns first; the scale is refitted
            in closed form and the rounding repeated.
  adaround  learned rounding: each weight chooses to round down or up through a
            rectified sigmoid trained with Adam on the same quadratic objective, with an
            annealed regulariser that pushes every choice to 0 or 1 (AdaRound's layer-wise
            objective, computed from H instead of from samples: exact and cheap).
  nearest   round to the nearest level (the baseline; only the offset is corrected).

Layers are handled in execution order, a few at a time: one pass over the images per
group collects the statistics of the group's layers (stopping as soon as the last of
them has run), then each is solved and written back before the next group's pass, so
later layers see -- and compensate -- the rounding of earlier ones.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from renorm.data import Batches
from renorm.errors import RenormError
from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE, QuantizedWeight, nearest_levels, code_values, \
    level_magnitudes, nearest_codes, top_code

METHODS = ("gptq", "adaround", "nearest")
DEFAULT_METHOD = "gptq"  # what --reconstruct turns on: the best measured (docs/RESULTS.md, reconstruction)
INPUTS = ("quantized", "fp32")


@dataclass(frozen=True)
class ReconstructConfig:
    """How to reconstruct. See the module docstring for the methods."""

    method: str = DEFAULT_METHOD
    num_images: int = 256
    inputs: str = "quantized"  # where X~ comes from: the partly quantized network, or FP32 (one pass)
    rows: int = 16  # sampled input rows per layer: rows * K, within [min_rows, max_rows]
    min_rows: int = 2048
    max_rows: int = 16384
    damping: float = 0.01  # of the mean diagonal of H
    rounds: int = 2  # gptq: rounding, scale refit, rounding again
    steps: int = 1000  # adaround: Adam steps per layer
    learning_rate: float = 0.01
    regularization: float = 0.01
    offset: bool = True  # let the next BatchNorm / the bias absorb the mean error
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RenormError(f"--reconstruct-method {self.method!r} is not a method; choose one of "
                              f"{', '.join(METHODS)}")
        if self.inputs not in INPUTS:
            raise RenormError(f"reconstruction inputs {self.inputs!r}: choose one of {', '.join(INPUTS)}")
        if self.num_images < 1:
            raise RenormError(f"--reconstruct-images must be at least 1, got {self.num_images}")


# --------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
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
        h, c = (q.transpose(1, 2) @ q).double(), (q.transpose(1, 2) @ r).double()
        sq, sr = q.double().sum(1), r.double().sum(1)
        if self.hessian is None:
            self.hessian, self.cross, self.sum_quantized, self.sum_reference = h, c, sq, sr
        else:
            self.hessian += h
            self.cross += c
            self.sum_quantized += sq
            self.sum_reference += sr
        self.count += quantized.shape[1]


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
            rows = rows[torch.randperm(len(rows), generator=generator)[:count]]
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
        position = torch.arange(out_h * out_w).expand(n, -1)
    else:
        position = torch.rand(n, out_h * out_w, generator=generator).argsort(1)[:, :per_image]
    top = (position // out_w) * sh
    left = (position % out_w) * sw
    offsets_h = (torch.arange(kh) * dh).repeat_interleave(kw)
    offsets_w = (torch.arange(kw) * dw).repeat(kh)
    rows_index = top[..., None] + offsets_h  # (n, P, kh*kw)
    cols_index = left[..., None] + offsets_w
    image_index = torch.arange(n)[:, None, None]
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


# --------------------------------------------------------------------------- solvers
@dataclass
class Problem:
    """One layer's rounding problem, per group of the weight.

    weight (G, R, K): FP32 weights; target (G, R, K): the unconstrained best weights W*;
    hessian (G, K, K): damped curvature of the objective; linear (G, R, K) = W* H (so the
    objective is q H q^T - 2 q . linear + const); scale (G, R): starting row scales;
    mask (G, R, K) bool or None.
    """

    weight: torch.Tensor
    target: torch.Tensor
    hessian: torch.Tensor
    scale: torch.Tensor
    scheme: str
    bits: int
    mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def linear(self) -> torch.Tensor:
        if "linear" not in self._cache:
            self._cache["linear"] = self.target @ self.hessian  # H symmetric
        return self._cache["linear"]

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ's column order (largest curvature first) and the upper Cholesky factor of H^-1 in that order."""
        if "factor" not in self._cache:
            size = self.hessian.shape[-1]
            order = torch.argsort(torch.diagonal(self.hessian, dim1=1, dim2=2), dim=1, descending=True)
            permuted = self.hessian.gather(1, order[:, :, None].expand(-1, -1, size)).gather(
                2, order[:, None, :].expand(-1, size, -1))
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(permuted))
            self._cache["factor"] = order, torch.linalg.cholesky(inverse, upper=True)
        return self._cache["factor"]

    def levels(self, weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Nearest grid level (in units of the scale) of `weights` for row scales broadcast to them."""
        return nearest_levels(weights / scale, self.scheme, self.bits)

    def error(self, quantized: torch.Tensor) -> torch.Tensor:
        """Objective (q - W*) H (q - W*)^T per row, (G, R)."""
        delta = quantized - self.target
        return ((delta @ self.hessian) * delta).sum(-1)

    def refit_scale(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Closed-form best row scale for fixed levels: <v, W*H> / <v, vH>."""
        numerator = (values * self.linear).sum(-1)
        denominator = ((values @ self.hessian) * values).sum(-1)
        new = numerator / denominator.clamp_min(1e-300)
        return torch.where((denominator > 0) & (new > 0), new, scale)


def solve_nearest(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Round W* to the nearest level at the starting scale; return (levels (G, R, K), scale (G, R))."""
    levels = problem.levels(problem.target, problem.scale[..., None])
    if problem.mask is not None:
        levels = levels * problem.mask
    return levels, problem.scale


@contextmanager
def _threads(count: int):
    """Run the block with `count` intra-op threads: loops of tiny ops are slower with more (each op
    waits at a barrier for every thread, and on a shared machine for threads that are not running)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _small(tensor: torch.Tensor) -> int:
    """Threads worth using for element-wise work on a tensor of this size."""
    return 1 if tensor.numel() < 1 << 16 else torch.get_num_threads()


def _gptq_round(problem: Problem, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """One GPTQ pass at fixed row scales; returns the levels (G, R, K)."""
    groups, rows, size = problem.target.shape
    order, upper = problem.factor()
    inverse_order = torch.argsort(order, dim=1)
    gather = order[:, None, :].expand(groups, rows, size)
    work = problem.target.gather(2, gather).clone()
    mask = problem.mask.gather(2, gather) if problem.mask is not None else None
    result = torch.zeros_like(work)
    row_scale = scale[..., None]
    for start in range(0, size, block):
        stop = min(start + block, size)
        chunk = work[:, :, start:stop].clone()
        errors = torch.zeros_like(chunk)
        corner = upper[:, start:stop, start:stop]
        with _threads(_small(chunk)):
            _gptq_block(problem, chunk, errors, corner, result[:, :, start:stop], row_scale,
                        mask[:, :, start:stop] if mask is not None else None)
        work[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    return result.gather(2, inverse_order[:, None, :].expand(groups, rows, size))


def _gptq_block(problem: Problem, chunk: torch.Tensor, errors: torch.Tensor, corner: torch.Tensor,
                result: torch.Tensor, row_scale: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Round one block of columns in place, feeding each column's error to the columns after it."""
    for i in range(chunk.shape[-1]):
        column = chunk[:, :, i:i + 1]
        levels = problem.levels(column, row_scale)
        if mask is not None:
            levels = levels * mask[:, :, i:i + 1]
        result[:, :, i:i + 1] = levels
        error = (column - levels * row_scale) / corner[:, i, i][:, None, None]
        chunk[:, :, i:] -= error * corner[:, None, i, i:]
        errors[:, :, i:i + 1] = error


def solve_gptq(problem: Problem, rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding; between rounds the row scales are refitted in closed form."""
    best_values, best_scale = solve_nearest(problem)  # at 2 bits, error feedback can lose to it
    best_error = problem.error(best_values * best_scale[..., None])
    scale = problem.scale
    for _ in range(max(1, rounds)):
        values = _gptq_round(problem, scale)
        error = problem.error(values * scale[..., None])
        better = error < best_error
        best_values = torch.where(better[..., None], values, best_values)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
        scale = problem.refit_scale(values, scale)
    # the closed-form scale for the final levels never increases the error
    refit = problem.refit_scale(best_values, best_scale)
    return best_values, refit


def _neighbours(x: torch.Tensor, scheme: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid levels just below and just above |x| (x in units of the scale), as magnitudes."""
    magnitudes = level_magnitudes(scheme, bits).to(x.dtype)
    top = float(magnitudes[-1])
    size = x.abs().clamp(max=top)
    index = (torch.searchsorted(magnitudes, size.contiguous(), right=True) - 1).clamp(0, len(magnitudes) - 1)
    lower = magnitudes[index]
    upper = magnitudes[(index + 1).clamp(max=len(magnitudes) - 1)]
    return lower, torch.where(size >= top, lower, upper)


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


def solve_adaround(problem: Problem, steps: int = 1000, learning_rate: float = 0.01,
                   regularization: float = 0.01, warmup: float = 0.2,
                   start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned rounding (up or down per weight) on the quadratic objective; returns (values, scale)."""
    scale = problem.scale if start is None else start[1]
    row_scale = scale[..., None]
    x = problem.target / row_scale
    sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    lower, upper = _neighbours(x, problem.scheme, problem.bits)
    if problem.mask is not None:
        lower, upper = lower * problem.mask, upper * problem.mask
    gap = upper - lower
    if start is not None:  # start from a given rounding (e.g. GPTQ's): up where it rounded up
        fraction = ((start[0].abs() - lower) / gap.clamp_min(1e-12)).clamp(0.25, 0.75)
    else:
        fraction = ((x.abs().clamp(max=upper) - lower) / gap.clamp_min(1e-12)).clamp(0.01, 0.99)
    logits = -torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1)
    logits = logits.float().requires_grad_(True)
    hessian = problem.hessian.float()
    target = problem.target.float()
    lower_f, gap_f, sign_f, scale_f = lower.float(), gap.float(), sign.float(), row_scale.float()
    nearest = sign * torch.where(x.abs() - lower >= gap / 2, upper, lower) * row_scale
    normalizer = float(problem.error(nearest).sum().clamp_min(1e-30))
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    free = gap_f > 0
    count = max(1, int(free.sum()))
    warm = int(warmup * steps)
    with torch.enable_grad(), _threads(_small(logits)):
        for step in range(steps):
            soft = (torch.sigmoid(logits) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
            delta = sign_f * (lower_f + soft * gap_f) * scale_f - target
            loss = ((delta @ hessian) * delta).sum() / normalizer
            if step >= warm:
                beta = 20 + (2 - 20) * (step - warm) / max(1, steps - warm)
                loss = loss + regularization * ((1 - (2 * soft[free] - 1).abs() ** beta).sum() / count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    up = (logits.detach() >= 0).to(x.dtype)
    values = sign * (lower + up * gap)
    candidate = values * row_scale
    # never worse than nearest rounding, row by row
    better = problem.error(candidate) <= problem.error(nearest)
    values = torch.where(better[..., None], values, nearest / row_scale)
    return values, problem.refit_scale(values, scale)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "nearest": lambda problem, config: solve_nearest(problem),
    "gptq": lambda problem, config: solve_gptq(problem, config.rounds),
    "adaround": lambda problem, config: solve_adaround(problem, config.steps, config.learning_rate,
                                                       config.regularization),
}


# --------------------------------------------------------------------------- the stage
@dataclass
class _Layer:
    name: str
    module: nn.Module  # in the model being reconstructed
    reference: nn.Module  # the same layer in the FP32 model
    sink: nn.Module | None = None  # the BatchNorm that takes this layer's output, if any
    sink_reference: nn.Module | None = None  # that BatchNorm in the FP32 model


def _trace(model: nn.Module, example: torch.Tensor, names: set[str]) -> tuple[list[str], dict[str, str]]:
    """Execution order of the named layers, and the name of the BatchNorm fed directly by each."""
    order: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    sinks: dict[str, str] = {}
    handles = []
    modules = dict(model.named_modules())

    def after(name: str):
        def hook(_module, _args, output):
            if name not in outputs:
                order.append(name)
                outputs[name] = output
        return hook

    def before(bn_name: str):
        def hook(_module, args):
            for name, output in outputs.items():
                if args and args[0] is output and name not in sinks:
                    sinks[name] = bn_name
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(after(name)))
    for bn_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            handles.append(module.register_forward_pre_hook(before(bn_name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order, sinks


def _count_images(images: Any, limit: int) -> int:
    try:
        return min(limit, len(images.dataset) if hasattr(images, "dataset") else len(images))
    except TypeError:
        return limit


def _limited(stream: Batches, limit: int, chunk: int):
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


class _Sampler:
    """Input rows of each layer at seeded positions: the same positions in both networks."""

    def __init__(self, layers: list[_Layer], count: int, config: ReconstructConfig):
        self.index = {layer.name: i for i, layer in enumerate(layers)}
        self.budget = {layer.name: min(config.max_rows, max(config.min_rows,
                                                            config.rows * layer.module.weight[0].numel()))
                       for layer in layers}
        self.count, self.seed = count, config.seed

    def __call__(self, name: str, chunk_index: int, x: torch.Tensor, site: _Site) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk_index * 7919 + self.index[name])
        return _rows(x, site, -(-self.budget[name] * len(x) // self.count), generator)


def _reference_rows(layers: list[_Layer], reference: nn.Module, chunks: Callable, sampler: _Sampler
                    ) -> dict[str, list[torch.Tensor]]:
    """One pass of the FP32 model: every layer's sampled input rows, per chunk of images."""
    cached: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    reference_ids = {id(layer.reference.weight): layer.name for layer in layers}
    for chunk_index, images in enumerate(chunks()):
        def on_reference(name: str, x: torch.Tensor, site: _Site) -> None:
            cached[name].append(sampler(name, chunk_index, x, site))

        _run_until(reference, images, _Capture(reference_ids, on_reference))
    return cached


def _collect(layer: _Layer, model: nn.Module, chunks: Callable, sampler: _Sampler,
             reference_rows: list[torch.Tensor], inputs: str) -> LayerStats:
    """The layer's statistics: its inputs in the model as it now is (one pass that stops at the layer)."""
    stats = LayerStats()
    if inputs == "fp32":
        for rows in reference_rows:
            stats.add(rows, rows)
        return stats
    for chunk_index, images in enumerate(chunks()):
        def on_model(name: str, x: torch.Tensor, site: _Site) -> None:
            stats.add(sampler(name, chunk_index, x, site), reference_rows[chunk_index])

        _run_until(model, images, _Capture({id(layer.module.weight): layer.name}, on_model))
    return stats


def _problem(layer: _Layer, stats: LayerStats, quantized: QuantizedWeight,
             config: ReconstructConfig) -> tuple[Problem, torch.Tensor, torch.Tensor, bool]:
    """The layer's Problem, plus the input means (quantized, reference) and whether an offset is absorbed."""
    weight = layer.reference.weight.detach().double()
    groups = stats.hessian.shape[0]
    shaped = weight.reshape(groups, weight.shape[0] // groups, -1)
    n = max(stats.count, 1)
    hessian, cross = stats.hessian / n, stats.cross / n
    mean_q, mean_r = stats.sum_quantized / n, stats.sum_reference / n
    absorb = config.offset and (layer.sink is not None or getattr(layer.module, "bias", None) is not None)
    if absorb:
        hessian = hessian - mean_q[:, :, None] * mean_q[:, None, :]
        cross = cross - mean_q[:, :, None] * mean_r[:, None, :]
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
    damping = config.damping * diagonal.mean(1).clamp_min(1e-12)
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    damped = hessian + damping[:, None, None] * eye
    rhs = shaped @ cross.transpose(1, 2) + damping[:, None, None] * shaped
    target = torch.linalg.solve(damped, rhs.transpose(1, 2)).transpose(1, 2)
    mask = getattr(layer.module, MASK_ATTRIBUTE, None)
    mask = mask.reshape(shaped.shape).float() if mask is not None else None
    scale = quantized.scale.float().reshape(shaped.shape[:2])
    # the solvers work in float32, as GPTQ does (float64 products are several times slower here)
    problem = Problem(shaped.float(), target.float(), damped.float(), scale, quantized.scheme, quantized.bits, mask)
    return problem, mean_q.float(), mean_r.float(), absorb


@torch.no_grad()
def _apply(layer: _Layer, problem: Problem, values: torch.Tensor, scale: torch.Tensor, mean_q: torch.Tensor,
           mean_r: torch.Tensor, absorb: bool, quantized: QuantizedWeight) -> dict[str, Any]:
    weight = layer.module.weight
    new = values * scale[..., None]
    codes = nearest_codes(values, problem.scheme, problem.bits).reshape(weight.shape)
    flat_scale = scale.reshape(-1).float()
    record = QuantizedWeight(codes, flat_scale, quantized.scheme, quantized.bits, quantized.axis)
    weight.copy_(record.dequantize().to(weight.dtype))
    fp32 = problem.weight.reshape(weight.shape)
    record.relative_error = float(((fp32 - weight.double()) ** 2).sum() / (fp32 ** 2).sum().clamp_min(1e-30))
    setattr(layer.module, ATTRIBUTE, record)
    if absorb:
        offset = ((new * mean_q[:, None, :]).sum(-1) - (problem.weight * mean_r[:, None, :]).sum(-1)).reshape(-1)
        if layer.sink is not None:
            reference_sink = layer.sink_reference
            layer.sink.running_mean.copy_((reference_sink.running_mean.double() + offset).to(layer.sink.running_mean.dtype))
            layer.sink.running_var.copy_(reference_sink.running_var)
        else:
            layer.module.bias.copy_((layer.reference.bias.double() - offset).to(layer.module.bias.dtype))
    nearest, _ = solve_nearest(problem)
    rtn = problem.error(nearest * problem.scale[..., None])
    return {"layer": layer.name, "bits": quantized.bits, "scheme": quantized.scheme,
            "objective_nearest": float(rtn.sum()), "objective": float(problem.error(new).sum())}


@torch.no_grad()
def reconstruct(model: nn.Module, reference: nn.Module, images: Any, config: ReconstructConfig = ReconstructConfig(),
                batch_size: int = 50, chunk: int = 32, inplace: bool = False, progress: bool = False) -> nn.Module:
    """Return `model` (weight-quantized) with its codes re-chosen to match `reference` (a copy unless inplace).

    model: the output of quantize_weights (layers without codes are left alone).
    reference: the FP32 model it was quantized from (after the same pruning, if any).
    images: unlabeled images (ImageSource, tensor or DataLoader); the first
    config.num_images are used. Each layer's record gets its objective before and after.
    """
    import copy

    from tqdm.auto import tqdm

    if isinstance(model, torch.jit.ScriptModule) or isinstance(reference, torch.jit.ScriptModule):
        raise RenormError("a TorchScript model cannot be reconstructed; load the eager model instead")
    work = model if inplace else copy.deepcopy(model)
    flags = [(m, m.training) for m in reference.modules()]
    work.eval()
    reference.eval()
    try:
        _reconstruct(work, reference, images, config, batch_size, chunk, progress, tqdm)
    finally:
        for module, flag in flags:
            module.training = flag
    return work


def _reconstruct(work: nn.Module, reference: nn.Module, images: Any, config: ReconstructConfig, batch_size: int,
                 chunk: int, progress: bool, tqdm) -> None:
    modules, reference_modules = dict(work.named_modules()), dict(reference.named_modules())
    quantized = {name: m for name, m in modules.items() if getattr(m, ATTRIBUTE, None) is not None}
    if not quantized:
        raise RenormError("the model has no quantized layer to reconstruct; run quantize_weights first")
    for name, module in quantized.items():
        other = reference_modules.get(name)
        if other is None or getattr(other, "weight", None) is None or other.weight.shape != module.weight.shape:
            raise RenormError(f"the reference has no layer {name!r} of the same shape; pass the FP32 model that "
                              "was quantized (after the same pruning)")
    stream = Batches(images, batch_size, False)
    count = _count_images(images if not isinstance(images, Batches) else images.data, config.num_images)
    example = stream.first(1)
    order, sinks = _trace(work, example, set(quantized))
    layers = [_Layer(name, quantized[name], reference_modules[name],
                     modules.get(sinks[name]) if name in sinks else None,
                     reference_modules.get(sinks[name]) if name in sinks else None) for name in order]
    sampler = _Sampler(layers, count, config)

    def chunks():
        return _limited(stream, count, chunk)

    cached = _reference_rows(layers, reference, chunks, sampler)
    with tqdm(total=len(layers), desc=f"reconstruct ({config.method})", unit="layer", disable=not progress,
              leave=False) as bar:
        for layer in layers:
            reference_rows = cached.pop(layer.name)
            if reference_rows:
                stats = _collect(layer, work, chunks, sampler, reference_rows, config.inputs)
                record = getattr(layer.module, ATTRIBUTE)
                problem, mean_q, mean_r, absorb = _problem(layer, stats, record, config)
                values, scale = SOLVERS[config.method](problem, config)
                summary = _apply(layer, problem, values, scale, mean_q, mean_r, absorb, record)
                getattr(layer.module, ATTRIBUTE).reconstruction = summary
            bar.update(1)
