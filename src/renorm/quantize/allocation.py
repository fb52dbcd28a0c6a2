"""Bits per layer under a budget (`--avg-bits`): label-free sensitivity, a greedy allocation, its frontier.

The allocation picks, for every layer, bits from a small set so that the average over all
conv/linear weights (weighted by their number) stays within a budget, minimising the sum
of each layer's label-free sensitivity: the KL divergence between the FP32 model's
predictions and those of the FP32 model with only that layer quantized, on calibration
images. The sum of per-layer KLs is a proxy for the KL of the whole quantized model
(first-order additivity); the allocation's frontier (average bits vs that proxy, and vs
the measured agreement where measured) is what the plot shows.

Which layers the patterns and first/last rule pin is renorm.quantize.plan.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from renorm.errors import RenormError
from renorm.evaluate import agreement
from renorm.forward import as_logits, eval_mode, forward
from renorm.layers import first_and_last, quantizable_layers
from renorm.plots import pyplot, save_figure
from renorm.quantize.plan import BITS_RANGE, FLOAT_BITS, LayerPlan, matches
from renorm.quantize.weights import MASK_ATTRIBUTE, layer_plans, output_axis, quantize_tensor, quantize_weights

ALLOCATION_BITS = (2, 3, 4, 8)


def average_bits(layers: list[tuple[str, nn.Module]], plans: dict[str, LayerPlan | None]) -> float:
    """Average bits per conv/linear weight (float layers count 32)."""
    total = sum(m.weight.numel() for _, m in layers)
    spent = sum(m.weight.numel() * (plans[n].bits if plans.get(n) else FLOAT_BITS) for n, m in layers)
    return spent / max(1, total)


# --------------------------------------------------------------------------- allocation
def allocate(sizes: dict[str, int], costs: dict[str, dict[int, float]], budget: float,
             fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Bits per layer minimising the summed cost with sum(size * bits) <= budget * sum(size).

    costs[name][bits] is the layer's sensitivity at those bits; `fixed` layers keep their
    bits (and count in the budget). A greedy walk from the cheapest choice: repeatedly
    give one more step of bits to the layer whose cost falls most per extra bit spent,
    while the budget allows (the usual rate-distortion greedy; exact when each layer's
    cost is convex in its bits).
    """
    fixed = fixed or {}
    total = sum(sizes.values())
    spend = sum(sizes[n] * b for n, b in fixed.items())
    free = [n for n in sizes if n not in fixed]
    options = {n: sorted(costs[n]) for n in free}
    chosen = {n: options[n][0] for n in free}
    spend += sum(sizes[n] * chosen[n] for n in free)
    if spend > budget * total + 1e-9:
        lowest = spend / total
        raise RenormError(f"--avg-bits {budget:g} is below what these layers can reach ({lowest:.2f} with every "
                          "layer at its fewest bits and the first/last and --layer-bits layers as set); raise it")
    while True:
        best, best_gain = None, 0.0
        for n in free:
            position = options[n].index(chosen[n])
            if position + 1 == len(options[n]):
                continue
            step = options[n][position + 1]
            extra = sizes[n] * (step - chosen[n])
            if spend + extra > budget * total + 1e-9:
                continue
            gain = (costs[n][chosen[n]] - costs[n][step]) / extra
            if best is None or gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        step = options[best][options[best].index(chosen[best]) + 1]
        spend += sizes[best] * (step - chosen[best])
        chosen[best] = step
    return {**fixed, **chosen}


def frontier(sizes: dict[str, int], costs: dict[str, dict[int, float]], fixed: dict[str, int],
             budgets: Sequence[float]) -> list[dict[str, Any]]:
    """The allocation at each budget: average bits reached and the summed sensitivity."""
    total = sum(sizes.values())
    points = []
    for budget in budgets:
        try:
            bits = allocate(sizes, costs, budget, fixed)
        except RenormError:
            continue
        points.append({"budget": budget, "average_bits": sum(sizes[n] * b for n, b in bits.items()) / total,
                       "sensitivity": sum(costs[n][b] for n, b in bits.items() if n in costs)})
    return points


