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
layer. With the offset profiled out and W* = (H + lambda I)^-1 (G + lambda I) w (ridge
towards the FP32 weights), the objective is (q - W*) (H + lambda I) (q - W*)^T per
output channel.

Methods (each on the same statistics):
  gptq      closed-form second-order rounding with error feedback, column by column
            (the OBQ/GPTQ family), largest-curvature columns first; the scale is refitted
            in closed form and the rounding repeated. With `sweeps` > 0, coordinate descent
            follows: weight by weight (every row at once), move to the level just below or
            above where that lowers the objective, the gradient updated after every move;
            then the scale is refitted, and a row keeps GPTQ's rounding where that is no worse. Off by default: it lowers the objective and helps resnet18 at 2 bits,
            but is level on mobilenet_v2 and on Lite0 (docs/RESULTS.md).
  adaround  learned rounding: each weight chooses to round down or up through a
            rectified sigmoid trained with Adam on the same quadratic objective, with an
            annealed regulariser that pushes every choice to 0 or 1 (AdaRound's layer-wise
            objective, computed from H instead of from samples: exact and cheap).
  nearest   round to the nearest level (the baseline; only the offset is corrected).

With `refined` > 0 the images are the first num_images and `refined` more, copies of the
next calibration images moved until the FP32 network's BatchNorm layers see their running
(training-set) statistics (renorm.reconstruct.refine): a few photos leave many channels
quiet, and the refined images excite them as the training set did.

Layers are handled one at a time in execution order, and each is solved and written
back before the next one's inputs are measured, so later layers see -- and compensate --
the rounding of earlier ones. When the model traces with torch.fx this costs one pass of
the quantized model (each node runs once per chunk of images; the values of the nodes
still to be used are kept for all chunks, one cut through the network); otherwise one
pass per layer, each stopping at its layer. The FP32 model runs once; its rows are kept.
Where a layer sees fewer input rows than it has weight columns (`min_rows_per_input`; a
classifier sees one row per image, and so do the last convs of a network on small images),
undoing earlier error would fit noise: its target is then the FP32 weights under the
quantized inputs. At 4 rows per column instead of 1 (the value before 2026-11-28) more of
the Fashion-MNIST resnet18's deep layers fell back to that, and W2 lost 0.5 point.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from renorm.data import Batches
from renorm.device import model_device
from renorm.errors import RenormError
from renorm.forward import eval_mode, forward
from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE, QuantizedWeight, nearest_codes
from renorm.reconstruct.inputs import (Layer, LayerStats, Moments, Sampler, collect, count_images, cut_bytes, graph_of,
                                       layer_major,
                                       limited, sample_reference)
from renorm.reconstruct.refine import refine_images
from renorm.renormalize import batchnorm_layers
from renorm.reconstruct.solvers import SOLVERS, Problem, solve_adaround, solve_gptq, solve_nearest

__all__ = ["METHODS", "DEFAULT_METHOD", "Problem", "ReconstructConfig", "reconstruct", "solve_adaround", "solve_gptq",
           "solve_nearest"]

METHODS = ("gptq", "adaround", "nearest")
DEFAULT_METHOD = "gptq"  # what --reconstruct turns on: the best measured (docs/RESULTS.md, reconstruction)
INPUTS = ("quantized", "fp32")
EXECUTORS = ("auto", "traced", "rerun")
FALLBACK_DAMPING = 0.1  # damping="auto" with a single chunk of images (no fold to hold out)


