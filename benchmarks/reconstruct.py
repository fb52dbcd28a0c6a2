"""Reconstruction: round-to-nearest vs each method, with and without re-normalization.

    python -m benchmarks.reconstruct [--quick] [--models efficientnet-lite0 fmnist-mobilenet_v2 fmnist-resnet18]

EfficientNet-Lite0 (ImageNet weights): calibration on 500 crops of photos:calib (the
reconstruction uses the first 256 of them, renorm's default), agreement with the FP32
model's own predictions on 500 crops of photos:eval (no photo in common): top-1 / top-5
agreement and KL(FP32 || model). Weights W4 uniform, W4 uniform with depthwise convs at
8 bits, W4 pow2, W3 uniform, W8 uniform; first conv and last linear layer 8-bit.
Fashion-MNIST references: 1000 unlabeled training images (reconstruction uses 256),
top-1 on the full 10k test set (or the bundled subset, said in the table), at W4A8
(uniform and pow2), W3 and W2 uniform. Each row: seconds and peak RSS of the
reconstruction stage itself (the stage's own peak, see renorm.report.stage).
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch

from benchmarks.common import agree, command_line, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from renorm.data import Batches, open_images
from renorm.evaluate import predict
from renorm.models import load_model
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.bits import parse_layer_bits
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize
from renorm.report import stage

reconstruction = importlib.import_module("renorm.reconstruct")
METHODS = ("nearest", "gptq", "adaround")
LITE0_SETTINGS = (("W4 uniform", 4, "uniform", ()), ("W4 uniform, depthwise 8-bit", 4, "uniform", ("depthwise=8",)),
                  ("W4 pow2", 4, "pow2", ()), ("W3 uniform", 3, "uniform", ()), ("W8 uniform", 8, "uniform", ()))
FMNIST_SETTINGS = (("W4A8 uniform", 4, "uniform", 8), ("W4A8 pow2", 4, "pow2", 8), ("W3 uniform", 3, "uniform", 32),
                   ("W2 uniform", 2, "uniform", 32))


def reconstructed(fp32, quantized, calib, method: str, images: int) -> tuple[torch.nn.Module, dict]:
    """The quantized model after `method` (or as it is, for round-to-nearest), with time and memory."""
    if method == "rtn":
        return quantized, {"seconds": 0.0, "peak_rss_mb": None}
    stages: dict[str, dict] = {}
    with stage(stages, "reconstruct"):
        model = reconstruction.reconstruct(quantized, fp32, calib,
                                           reconstruction.ReconstructConfig(method=method, num_images=images))
    return model, stages["reconstruct"]


def lite0_rows(args) -> tuple[list, list]:
    loaded = load_model("efficientnet-lite0")
    fp32 = loaded.model
    count = 200 if args.quick else 500
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), 50).first(count)
    test = Batches(open_images(f"photos:eval:{count}", loaded.preset), 50).first(count)
    reference, _ = predict(fp32, test, 50)
    settings = LITE0_SETTINGS[:1] if args.quick else LITE0_SETTINGS
    rows, data = [], []
    for label, bits, scheme, layer_bits in settings:
        quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=bits, scheme=scheme,
                                                                      layer_bits=parse_layer_bits(layer_bits)))
        for method in ("rtn",) + tuple(m for m in args.methods if m != "rtn"):
            model, cost = reconstructed(fp32, quantized, calib, method, args.images)
            result = {mode: agree(renormalize(model, calib, mode, reference=fp32), test, reference)
                      for mode in ("none", "shift")}
            data.append({"model": "efficientnet-lite0", "weights": label, "method": method, **result, **cost})
            rows.append(["efficientnet-lite0", label, method,
                         *[f"{result[m]['agreement_top1']:.1f} / {result[m]['agreement_top5']:.1f} / "
                           f"{result[m]['kl']:.3f}" for m in ("none", "shift")],
                         f"{cost['seconds']:.0f}", _mib(cost)])
            print(rows[-1], flush=True)
    return rows, data


def fmnist_rows(name: str, args, data_cache: dict) -> tuple[list, list]:
    if "data" not in data_cache:
        data_cache["data"] = fashion_mnist(1000, num_test=2000 if args.quick else None)
    calib, test_x, test_y, names = data_cache["data"]
    fp32 = load_model(name).model
    settings = FMNIST_SETTINGS[:1] if args.quick else FMNIST_SETTINGS
    rows, data = [], []
    for label, bits, scheme, abits in settings:
        quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=bits, scheme=scheme))
        for method in ("rtn",) + tuple(m for m in args.methods if m != "rtn"):
            model, cost = reconstructed(fp32, quantized, calib, method, args.images)
            result = {}
            for mode in ("none", "exact"):
                final = renormalize(model, calib, mode, reference=fp32)
                if abits != 32:
                    final = calibrate_activations(final, calib, ActivationQuantConfig(bits=abits))
                result[mode] = top1(final, test_x, test_y)
            data.append({"model": name, "weights": label, "method": method, **result, **cost,
                         "test": names["test"]})
            rows.append([name, label, method, f"{result['none']:.2f}", f"{result['exact']:.2f}",
                         f"{cost['seconds']:.0f}", _mib(cost)])
            print(rows[-1], flush=True)
    return rows, data


def _mib(cost: dict[str, Any]) -> str:
    return "" if cost["peak_rss_mb"] is None else f"{cost['peak_rss_mb']:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one setting per model, 200 crops / 2000 test images")
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "fmnist-mobilenet_v2", "fmnist-resnet18"])
    parser.add_argument("--methods", nargs="+", default=["gptq", "adaround"], choices=METHODS)
    parser.add_argument("--images", type=int, default=256, help="images the reconstruction uses (default 256)")
    args = parser.parse_args()
    tables, everything, cache = [], {}, {}
    for name in args.models:
        if name == "efficientnet-lite0":
            rows, data = lite0_rows(args)
            tables.append("### EfficientNet-Lite0: top-1 agreement % / top-5 agreement % / KL against FP32\n\n"
                          + markdown_table(["model", "weights", "method", "no renorm", "shift", "reconstruct s",
                                            "reconstruct peak RSS MiB"], rows))
        else:
            rows, data = fmnist_rows(name, args, cache)
            tables.append(f"### {name}: top-1 % on {cache['data'][3]['test']}\n\n"
                          + markdown_table(["model", "weights", "method", "no renorm", "exact", "reconstruct s",
                                            "reconstruct peak RSS MiB"], rows))
        everything[name] = data
    suffix = "_quick" if args.quick else ""
    body = ("`rtn`: round to nearest (renorm's quantizer, no reconstruction). `nearest`, `gptq`, `adaround`: "
            f"renorm.reconstruct with that method on {args.images} calibration images (layer by layer in "
            "execution order, inputs from the partly quantized network, BatchNorm offsets absorbed), then "
            "re-normalization (`none`: as reconstruction left it) and, for A8 rows, 8-bit activations.\n\n"
            + "\n\n".join(tables))
    write_result("reconstruct" + suffix, "Reconstruction", command_line(), body,
                 merged("reconstruct" + suffix, everything))


if __name__ == "__main__":
    main()