@torch.no_grad()
def layer_sensitivity(model: nn.Module, images: torch.Tensor, layers: list[tuple[str, nn.Module]],
                      candidates: dict[str, list[LayerPlan]], progress: bool = False) -> dict[str, dict[int, float]]:
    """KL(FP32 || FP32 with one layer quantized) on `images`, per layer and candidate bits."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm


    costs: dict[str, dict[int, float]] = {}
    with eval_mode(model):
        reference = F.log_softmax(as_logits(forward(model, images)).float(), 1)
        total = sum(len(c) for c in candidates.values())
        with tqdm(total=total, desc="bit sensitivity", unit="try", disable=not progress, leave=False) as bar:
            for name, module in layers:
                if name not in candidates:
                    continue
                original = module.weight.detach().clone()
                costs[name] = {}
                try:
                    for plan in candidates[name]:
                        quantized = quantize_tensor(original, plan.scheme, plan.bits, output_axis(module),
                                                    getattr(module, MASK_ATTRIBUTE, None))
                        module.weight.copy_(quantized.dequantize())
                        logits = F.log_softmax(as_logits(forward(model, images)).float(), 1)
                        costs[name][plan.bits] = float(F.kl_div(logits, reference, log_target=True,
                                                                reduction="batchmean").clamp_min(0))
                        bar.update(1)
                finally:
                    module.weight.copy_(original)
    return costs


def check_average_bits(value: float) -> None:
    low, high = min(ALLOCATION_BITS), max(ALLOCATION_BITS)
    if not low <= value <= high:
        raise RenormError(f"--avg-bits {value:g} is outside {low}..{high}: the allocation picks each layer's bits "
                          f"from {', '.join(map(str, ALLOCATION_BITS))}")


def candidate_plans(scheme: str) -> list[LayerPlan]:

    low, high = BITS_RANGE[scheme]
    return [LayerPlan(scheme if low <= b <= high else "uniform", b) for b in ALLOCATION_BITS]


def allocate_bits(model: nn.Module, images: torch.Tensor, config: Any, average: float, progress: bool = False,
                  points: int = 8) -> tuple[tuple[tuple[str, int], ...], dict[str, Any]]:
    """Bits per layer for an average budget; returns (exact-name --layer-bits entries, report).

    Layers set by the first/last rule, --layer-bits or exclude keep their bits and count in
    the budget. The report holds the sensitivities, the allocation, and the frontier:
    for `points` budgets, the summed sensitivity and the measured agreement / KL of the
    whole model quantized (nearest rounding) with that budget's allocation.
    """
    check_average_bits(average)
    layers = quantizable_layers(model)
    ends = first_and_last(model, images) or (None, None)
    plans = layer_plans(model, config, images)
    pinned = {name for name, module in layers if name in ends or name in config.exclude
              or any(matches(p, name, module, ends) for p, _ in config.layer_bits)}
    fixed = {name: (plans[name].bits if plans[name] else FLOAT_BITS) for name in pinned}
    sizes = {name: module.weight.numel() for name, module in layers}
    candidates = {name: candidate_plans(config.scheme) for name, _ in layers if name not in pinned}
    if not candidates:
        raise RenormError("--avg-bits has no layer to choose bits for: every layer is set by first/last, "
                          "--layer-bits or --exclude")
    costs = layer_sensitivity(model, images, layers, candidates, progress)
    chosen = allocate(sizes, costs, average, fixed)
    total = sum(sizes.values())
    lowest = sum(sizes[n] * (fixed.get(n) or min(ALLOCATION_BITS)) for n in sizes) / total
    budgets = torch.linspace(lowest, max(ALLOCATION_BITS), points).tolist()
    curve = frontier(sizes, costs, fixed, sorted(set(budgets + [average])))
    for point in curve:
        point.update(_measure(model, images, config, allocate(sizes, costs, point["budget"], fixed), fixed))
        point["megabytes"] = sum(sizes[n] * b for n, b in allocate(sizes, costs, point["budget"], fixed).items()) / 8e6
    entries = tuple((name, chosen[name]) for name in candidates)
    report = {"budget": average, "average_bits": sum(sizes[n] * b for n, b in chosen.items()) / total,
              "allocation": {name: chosen[name] for name, _ in layers}, "sensitivity_kl": costs,
              "sensitivity_images": len(images), "frontier": curve}
    return entries, report


@torch.no_grad()
def _measure(model: nn.Module, images: torch.Tensor, config: Any, bits: dict[str, int],
             fixed: dict[str, int]) -> dict[str, float]:
    """Agreement and KL of the whole model quantized with `bits` (nearest rounding) against FP32."""
    entries = tuple((n, b) for n, b in bits.items() if n not in fixed)
    quantized = quantize_weights(model, dataclasses.replace(config, layer_bits=tuple(config.layer_bits) + entries),
                                 example=images)  # a copy
    with eval_mode(model, quantized):
        result = agreement(as_logits(forward(quantized, images)).float(), as_logits(forward(model, images)).float())
    return {"agreement_top1": result["agreement_top1"], "kl": result["kl"]}


def plot_frontier(report: dict[str, Any], path: Any, title: str = "") -> None:
    """PNG: weight megabytes vs top-1 agreement with FP32 along the allocation's frontier."""

    plt = pyplot()
    curve = report["frontier"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["megabytes"] for p in curve], [p["agreement_top1"] for p in curve], marker="o", label="frontier")
    chosen = [p for p in curve if abs(p["budget"] - report["budget"]) < 1e-9]
    if chosen:
        ax.plot([chosen[0]["megabytes"]], [chosen[0]["agreement_top1"]], marker="*", markersize=14, linestyle="",
                color="crimson", label=f"--avg-bits {report['budget']:g}")
    ax.set_xlabel("conv/linear weights (MB at the allocated bits)")
    ax.set_ylabel(f"top-1 agreement with FP32 (%, {report['sensitivity_images']} calibration images)")
    ax.set_title(title or "Bit allocation frontier (nearest rounding, before reconstruction)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
