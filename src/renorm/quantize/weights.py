"""Weight quantizers: power-of-two (the paper's Quasi-Lloyd-Max), uniform, and min-max.

Every output channel c of a layer gets a scale alpha_c and integer codes; the weight
becomes alpha_c * value(code). `pow2` and `uniform` fit alpha and the codes by
alternating minimisation of ||W_c - alpha_c * Q_c||^2 (codes <- nearest level of
W/alpha; alpha <- <W, Q> / <Q, Q>), from several starting scales, keeping per channel
the lowest error. `minmax` (alpha = max|W| / top level) is the naive baseline.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from renorm.quantize.plan import check_bits, check_layer_bits, plan_bits
# QUANTIZABLE is imported for code that still looks for it here, its old home.
from renorm.layers import QUANTIZABLE, check_layer_names, first_and_last, quantizable_layers  # noqa: F401

def top_code(scheme: str, bits: int) -> int:
    """Largest code, 2^(b-1) - 1: uniform levels are -m..m; pow2 codes +-k stand for +-2^(k-1)."""
    return 2 ** (bits - 1) - 1


def code_values(codes: torch.Tensor, scheme: str) -> torch.Tensor:
    """Real-valued level of each integer code (before multiplying by the scale)."""
    if scheme == "pow2":
        magnitude = _exp2_int((codes.abs().to(torch.int32) - 1).clamp_min(0))
        return torch.where(codes == 0, 0.0, magnitude.copysign(codes.to(torch.float32)))
    return codes.to(torch.float32)


def _exp2_int(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent for int32 exponents in -126..127, built from the float32 bit pattern."""
    return ((exponent + 127) << 23).view(torch.float32)


def _floor_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """floor(log2(m)) of non-negative float32 m, read from the exponent bits (-127 for 0)."""
    return (magnitude.view(torch.int32) >> 23) - 127


