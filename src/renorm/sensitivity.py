"""Per-layer pruning sensitivity measured on unlabeled images only.

Each conv/linear layer is pruned alone (unstructured, by magnitude) at each sparsity,
optionally re-normalized, and scored by top-1 agreement and KL against the unpruned
model on the same images. Layers whose agreement falls fast are the ones to spare
(--prune-exclude).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from renorm.errors import RenormError
from renorm.evaluate import agreement, predict
from renorm.prune import PruneConfig, magnitude_prune
from renorm.layers import quantizable_layers
from renorm.plots import pyplot, save_figure
from renorm.quantize.weights import MASK_ATTRIBUTE
from renorm.renormalize import MODES, batchnorm_layers, renormalize


@torch.no_grad()
def sensitivity(model: nn.Module, images: Any, sparsities: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
                renorm: str = "exact", batch_size: int = 50, progress: bool = False) -> list[dict[str, Any]]:
    """Rows of {layer, sparsity, agreement_top1, agreement_top5, kl}; `model` itself is never modified."""
    from tqdm.auto import tqdm

    for s in sparsities:
        PruneConfig(s)  # validates the range
    if renorm not in MODES:
        raise RenormError(f"--renorm {renorm!r} is not a mode; choose one of {', '.join(MODES)}")
    if not quantizable_layers(model):
        raise RenormError("the model has no conv/linear layer to prune (a model rebuilt from a torch.export program "
                          "is a traced graph); run sensitivity on the original model")
    reference_logits, _ = predict(model, images, batch_size)
    work = copy.deepcopy(model).eval()
    layers = quantizable_layers(work)
    bn_state = {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in batchnorm_layers(work)}
    rows = []
    with tqdm(total=len(layers) * len(sparsities), desc="sensitivity", disable=not progress, leave=False) as bar:
        for name, module in layers:
            weight = module.weight.detach().clone()
            old_mask = getattr(module, MASK_ATTRIBUTE, None)
            for s in sparsities:
                try:
                    magnitude_prune(work, PruneConfig(s, exclude=tuple(n for n, _ in layers if n != name),
                                                      prune_first_last=True, prune_depthwise=True))
                    if renorm != "none":
                        renormalize(work, images, renorm, reference=model, batch_size=batch_size, inplace=True)
                    logits, _ = predict(work, images, batch_size)
                    rows.append({"layer": name, "sparsity": s, **agreement(logits, reference_logits)})
                finally:
                    module.weight.copy_(weight)
                    _restore_mask(module, old_mask)
                    for bn_name, bn in batchnorm_layers(work):
                        bn.running_mean.copy_(bn_state[bn_name][0])
                        bn.running_var.copy_(bn_state[bn_name][1])
                bar.update(1)
    return rows


def _restore_mask(module: nn.Module, mask: torch.Tensor | None) -> None:
    if mask is None:
        module.__dict__.pop(MASK_ATTRIBUTE, None)
    else:
        setattr(module, MASK_ATTRIBUTE, mask)


def sensitivity_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per layer, top-1 agreement (%) per sparsity."""
    sparsities = sorted({r["sparsity"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    value = {(r["layer"], r["sparsity"]): r["agreement_top1"] for r in rows}
    lines = ["| layer | " + " | ".join(f"{s:.0%} pruned" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{value[(layer, s)]:.1f}" for s in sparsities) + " |")
    return "\n".join(lines)


def plot_sensitivity(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Write a PNG: top-1 agreement vs sparsity, one line per layer (atomically)."""
    plt = pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("viridis")
    for index, layer in enumerate(layers):
        points = sorted((r["sparsity"], r["agreement_top1"]) for r in rows if r["layer"] == layer)
        ax.plot([100 * p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                color=cmap(index / max(1, len(layers) - 1)), label=layer, linewidth=1)
    ax.set_xlabel("sparsity of the one pruned layer (%)")
    ax.set_ylabel("top-1 agreement with the unpruned model (%)")
    ax.set_title(title or "Per-layer pruning sensitivity (unlabeled images)")
    ax.grid(alpha=0.3)
    if len(layers) <= 30:
        ax.legend(fontsize=6, ncol=2, loc="lower left")
    save_figure(fig, path)


