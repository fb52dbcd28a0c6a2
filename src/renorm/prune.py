"""Pruning: unstructured magnitude masks, and filter pruning that really removes channels.

Unstructured: zero the smallest-magnitude weights of each conv/linear layer (scope
"layer") or below one threshold over all of them (scope "global"). The mask stays on the
module (`_renorm_mask`) so that quantization keeps the zeros.

Filter: remove whole output channels, ranked by the L1 / L2 norm of their weights or by
BatchNorm scale, through Torch-Pruning's DependencyGraph, which keeps coupled channels
(residual additions, depthwise groups, concatenations) consistent. The result is a
plain, smaller nn.Module; its pruning history is kept so a saved file can be rebuilt.
"""
from __future__ import annotations

import copy
import io
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from renorm.device import model_device
from renorm.errors import RenormError, one_line
from renorm.forward import eval_mode, forward
from renorm.layers import check_layer_names, first_and_last, is_depthwise, quantizable_layers
from renorm.quantize.weights import MASK_ATTRIBUTE, set_mask

KINDS = ("unstructured", "filter")
SCOPES = ("layer", "global")
IMPORTANCES = ("l1", "l2", "bn")
BUDGETS = ("filters", "params", "macs")
HISTORY_ATTRIBUTE = "_renorm_pruned_channels"  # on a filter-pruned model: how to redo the pruning


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much. fraction is of weights (unstructured) or of filters / params / MACs."""

    fraction: float
    kind: str = "unstructured"
    scope: str = "layer"
    importance: str = "l1"
    exclude: tuple[str, ...] = ()
    seed: int = 0
    budget: str = "filters"
    prune_first_last: bool = False
    prune_depthwise: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise RenormError(f"--prune {self.fraction} is outside [0, 1): give the fraction to remove, e.g. 0.5")
        for value, allowed, flag in ((self.kind, KINDS, "--prune-type"), (self.scope, SCOPES, "--prune-scope"),
                                     (self.importance, IMPORTANCES, "--prune-importance"),
                                     (self.budget, BUDGETS, "--prune-budget")):
            if value not in allowed:
                raise RenormError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        # unstructured pruning ranks single weights by magnitude and counts weights: say so rather than ignore
        for value, default, flag in ((self.budget, "filters", "--prune-budget"),
                                     (self.importance, "l1", "--prune-importance")):
            if self.kind == "unstructured" and value != default:
                raise RenormError(f"{flag} {value} needs --prune-type filter (unstructured pruning removes the "
                                  "smallest weights)")


def prunable_layers(model: nn.Module, config: PruneConfig,
                    example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """Layers unstructured pruning touches: not excluded, not depthwise or first/last unless asked.

    example: input images, to find the first and last layer by execution (renorm.layers.first_and_last).
    """
    check_layer_names(model, config.exclude, "--prune-exclude")
    ends = set() if config.prune_first_last else set(first_and_last(model, example))
    return [(name, m) for name, m in quantizable_layers(model) if name not in config.exclude and name not in ends
            and (config.prune_depthwise or not is_depthwise(m))]


# --------------------------------------------------------------------------- unstructured
@torch.no_grad()
def magnitude_prune(model: nn.Module, config: PruneConfig, example: torch.Tensor | None = None) -> nn.Module:
    """Zero the smallest weights in place and keep the masks on the modules (example: see prunable_layers)."""
    layers = prunable_layers(model, config, example)
    if not layers:
        raise RenormError("no layer left to prune: every conv/linear layer is excluded")
    if config.scope == "global":
        magnitudes = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in layers])
        threshold = _kth_smallest(magnitudes, config.fraction)
    for _, module in layers:
        magnitude = module.weight.detach().abs()
        limit = threshold if config.scope == "global" else _kth_smallest(magnitude.reshape(-1), config.fraction)
        mask = magnitude > limit
        old = getattr(module, MASK_ATTRIBUTE, None)
        mask = mask & old if old is not None else mask
        module.weight.mul_(mask)
        set_mask(module, mask)
    return model


def _kth_smallest(values: torch.Tensor, fraction: float) -> float:
    """The magnitude at or below which `fraction` of the values lie (-1 when nothing is removed)."""
    k = int(round(fraction * values.numel()))
    if k == 0:
        return -1.0
    return float(values.float().kthvalue(k).values)


def sparsity_by_layer(model: nn.Module) -> list[dict[str, Any]]:
    """Per conv/linear layer: name, parameters, zeros, sparsity."""
    rows = []
    for name, module in quantizable_layers(model):
        zeros = int((module.weight == 0).sum())
        rows.append({"layer": name, "weights": module.weight.numel(), "zeros": zeros,
                     "sparsity": zeros / max(1, module.weight.numel())})
    return rows


# --------------------------------------------------------------------------- filters
def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise RenormError("filter pruning needs Torch-Pruning: pip install 'renorm[prune]'") from None
    return torch_pruning


# Kept channel counts are multiples of this: CPU conv kernels vectorise over channels, and a
# layer left with, say, 45 channels runs no faster than one with 48.
ROUND_TO = 8


def filter_prune(model: nn.Module, config: PruneConfig, example: torch.Tensor) -> nn.Module:
    """Remove output channels in place (Torch-Pruning); append the step to the model's pruning record.

    The record (HISTORY_ATTRIBUTE: one entry per filter pruning of this model) rebuilds
    saved files and tells shift re-normalization exactly which channels were kept.
    """
    tp = require_torch_pruning()
    check_layer_names(model, config.exclude, "--prune-exclude")
    # The classifier's outputs are the classes; the stem's channels feed the whole first stage
    # (in a ResNet, its residual stream): spared unless prune_first_last.
    ends = first_and_last(model, example)
    excluded = set(config.exclude) | set(ends[1:]) | (set() if config.prune_first_last else set(ends[:1]))
    ignored = [m for name, m in quantizable_layers(model) if name in excluded]
    importance = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                  "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                  "bn": lambda: tp.importance.BNScaleImportance()}[config.importance]()
    example = example[:1]
    params_before, macs_before = _count(model, example)
    steps = 1 if config.budget == "filters" else 40
    ratio = config.fraction if config.budget == "filters" else 0.95
    try:
        with torch.enable_grad(), eval_mode(model):  # Torch-Pruning traces autograd; BatchNorm must not update
            pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                          global_pruning=config.scope == "global", ignored_layers=ignored,
                                          iterative_steps=steps, round_to=ROUND_TO)
            for _ in range(steps):
                if config.budget != "filters":
                    params, macs = _count(model, example)
                    done = (1 - params / params_before) if config.budget == "params" else (1 - macs / macs_before)
                    if done >= config.fraction:
                        break
                pruner.step()
            history = pruner.pruning_history()
    except Exception as error:  # noqa: BLE001 - Torch-Pruning raises many kinds
        raise RenormError(f"Torch-Pruning could not filter-prune this model ({one_line(error)}); use "
                          "--prune-type unstructured, or spare the layer with --prune-exclude") from None
    _check_still_runs(model, example)
    step = {"history": [[n, bool(o), [int(i) for i in idx]] for n, o, idx in history],
            "input_shape": list(example.shape)}
    setattr(model, HISTORY_ATTRIBUTE, pruning_steps(getattr(model, HISTORY_ATTRIBUTE, None)) + [step])
    return model


@torch.no_grad()
def _check_still_runs(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with eval_mode(model):
            model(example)
    except Exception as error:  # noqa: BLE001 - whatever the model's own code raises
        raise RenormError(f"after filter pruning the model no longer runs ({one_line(error)}): its forward "
                          "assumes fixed channel counts; spare those layers with --prune-exclude or use "
                          "--prune-type unstructured") from None


def pruning_steps(record: Any) -> list[dict[str, Any]]:
    """The steps of a pruning record: a list of {history, input_shape} (a single dict in files before re-pruning)."""
    if record is None:
        return []
    return [record] if isinstance(record, dict) else list(record)


def apply_pruned_channels(model: nn.Module, record: Any) -> nn.Module:
    """Redo a recorded filter pruning, step by step, on a freshly built model (for saved files)."""
    tp = require_torch_pruning()
    try:
        with torch.enable_grad(), eval_mode(model):
            for step in pruning_steps(record):
                graph = tp.DependencyGraph().build_dependency(model, torch.zeros(step["input_shape"]))
                graph.load_pruning_history([(n, o, idx) for n, o, idx in step["history"]])
    except Exception as error:  # noqa: BLE001 - Torch-Pruning raises many kinds
        raise RenormError(f"the recorded filter pruning does not apply to this model ({one_line(error)})") from None
    return model


def kept_channels(original: nn.Module, record: Any) -> dict[str, torch.Tensor]:
    """For each BatchNorm of `original`, the indices of the channels a recorded filter pruning keeps.

    Replays the record (Torch-Pruning's own list of removed channels) on a copy of
    `original` whose BatchNorms hold their channel numbers as running means.
    """
    tagged = copy.deepcopy(original)
    for module in tagged.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.arange(module.num_features, dtype=module.running_mean.dtype))
    apply_pruned_channels(tagged, record)
    return {name: module.running_mean.round().long() for name, module in tagged.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None}


# --------------------------------------------------------------------------- entry point
def prune(model: nn.Module, config: PruneConfig, example: torch.Tensor | None = None,
          latency_repeats: int = 5, inplace: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Return the pruned model (a copy unless inplace=True) and a report (params, MACs, size, sparsity or channels).

    example: a batch of real input images; the first traces the model and finds its
    first and last layer, the batch times the filter-pruned model against the original
    (same batch, same threads; the median of latency_repeats passes each, the two models
    alternating so that a change in the machine's load hits both alike).
    """
    if example is None:
        raise RenormError("pruning needs one example image to trace the model")
    example = example.to(model_device(model))
    params_before, macs_before = _count(model, example[:1])
    size_before = state_dict_bytes(model)
    if inplace:  # keep the original only to time it against the filter-pruned model
        original = copy.deepcopy(model) if config.kind == "filter" else None
    else:
        original, model = model, copy.deepcopy(model)
    if config.kind == "unstructured":
        magnitude_prune(model, config, example)
    else:
        filter_prune(model, config, example)
    params_after, macs_after = _count(model, example[:1])
    report: dict[str, Any] = {
        "type": config.kind, "scope": config.scope, "fraction": config.fraction,
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        "bytes_before": size_before, "bytes_after": state_dict_bytes(model),
    }
    if config.kind == "unstructured":
        rows = sparsity_by_layer(model)
        zeros = sum(r["zeros"] for r in rows)
        report.update({"nonzero_weights": sum(r["weights"] for r in rows) - zeros,
                       "sparsity": zeros / max(1, sum(r["weights"] for r in rows)), "layers": rows})
    else:
        before, after = compare_latency(original, model, example, repeats=latency_repeats)
        report.update({"latency_ms_before": round(before, 2), "latency_ms_after": round(after, 2),
                       "latency_batch": len(example), "threads": torch.get_num_threads()})
        report["layers"] = [{"layer": name, "out_channels": _out_channels(m)} for name, m in quantizable_layers(model)]
    return model, report


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of the model as it is stored (dense).

    MACs of conv and linear layers only, as the published tables count them; Torch-Pruning's
    op counter (tp.utils.count_ops_and_params) also counts BatchNorm, activations and
    pooling (37.18M against 37.02M for resnet18 at 32x32, 6.52M against 6.12M for
    mobilenet_v2), so it is not used here.
    """
    params = sum(p.numel() for p in model.parameters())
    macs = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.modules.conv._ConvNd):
            macs += output[0].numel() * module.weight[0].numel() if not module.transposed else \
                args[0][0].numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            macs += module.weight.numel() * (output[0].numel() // module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad(), eval_mode(model):
            forward(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return params, macs


def state_dict_bytes(model: nn.Module) -> int:
    """Size of torch.save(model.state_dict()) in bytes (the dense fp32 file)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on `example` (after a warm-up)."""
    return _median_pass_ms((model,), example, repeats)[0]


def compare_latency(first: nn.Module, second: nn.Module, example: torch.Tensor, repeats: int = 10) -> tuple[float, float]:
    """Median milliseconds of a forward pass of each model, the two passes alternating."""
    before, after = _median_pass_ms((first, second), example, repeats)
    return before, after


@torch.no_grad()
def _median_pass_ms(models: tuple[nn.Module, ...], example: torch.Tensor, repeats: int) -> list[float]:
    """Median milliseconds per pass, the models' passes alternating.

    torch.utils.benchmark.Timer times one statement at a time (no alternation between two
    models) and its import logs a CUDA_HOME warning on machines without CUDA, which would
    reach the user's terminal; a perf_counter loop does the job.
    """
    times: list[list[float]] = [[] for _ in models]
    example = example.to(model_device(models[0]))
    synchronize = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    with eval_mode(*models):
        for model in models:
            forward(model, example)  # warm-up, and a clear error if the example does not fit
        for _ in range(repeats):
            for model, spent in zip(models, times):
                synchronize()
                start = time.perf_counter()
                model(example)
                synchronize()
                spent.append(1000 * (time.perf_counter() - start))
    return [statistics.median(spent) for spent in times]