def nearest_levels(x: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """The level nearest to each element of x (x already divided by the scale), as floats."""
    top = top_code(scheme, bits)
    if scheme == "pow2":
        magnitude = x.abs().to(torch.float32)
        # Between 2^k and 2^(k+1) the midpoint is 1.5 * 2^k; below 0.5 the nearest level is 0.
        exponent = _floor_log2(magnitude * (4.0 / 3.0)).clamp(0, top - 1)
        return torch.where(magnitude >= 0.5, _exp2_int(exponent), 0.0).copysign(x)
    # Round half away from zero, as the boundary search in _fit_rows does (torch.fake_quantize_per_channel_affine
    # rounds half to even: it gives another level at exact ties, so it is not used here).
    return torch.floor(x.abs() + 0.5).clamp(max=top).copysign(x)


def nearest_codes(x: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """Integer code of the level nearest to each element of x (x already divided by the scale)."""
    levels = nearest_levels(x, scheme, bits)
    if scheme == "pow2":
        codes = torch.where(levels == 0, 0, _floor_log2(levels.abs()) + 1)
        return (codes * torch.sign(levels).to(torch.int32)).to(torch.int8)
    return levels.to(torch.int8)


def _start_divisors(scheme: str, bits: int) -> list[float]:
    """Starting scales are max|W| / d: the largest weight on the top level, or above it (clipping)."""
    top = top_code(scheme, bits)
    if scheme == "minmax":
        return [float(top)]
    if scheme == "pow2":
        top_level = 2.0 ** (top - 1)
        return [top_level * 2.0 ** j for j in (-1, 0, 1) if top_level * 2.0 ** j >= 1]
    # (measured on the reference models, more starting points change the error by < 0.5%). The clipping
    # start (top * 1.6) stays at 8 bits too: without it EfficientNet-Lite0 W8 + shift agreed with FP32 on
    # 92.0% of photo crops instead of 94.7% (docs/results/activations.md), though the reference models
    # did not notice and it takes most of a W8 fit's time.
    return [float(t) for t in (top - 1,) if t >= 1] + [float(top), top * 1.6]


# From 6 bits up the alternation creeps: with many levels each step moves a few weights to the next level.
# Stopping at 30 steps instead of 100 raised the 8-bit weight error by 0.10% of itself (fmnist-resnet18
# 1.0248e-4 -> 1.0259e-4, EfficientNet-Lite0 6.147e-5 -> 6.153e-5) in 0.57x the time; dropping the
# third start instead cost 1.7% (fit_channels over every conv/linear layer of each model, 8-bit uniform;
# tests/test_quantize.py holds it within 0.2% of 100 steps on fmnist-resnet18).
HIGH_BITS_ITERATIONS = 30


def level_magnitudes(scheme: str, bits: int) -> torch.Tensor:
    """Non-negative level magnitudes, ascending: 0, 1, 2, 4, ... (pow2) or 0, 1, 2, 3, ... (uniform)."""
    top = top_code(scheme, bits)
    return code_values(torch.arange(top + 1, dtype=torch.int32, device="cpu"), scheme).to(torch.float64)


@torch.no_grad()
def fit_channels(weight: torch.Tensor, scheme: str, bits: int, max_iterations: int = 100,
                 tolerance: float = 1e-6, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit per-row scales and codes for a (C, K) matrix; return (scale (C,), codes int8 (C, K))."""
    check_bits(scheme, bits)
    if bits >= 6:
        max_iterations = min(max_iterations, HIGH_BITS_ITERATIONS)
    w = weight.detach().to(torch.float32)
    rows_per_chunk = max(1, chunk_elements // max(1, w.shape[1]))
    scale = torch.cat([_fit_rows(w[i:i + rows_per_chunk], scheme, bits, max_iterations, tolerance)
                       for i in range(0, len(w), rows_per_chunk)]) if len(w) else torch.zeros(0, device=w.device)
    return scale, nearest_codes(w / scale[:, None], scheme, bits)


def _fit_rows(w: torch.Tensor, scheme: str, bits: int, max_iterations: int, tolerance: float) -> torch.Tensor:
    """Best scale per row over the starting points; each start refined by alternation.

    The rows are sorted by magnitude once; then each step's level assignment is a search of
    the decision boundaries (midpoints between levels) and its sums come from prefix sums,
    so a step costs O(levels * log K) per row instead of O(K). A row stops once its scale
    changes by less than the tolerance (relative); the others go on.
    """
    magnitudes = level_magnitudes(scheme, bits).to(w.device)
    boundaries = ((magnitudes[1:] + magnitudes[:-1]) / 2).to(torch.float32)
    sorted_abs = w.abs().sort(dim=1).values
    prefix = torch.nn.functional.pad(sorted_abs.double().cumsum(1), (1, 0))
    total_sq = (w.double() ** 2).sum(1)
    max_abs = sorted_abs[:, -1] if w.shape[1] else torch.zeros(len(w), device=w.device)
    safe_max = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs)).double()

    def sums(scale: torch.Tensor, values: torch.Tensor = sorted_abs,
             sums_of: torch.Tensor = prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """<|W|, |Q|> and <Q, Q> for the nearest-level assignment at `scale` (rows of `values`, sorted)."""
        edges = torch.searchsorted(values, (scale[:, None] * boundaries[None, :].double()).float())
        edges = torch.cat([edges, torch.full((len(values), 1), w.shape[1], device=w.device)], dim=1)
        in_bin = sums_of.gather(1, edges[:, 1:]) - sums_of.gather(1, edges[:, :-1])
        counts = (edges[:, 1:] - edges[:, :-1]).double()
        return (in_bin * magnitudes[1:]).sum(1), (counts * magnitudes[1:] ** 2).sum(1)

    best_scale = best_error = None
    for divisor in _start_divisors(scheme, bits):
        scale = safe_max / divisor
        # the rows still moving by more than the tolerance: `rows` index the working copies, which are
        # re-gathered when half of them have stopped
        rows, values, sums_of = torch.arange(len(w), device=w.device), sorted_abs, prefix
        active = torch.arange(len(w), device=w.device)
        for _ in range(max_iterations if scheme != "minmax" else 0):
            if len(active) <= len(rows) // 2:
                rows, values, sums_of = rows[active], values[active], sums_of[active]
                active = torch.arange(len(rows), device=w.device)
            full = len(active) == len(rows)
            current = scale[rows[active]]
            wq, qq = sums(current, values if full else values[active], sums_of if full else sums_of[active])
            new = torch.where(qq > 0, wq / qq.clamp_min(1e-300), current)
            scale[rows[active]] = new
            active = active[(new - current).abs() > tolerance * current]
            if not len(active):
                break
        wq, qq = sums(scale)
        error = total_sq - 2 * scale * wq + scale * scale * qq
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error - 1e-9 * total_sq  # ties (e.g. exact fits) keep the earlier start
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale.float()


class QuantizedWeight(nn.Module):
    """Integer codes and per-channel scales of one layer's weight, kept for export.

    A module whose codes and scale are buffers, set on its layer as a submodule: so
    `.to(device)` and `.to(dtype)` move them with the weight. The buffers are not
    persistent: the model's state_dict keys stay those of the float model (renorm's
    files store the codes themselves, packed; see renorm.export).
    """

    codes: torch.Tensor  # int8, same shape as the weight
    scale: torch.Tensor  # float32, one per output channel

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, scheme: str, bits: int, axis: int,
                 relative_error: float = float("nan"), reconstruction: dict | None = None):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float32, device=codes.device)
        self.register_buffer("scale", scale, persistent=False)
        self.scheme, self.bits, self.axis = scheme, bits, axis  # axis: the output-channel axis of the weight
        self.relative_error = relative_error  # ||W - Wq||^2 / ||W||^2 at quantization time
        self.reconstruction = reconstruction  # objective before / after, when renorm.reconstruct re-chose the codes

    def dequantize(self) -> torch.Tensor:
        shape = [1] * self.codes.dim()
        shape[self.axis] = -1
        return code_values(self.codes, self.scheme) * self.scale.reshape(shape)

    @property
    def levels_used(self) -> int:
        return int(torch.unique(self.codes).numel())

    def extra_repr(self) -> str:
        return f"{self.scheme}, bits={self.bits}, shape={tuple(self.codes.shape)}"


def output_axis(module: nn.Module) -> int:
    """Weight axis of output channels: 1 for transposed convs (in, out/groups, ...), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


@torch.no_grad()
def quantize_tensor(weight: torch.Tensor, scheme: str, bits: int, axis: int = 0,
                    mask: torch.Tensor | None = None, max_iterations: int = 100,
                    tolerance: float = 1e-6) -> QuantizedWeight:
    """Quantize a weight tensor per output channel; masked-out (pruned) weights stay zero."""
    w = weight.detach().to(torch.float32)
    if mask is not None:
        w = w * mask
    moved = w.movedim(axis, 0)
    scale, codes = fit_channels(moved.reshape(moved.shape[0], -1), scheme, bits, max_iterations, tolerance)
    codes = codes.reshape(moved.shape).movedim(0, axis).contiguous()
    if mask is not None:
        codes = codes * mask.to(torch.int8)
    quantized = QuantizedWeight(codes, scale, scheme, bits, axis)
    quantized.relative_error = float(((w - quantized.dequantize()) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
    return quantized


# --------------------------------------------------------------------------- whole models
@dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize a model's conv/linear weights. bits=32 leaves them in float."""

    bits: int = 4
    scheme: str = "pow2"
    first_last_bits: int = 8  # first conv and last linear, uniform; 0 leaves them in float
    exclude: tuple[str, ...] = ()  # layer names left in float
    max_iterations: int = 100
    tolerance: float = 1e-6
    layer_bits: tuple[tuple[str, int], ...] = ()  # (pattern, bits), later ones win; see renorm.quantize.plan

    def __post_init__(self) -> None:
        if self.bits != 32:
            check_bits(self.scheme, self.bits)
        if self.first_last_bits != 0:
            check_bits("uniform", self.first_last_bits, "--first-last-bits", 0)
        for pattern, bits in self.layer_bits:
            check_layer_bits(pattern, bits)


ATTRIBUTE = "_renorm_quantized"  # where a module keeps its QuantizedWeight
MASK_ATTRIBUTE = "_renorm_mask"  # where pruning keeps a module's weight mask


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Keep `mask` (True where a weight survives pruning) on `module`, as a buffer that follows .to(device)."""
    if MASK_ATTRIBUTE in module._buffers:
        module._buffers[MASK_ATTRIBUTE] = mask
    else:
        module.__dict__.pop(MASK_ATTRIBUTE, None)
        module.register_buffer(MASK_ATTRIBUTE, mask, persistent=False)


@torch.no_grad()
def quantize_weights(model: nn.Module, config: WeightQuantConfig = WeightQuantConfig(),
                     progress: bool = False, example: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """Return `model` with quantized conv/linear weights (a copy unless inplace=True).

    The weights stay float, holding the dequantized values; each layer keeps its integer
    codes and scales for export. example: a batch of input images; the first and last
    layer (config.first_last_bits) are then the first and last to run, else the first
    and last registered (renorm.layers.first_and_last).
    """
    from tqdm.auto import tqdm

    check_layer_names(model, config.exclude, "--exclude")
    model = model if inplace else copy.deepcopy(model)
    layers = quantizable_layers(model)
    if config.bits == 32 and not config.layer_bits:
        return model
    plans = layer_plans(model, config, example)
    for name, module in tqdm(layers, desc="quantize weights", unit="layer", disable=not progress, leave=False):
        plan = plans[name]
        if plan is None:
            continue
        scheme, bits = plan.scheme, plan.bits
        quantized = quantize_tensor(module.weight, scheme, bits, output_axis(module),
                                    getattr(module, MASK_ATTRIBUTE, None), config.max_iterations, config.tolerance)
        module.weight.copy_(quantized.dequantize())
        setattr(module, ATTRIBUTE, quantized)
    return model


def layer_plans(model: nn.Module, config: WeightQuantConfig, example: torch.Tensor | None = None) -> dict:
    """Scheme and bits (a LayerPlan, or None for float) of every conv/linear layer under `config`.

    example: a batch of input images, to find the first and last layer by execution (see quantize_weights).
    """
    layers = quantizable_layers(model)
    ends = first_and_last(model, example) or (None, None)
    default = config.bits if config.bits != 32 else 32
    return plan_bits(layers, default, config.scheme, config.first_last_bits, config.exclude, config.layer_bits, ends)


def weight_quantization_stats(model: nn.Module) -> list[dict]:
    """Per quantized layer: name, bits, scheme, distinct levels used, relative MSE, shape."""
    rows = []
    for name, module in model.named_modules():
        quantized = getattr(module, ATTRIBUTE, None)
        if quantized is not None:
            rows.append({"layer": name, "bits": quantized.bits, "scheme": quantized.scheme,
                         "levels_used": quantized.levels_used, "relative_mse": quantized.relative_error,
                         "shape": list(quantized.codes.shape)})
            if quantized.reconstruction:
                rows[-1]["reconstruction"] = {k: v for k, v in quantized.reconstruction.items()
                                              if k.startswith("objective") or k == "damping"}
    return rows