@dataclass(frozen=True)
class ReconstructConfig:
    """How to reconstruct. See the module docstring for the methods."""

    method: str = DEFAULT_METHOD
    num_images: int = 256
    inputs: str = "quantized"  # where X~ comes from: the partly quantized network, or FP32 (one pass)
    rows: int = 16  # sampled input rows per layer: rows * K, within [min_rows, max_rows]
    min_rows: int = 2048
    max_rows: int = 16384
    # ridge added to H (and pulling W* towards the FP32 weights), in units of H's mean diagonal. GPTQ's usual
    # 0.01 fits the noise of a few hundred images on EfficientNet-Lite0 (W4 KL 0.44 against 0.27 at 0.1; within
    # 0.22 point on the references; docs/RESULTS.md). "auto" picks it per layer from damping_grid by
    # cross-validation over two folds of the images (_choose_damping): best on mobilenet_v2, not on Lite0,
    # at 1.5-4x the time
    damping: float | str = 0.1
    damping_grid: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0)
    rounds: int = 2  # gptq: rounding, scale refit, rounding again
    sweeps: int = 0  # gptq: coordinate-descent sweeps over the weights after the rounding (see Methods)
    steps: int = 1000  # adaround: Adam steps per layer
    # adaround's Adam step and rounding penalty: on Lite0's W4 layers (damping 0.1) 0.1/3.0 leaves 0.55 of
    # nearest's objective (GPTQ 0.56, GPTQ + 3 sweeps 0.54), 0.1/1.0 0.63, 0.01/0.01 0.84
    # (python -m benchmarks.reconstruct --models tune)
    learning_rate: float = 0.1
    regularization: float = 3.0
    offset: bool = True  # let the next BatchNorm / the bias absorb the mean error
    # auto: one traced pass (torch.fx) when the model traces and its cut of activations over the images fits
    # in cache_mb, else rerun: one pass per layer, memory flat in the number of images; "traced" forces the first
    executor: str = "auto"
    cache_mb: float = 4096.0
    # fewer input rows per weight column: match FP32 weights, not FP32 outputs. 1.0 against 4.0 (256 images, top-1
    # without renorm after): fmnist-resnet18 W2 91.82 against 91.32, W3 92.58 / 92.52, fmnist-mobilenet_v2 W2
    # 89.08 / 88.59, W3 90.60 / 90.56; EfficientNet-Lite0 W4 bit-identical (docs/RESULTS.md, reconstruction)
    min_rows_per_input: float = 1.0
    # extra images: copies of the `refined` calibration images after the first num_images (fewer images: the
    # first ones again), moved by refine_steps Adam passes until every BatchNorm of the FP32 model sees its
    # running statistics (renorm.reconstruct.refine), then used beside the real ones; none where the FP32
    # model has no BatchNorm with running statistics
    refined: int = 0
    refine_steps: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RenormError(f"--reconstruct-method {self.method!r} is not a method; choose one of "
                              f"{', '.join(METHODS)}")
        if self.inputs not in INPUTS:
            raise RenormError(f"reconstruction inputs {self.inputs!r}: choose one of {', '.join(INPUTS)}")
        if self.executor not in EXECUTORS:
            raise RenormError(f"reconstruction executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if isinstance(self.damping, str) and self.damping != "auto" or \
                not isinstance(self.damping, str) and not self.damping >= 0:
            raise RenormError(f"reconstruction damping {self.damping!r}: give 'auto' or a number >= 0")
        if not self.damping_grid or any(not d >= 0 for d in self.damping_grid):
            raise RenormError(f"reconstruction damping_grid {self.damping_grid!r}: give numbers >= 0")
        if not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise RenormError(f"--reconstruct-sweeps {self.sweeps!r}: give a whole number >= 0 (e.g. 3)")
        if self.num_images < 1:
            raise RenormError(f"--reconstruct-images must be at least 1, got {self.num_images}")
        if not isinstance(self.refined, int) or self.refined < 0:
            raise RenormError(f"--reconstruct-refined {self.refined!r}: give a whole number >= 0 (e.g. 64)")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 1:
            raise RenormError(f"reconstruction refine_steps {self.refine_steps!r}: give a whole number >= 1")


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
            forward(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return order, sinks


def _moments(layer: Layer, moments: Moments, config: ReconstructConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per-row moments (H, cross, mean X~, mean X), centered where the offset is absorbed, and whether it is."""
    n = max(moments.count, 1)
    hessian, cross = moments.hessian / n, moments.cross / n
    mean_q, mean_r = moments.sum_quantized / n, moments.sum_reference / n
    absorb = config.offset and (layer.sink is not None or getattr(layer.module, "bias", None) is not None)
    if absorb:
        hessian = hessian - mean_q[:, :, None] * mean_q[:, None, :]
        cross = cross - mean_q[:, :, None] * mean_r[:, None, :]
    return hessian, cross, mean_q, mean_r, absorb


def _problem(layer: Layer, moments: Moments, quantized: QuantizedWeight, config: ReconstructConfig,
             damping: float) -> tuple[Problem, torch.Tensor, torch.Tensor, bool]:
    """The layer's Problem, plus the input means (quantized, reference) and whether an offset is absorbed."""
    weight = layer.reference.weight.detach().double()
    hessian, cross, mean_q, mean_r, absorb = _moments(layer, moments, config)
    groups = hessian.shape[0]
    shaped = weight.reshape(groups, weight.shape[0] // groups, -1)
    if moments.count < config.min_rows_per_input * hessian.shape[-1]:
        # too few rows to learn how to undo the earlier layers' error without fitting noise (a classifier
        # sees one row per image): aim at the FP32 weights under the quantized inputs instead
        cross = hessian
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
    ridge = damping * diagonal.mean(1).clamp_min(1e-12)
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    # an input that never varies (a dead channel, or zero padding only) leaves its column free: as GPTQ
    # does, give it unit-scale curvature so its weight is simply rounded to nearest
    dead = diagonal <= 1e-10 * diagonal.amax(1, keepdim=True).clamp_min(1e-30)
    if bool(dead.any()):
        unit = torch.diag_embed(dead * diagonal.mean(1, keepdim=True).clamp_min(1e-12))
        hessian, cross = hessian + unit, cross + unit
    damped = hessian + ridge[:, None, None] * eye
    rhs = shaped @ cross.transpose(1, 2) + ridge[:, None, None] * shaped
    target = torch.linalg.solve(damped, rhs.transpose(1, 2)).transpose(1, 2)
    mask = getattr(layer.module, MASK_ATTRIBUTE, None)
    mask = mask.reshape(shaped.shape).float() if mask is not None else None
    scale = quantized.scale.float().reshape(shaped.shape[:2])
    # the solvers work in float32, as GPTQ does (float64 products are several times slower here)
    problem = Problem(shaped.float(), target.float(), damped.float(), scale, quantized.scheme, quantized.bits, mask)
    return problem, mean_q.float(), mean_r.float(), absorb


def _held_out_error(weights: torch.Tensor, hessian: torch.Tensor, target_term: torch.Tensor) -> float:
    """Output error of the layer with `weights` (G, R, K) on other rows, up to a constant:
    sum over rows of q H q^T - 2 q . (w C^T), H and C those rows' centered moments."""
    q = weights.double()
    return float(((q @ hessian) * q).sum() - 2 * (q * target_term).sum())


def _choose_damping(layer: Layer, stats: LayerStats, quantized: QuantizedWeight, config: ReconstructConfig
                    ) -> tuple[float, dict[float, float]]:
    """The damping of config.damping_grid whose rounding, fitted on one fold of the images, gives the
    lowest output error on the other; a fixed config.damping is returned as it is."""
    if not isinstance(config.damping, str):
        return float(config.damping), {}
    if any(fold.count == 0 for fold in stats.folds):  # one chunk of images: nothing to hold out
        return FALLBACK_DAMPING, {}
    # the search rounds with one GPTQ pass (learned rounding ten times per layer would cost minutes)
    solver = solve_nearest if config.method == "nearest" else (lambda problem: solve_gptq(problem, 1))
    hessian, cross, _, _, _ = _moments(layer, stats.folds[1], config)
    fp32 = layer.reference.weight.detach().double()
    target_term = fp32.reshape(hessian.shape[0], -1, hessian.shape[-1]) @ cross.transpose(1, 2)
    errors = {}
    for damping in config.damping_grid:  # fitted on one fold, scored on the other (both ways doubles the cost)
        problem, _, _, _ = _problem(layer, stats.folds[0], quantized, config, damping)
        values, scale = solver(problem)
        errors[damping] = _held_out_error(values * scale[..., None], hessian, target_term)
    return min(errors, key=errors.get), errors


@torch.no_grad()
def _apply(layer: Layer, problem: Problem, values: torch.Tensor, scale: torch.Tensor, mean_q: torch.Tensor,
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


def with_refined(stream: Batches, reference: nn.Module, count: int, config: ReconstructConfig,
                 progress: bool = False) -> torch.Tensor:
    """The first `count` images, then config.refined refined copies of the images after them (or, where
    the stream ends sooner, of its first images again), as one tensor on the reference's device."""
    taken = stream.first(count + config.refined).to(model_device(reference))
    real, extra = taken[:count], taken[count:]
    if len(extra) < config.refined:
        again = real.repeat((config.refined - len(extra)) // len(real) + 1, *[1] * (real.dim() - 1))
        extra = torch.cat([extra, again[: config.refined - len(extra)]])
    return torch.cat([real, refine_images(reference, extra, config.refine_steps, progress=progress)])


@torch.no_grad()
def reconstruct(model: nn.Module, reference: nn.Module, images: Any, config: ReconstructConfig = ReconstructConfig(),
                batch_size: int = 50, chunk: int = 32, inplace: bool = False, progress: bool = False) -> nn.Module:
    """Return `model` (weight-quantized) with its codes re-chosen to match `reference` (a copy unless inplace).

    model: the output of quantize_weights (layers without codes are left alone).
    reference: the FP32 model it was quantized from (after the same pruning, if any).
    images: unlabeled images (ImageSource, tensor or DataLoader); the first
    config.num_images are used. Each layer's record gets its objective before and after.
    """
    from tqdm.auto import tqdm

    if isinstance(model, torch.jit.ScriptModule) or isinstance(reference, torch.jit.ScriptModule):
        raise RenormError("a TorchScript model cannot be reconstructed; load the eager model instead")
    work = model if inplace else copy.deepcopy(model)
    with eval_mode(work, reference):  # every module's training flag comes back afterwards
        _reconstruct(work, reference, images, config, batch_size, chunk, progress, tqdm)
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
    count = count_images(images if not isinstance(images, Batches) else images.data, config.num_images)
    if config.refined and batchnorm_layers(reference):  # nothing to match in a model without BatchNorm statistics
        images = with_refined(stream, reference, count, config, progress)
        stream, count = Batches(images, batch_size, False), len(images)
    device = model_device(work)  # images go where the model is: the passes below call the model directly
    example = stream.first(1).to(device)
    order, sinks = _trace(work, example, set(quantized))
    layers = [Layer(name, quantized[name], reference_modules[name],
                     modules.get(sinks[name]) if name in sinks else None,
                     reference_modules.get(sinks[name]) if name in sinks else None) for name in order]
    sampler = Sampler(layers, count, config)

    def chunks():
        return (images.to(device) for images in limited(stream, count, chunk))

    cached = sample_reference(layers, reference, chunks, sampler)

    def solve(layer: Layer, stats: LayerStats) -> None:
        record = getattr(layer.module, ATTRIBUTE)
        damping, _ = _choose_damping(layer, stats, record, config)
        problem, mean_q, mean_r, absorb = _problem(layer, stats.total, record, config, damping)
        values, scale = SOLVERS[config.method](problem, config)
        result = _apply(layer, problem, values, scale, mean_q, mean_r, absorb, record)
        result["damping"] = damping
        getattr(layer.module, ATTRIBUTE).reconstruction = result

    with tqdm(total=len(layers), desc=f"reconstruct ({config.method})", unit="layer", disable=not progress,
              leave=False) as bar:
        if config.inputs == "fp32":
            for layer in layers:
                solve(layer, collect(layer, work, chunks, sampler, cached.pop(layer.name), "fp32"))
                bar.update(1)
            return
        graph = graph_of(work, layers) if config.executor != "rerun" else None
        if graph is not None and config.executor == "auto" and \
                cut_bytes(graph, layers, example) * count > config.cache_mb * 2 ** 20:
            graph = None
        if graph is not None:
            layer_major(graph, layers, chunks, sampler, cached, solve, bar)
            return
        for layer in layers:  # the model cannot be traced: one pass per layer, each stopping at the layer
            solve(layer, collect(layer, work, chunks, sampler, cached.pop(layer.name), "quantized"))
            bar.update(1)


