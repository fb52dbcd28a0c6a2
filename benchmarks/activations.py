"""Which activation range is most accurate: mse vs minmax vs percentile observers.

    python -m benchmarks.activations [--quick] [--crops N]

Each row compresses the weights once (uniform W8 or pow2 W4, exact re-normalization on
1000 unlabeled Fashion-MNIST training images; for EfficientNet-Lite0 W8 uniform and
`shift` on photo crops), then calibrates 8-bit activations on 400 of the images with
each observer (one pass) and evaluates: top-1 % on the Fashion-MNIST test set, agreement
with FP32 on photo crops for Lite0. The A32 column is the model before activation
quantization. The calibration seconds are for the one pass and the fits.
"""
from __future__ import annotations

import argparse

from benchmarks.common import agree, command_line, copy_of, fashion_mnist, markdown_table, timed, top1, write_result
from renorm.data import Batches, open_images
from renorm.evaluate import predict
from renorm.models import load_model
from renorm.quantize.activations import METHODS, ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize

ROWS = (("fmnist-resnet18", 8, "uniform"), ("fmnist-resnet18", 4, "pow2"),
        ("fmnist-mobilenet_v2", 8, "uniform"), ("fmnist-mobilenet_v2", 4, "pow2"))


def compressed(fp32, calib, bits: int, scheme: str, mode: str):
    model = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=bits, scheme=scheme))
    return renormalize(model, calib, mode, reference=fp32, batch_size=50)


def fashion_rows(quick: bool) -> tuple[list, list, str]:
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if quick else None)
    rows, data = [], []
    for name, bits, scheme in ROWS:
        fp32 = load_model(name).model
        model = compressed(fp32, calib, bits, scheme, "exact")
        result = {"A32": top1(model, test_x, test_y)}
        seconds = {}
        for method in METHODS:
            quantized, seconds[method] = timed(calibrate_activations, model, calib,
                                               ActivationQuantConfig(bits=8, num_images=400, method=method), 50)
            result[method] = top1(quantized, test_x, test_y)
        data.append({"model": name, "weights": f"W{bits} {scheme}", "top1": result, "seconds": seconds})
        rows.append([name, f"W{bits}A8 {scheme}", f"{result['A32']:.2f}",
                     *[f"{result[m]:.2f} ({seconds[m]:.1f} s)" for m in METHODS]])
        print(rows[-1], flush=True)
    header = f"Top-1 % on {names['test']} ({len(test_y)} images); 1000 images of {names['calib']} re-normalize, 400 calibrate."
    return rows, data, header


def lite0_rows(crops: int) -> tuple[list, list]:
    loaded = load_model("efficientnet-lite0")
    fp32 = loaded.model
    calib = Batches(open_images(f"photos:calib:{crops}", loaded.preset), 50).first(crops)
    test = Batches(open_images(f"photos:eval:{crops}", loaded.preset), 50).first(crops)
    reference, _ = predict(fp32, test, 50)
    model = compressed(fp32, calib, 8, "uniform", "shift")
    result, seconds = {"A32": agree(model, test, reference)}, {}
    for method in METHODS:
        quantized, seconds[method] = timed(calibrate_activations, model, calib,
                                           ActivationQuantConfig(bits=8, num_images=min(400, crops), method=method), 50)
        result[method] = agree(quantized, test, reference)
        print(method, result[method], flush=True)
    row = ["efficientnet-lite0", "W8A8 uniform, shift", f"{result['A32']['agreement_top1']:.1f}",
           *[f"{result[m]['agreement_top1']:.1f} ({seconds[m]:.1f} s)" for m in METHODS]]
    return [row], [{"model": "efficientnet-lite0", "crops": crops, "agreement": result, "seconds": seconds}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2000 test images, 100 Lite0 crops")
    parser.add_argument("--crops", type=int, default=300, help="Lite0 photo crops for calibration and evaluation each")
    parser.add_argument("--skip-lite0", action="store_true", help="only the Fashion-MNIST rows")
    args = parser.parse_args()
    rows, data, header = fashion_rows(args.quick)
    crops = 100 if args.quick else args.crops
    if not args.skip_lite0:
        lite_rows, lite_data = lite0_rows(crops)
        rows, data = rows + lite_rows, data + lite_data
    body = (header + f" EfficientNet-Lite0: top-1 agreement % with FP32 on {crops} crops of photos:eval, calibrated on "
            f"{crops} crops of photos:calib. Each cell: accuracy (calibration seconds).\n\n"
            + markdown_table(["model", "setting", "A32", *METHODS], rows))
    write_result("activations" + ("_quick" if args.quick else ""), "Activation ranges: mse vs minmax vs percentile",
                 command_line(), body, data)


if __name__ == "__main__":
    main()
