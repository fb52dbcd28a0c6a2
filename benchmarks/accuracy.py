"""Fashion-MNIST reference models: weight bits x scheme x re-normalization, plus W4A8.

    python -m benchmarks.accuracy [--quick]

Full run: both reference models, the full 10k test set, 1000 unlabeled training images
for calibration (about 15 minutes on 2 cores). Writes docs/results/accuracy.md/.json and
docs/results/accuracy_vs_bits.png.
"""
from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, command_line, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from renorm.models import load_model
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize

MODELS = ("fmnist-resnet18", "fmnist-mobilenet_v2")
BITS = (8, 4, 3, 2)
SCHEMES = ("pow2", "uniform", "minmax")
MODES = ("none", "exact", "shift")


def evaluate_config(fp32, calib, test_x, test_y, bits: int, scheme: str, abits: int | None = None) -> dict:
    """Top-1 after quantization with each re-normalization mode (and A8 after exact/shift)."""
    quantized = copy_of(fp32)
    quantize_weights(quantized, WeightQuantConfig(bits=bits, scheme=scheme), inplace=True)
    result = {}
    for mode in MODES:
        model = renormalize(quantized, calib, mode, reference=fp32, batch_size=50)
        if abits:
            calibrate_activations(model, calib, ActivationQuantConfig(bits=abits, num_images=400), batch_size=50,
                                  inplace=True)
        result[mode] = top1(model, test_x, test_y)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2000 test images, resnet18 only, fewer configs")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="run these only; the table keeps the others' last results")
    args = parser.parse_args()
    models = MODELS[:1] if args.quick else args.models
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if args.quick else None)
    data = {}
    for name in models:
        fp32 = load_model(name).model
        base = top1(fp32, test_x, test_y)
        data[name] = {"fp32": base, "configs": []}
        configs = [(b, s, None) for b in BITS for s in SCHEMES
                   if not (s == "pow2" and b > 6) and not (s == "minmax" and b > 3)]
        if args.quick:
            configs = [(4, "pow2", None), (2, "uniform", None)]
        configs.append((4, "pow2", 8))
        for bits, scheme, abits in configs:
            result = evaluate_config(fp32, calib, test_x, test_y, bits, scheme, abits)
            label = f"W{bits}A{abits}" if abits else f"W{bits}"
            data[name]["configs"].append({"weights": label, "scheme": scheme, **result})
            print(name, label, scheme, result, flush=True)
    suffix = "_quick" if args.quick else ""
    data = merged("accuracy" + suffix, data)
    rows = []
    for name, entry in data.items():
        rows.append([name, "FP32", "", f"{entry['fp32']:.2f}", "", ""])
        rows += [[name, c["weights"], c["scheme"], f"{c['none']:.2f}", f"{c['exact']:.2f}", f"{c['shift']:.2f}"]
                 for c in entry["configs"]]
    body = (f"Top-1 % on {names['test']} ({len(test_y)} images); re-normalization on {len(calib)} unlabeled images "
            f"from {names['calib']}. First conv and last linear layer: 8-bit uniform. `none`: quantized, BN "
            "statistics as trained; `exact`: re-estimated; `shift`: trained statistics moved by the measured shift. "
            "A8: 8-bit activations calibrated on 400 of the images after re-normalization. pow2 is defined for "
            "2-6 bits; minmax (the naive scale, max|W| on the top level) is shown where the scale fit matters, 3 and 2 "
            "bits.\n\n" + markdown_table(["model", "weights", "scheme", "no renorm", "exact", "shift"], rows))
    write_result("accuracy" + suffix, "Accuracy vs weight bits (Fashion-MNIST)", command_line(), body, data)
    plot(data, RESULTS / f"accuracy_vs_bits{suffix}.png")


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], data.items()):
        for scheme, color in (("uniform", "tab:blue"), ("pow2", "tab:orange"), ("minmax", "tab:gray")):
            points = sorted((int(c["weights"][1:]), c) for c in entry["configs"]
                            if c["scheme"] == scheme and "A" not in c["weights"])
            if not points:
                continue
            bits = [p[0] for p in points]
            ax.plot(bits, [p[1]["none"] for p in points], "--", marker="o", color=color, label=f"{scheme}, no renorm")
            ax.plot(bits, [p[1]["exact"] for p in points], "-", marker="s", color=color, label=f"{scheme}, exact renorm")
        ax.axhline(entry["fp32"], color="black", linewidth=0.8, label="FP32")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 3, 4, 8], ["2", "3", "4", "8"])
        ax.set_xlabel("weight bits")
        ax.set_ylabel("top-1 %")
        ax.set_title(name)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
