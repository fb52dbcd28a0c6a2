"""Does the fixed point matter? Ways of re-estimating BatchNorm statistics, compared.

    python -m benchmarks.renorm_variants [--quick]

The statistics a deployed (eval-mode) network needs are a fixed point: each BatchNorm's
input computed with all earlier BatchNorms at their final statistics. Variants, all on
the same 1000 unlabeled images, batch 50:
  update_bn              torch.optim.swa_utils.update_bn: train mode, per-batch
                         normalization, average of per-batch statistics
  one batch of 1000      the paper's method: one train-mode batch of all images (the fixed
                         point, at the price of memory for all 1000 at once)
  renorm, chunk C        renorm's progressive pass (default C = 64): each chunk's later
                         layers see earlier layers' statistics from all images so far
  warm-up + eval pass    a design renorm rejected: the fixed point of the first 64 images,
                         then one eval-mode pass over all 1000 measuring every layer under
                         the warm-up statistics of the layers before it (inconsistent)
  + second eval pass     one more such pass (it can diverge)
Columns: test top-1 on the full Fashion-MNIST test set, and the largest deviation from
the one-batch fixed point over all BatchNorm channels (|mean diff| / std, and |log var
ratio|). The resnet18 reference, W2 uniform and 70% unstructured. About 5 minutes.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from benchmarks.common import command_line, copy_of, fashion_mnist, markdown_table, timed, top1, write_result
from renorm.models import load_model
from renorm.prune import PruneConfig, magnitude_prune
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import Moments, batchnorm_layers, renormalize


@torch.no_grad()
def one_batch(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The paper's re-normalization: every BN in batch-statistics mode, one forward of all images."""
    model = copy_of(model)
    for _, bn in batchnorm_layers(model):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    model(images)
    return model.eval()


def with_update_bn(model: nn.Module, images: torch.Tensor) -> nn.Module:
    model = copy_of(model)
    update_bn([images[i:i + 50] for i in range(0, len(images), 50)], model)
    return model.eval()


@torch.no_grad()
def eval_pass(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Measure every BN input over all images under the current statistics, then set them all."""
    model = copy_of(model)
    moments = {name: Moments() for name, _ in batchnorm_layers(model)}
    handles = [bn.register_forward_pre_hook(lambda _m, a, acc=moments[name]: acc.add(a[0]))
               for name, bn in batchnorm_layers(model)]
    for start in range(0, len(images), 50):
        model(images[start:start + 50])
    for handle in handles:
        handle.remove()
    for name, bn in batchnorm_layers(model):
        bn.running_mean.copy_(moments[name].mean)
        bn.running_var.copy_(moments[name].variance)
    return model


def deviation(model: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """Largest |mean difference| / reference std and |log variance ratio| over all BN channels."""
    worst_mean = worst_var = 0.0
    others = dict(batchnorm_layers(reference))
    for name, bn in batchnorm_layers(model):
        ref = others[name]
        std = ref.running_var.clamp_min(1e-12).sqrt()
        worst_mean = max(worst_mean, float(((bn.running_mean - ref.running_mean).abs() / std).max()))
        ratio = (bn.running_var.clamp_min(1e-12) / ref.running_var.clamp_min(1e-12)).log().abs()
        worst_var = max(worst_var, float(ratio.max()))
    return worst_mean, worst_var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet18, 2000 test images")
    args = parser.parse_args()
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if args.quick else None)
    rows, data = [], []
    for name in ("fmnist-resnet18",):
        fp32 = load_model(name).model
        compressed = {}
        for bits in (2,):
            model = copy_of(fp32)
            quantize_weights(model, WeightQuantConfig(bits=bits, scheme="uniform"), inplace=True)
            compressed[f"W{bits} uniform"] = model
        sparse = copy_of(fp32)
        magnitude_prune(sparse, PruneConfig(0.7))
        compressed["70% unstructured"] = sparse
        for label, model in compressed.items():
            target, target_seconds = timed(one_batch, model, calib)
            variants = {
                "update_bn": lambda m=model: with_update_bn(m, calib),
                "one batch of 1000 (paper)": lambda: target,
                "renorm, chunk 64 (default)": lambda m=model: renormalize(m, calib, "exact", batch_size=50),
                "renorm, chunk 16": lambda m=model: renormalize(m, calib, "exact", batch_size=50, chunk=16),
                "renorm, chunk 256": lambda m=model: renormalize(m, calib, "exact", batch_size=50, chunk=256),
                "warm-up 64 + eval pass": lambda m=model: eval_pass(renormalize(m, calib[:64], "exact"), calib),
                "+ second eval pass": lambda m=model: eval_pass(eval_pass(renormalize(m, calib[:64], "exact"), calib),
                                                                calib),
            }
            for variant, make in variants.items():
                result, seconds = timed(make)
                if variant.startswith("one batch"):
                    seconds = target_seconds
                mean_dev, var_dev = deviation(result, target)
                accuracy = top1(result, test_x, test_y)
                data.append({"model": name, "compression": label, "variant": variant, "top1": accuracy,
                             "seconds": seconds, "max_mean_dev_std": mean_dev, "max_log_var_ratio": var_dev})
                rows.append([name, label, variant, f"{accuracy:.2f}", f"{mean_dev:.3f}", f"{var_dev:.3f}",
                             f"{seconds:.1f}"])
                print(rows[-1], flush=True)
    body = (f"{len(calib)} unlabeled images from {names['calib']}; top-1 % on {names['test']} ({len(test_y)} images). "
            "Deviation from the fixed point (the one-batch result): the largest over all BatchNorm channels of "
            "|mean - mean*| / std* and |log(var / var*)|.\n\n"
            + markdown_table(["model", "compression", "variant", "top-1 %", "max mean dev", "max log var ratio",
                              "seconds"], rows))
    write_result("renorm_variants" + ("_quick" if args.quick else ""), "Re-estimation variants and the fixed point",
                 command_line(), body, data)


if __name__ == "__main__":
    main()
