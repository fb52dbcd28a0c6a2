"""How many unlabeled images are enough? Accuracy vs calibration-set size.

    python -m benchmarks.calib_size [--quick]

W3 uniform weights and 70% unstructured sparsity on both Fashion-MNIST reference models,
re-normalized (`exact` and `shift`) on 16, 64, 256, 1000 and 4000 unlabeled training
images; three random draws of 16 and 64 images (mean and spread), one of 256 and more;
full 10k test set. Writes
docs/results/calib_size.md/.json and calib_size.png. About 9 minutes per model at 1 thread (measured for mobilenet_v2).
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks.common import RESULTS, command_line, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from renorm.data import PRESETS, Batches, open_images, sample
from renorm.models import load_model
from renorm.prune import PruneConfig, magnitude_prune
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize

MODELS = ("fmnist-resnet18", "fmnist-mobilenet_v2")
SIZES = (16, 64, 256, 1000, 4000)
SEEDS = (0, 1, 2)
MANY = 256  # from this size on one draw: three draws where the draw matters most (16, 64 images), to keep the run short


def compressions(fp32):
    w3 = copy_of(fp32)
    quantize_weights(w3, WeightQuantConfig(bits=3, scheme="uniform"), inplace=True)
    sparse = copy_of(fp32)
    magnitude_prune(sparse, PruneConfig(0.7))
    return {"W3 uniform": w3, "70% unstructured": sparse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet18, sizes 16/256, one draw, 2000 test images")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="run these only; the table keeps the others' last results")
    args = parser.parse_args()
    sizes, seeds = ((16, 256), (0,)) if args.quick else (SIZES, SEEDS)
    _, test_x, test_y, names = fashion_mnist(16, 2000 if args.quick else None)
    train = open_images("fashion-mnist:train", PRESETS["fashion-mnist"], labeled=False)
    draws = {seed: Batches(sample(train, max(sizes), seed), 500).first(max(sizes)) for seed in seeds}
    data = {}
    for name in (MODELS[:1] if args.quick else args.models):
        fp32 = load_model(name).model
        base = top1(fp32, test_x, test_y)
        data[name] = {"fp32": base, "curves": {}}
        for label, model in compressions(fp32).items():
            before = top1(model, test_x, test_y)
            for mode in ("exact", "shift"):
                curve = []
                for size in sizes:
                    scores = [top1(renormalize(model, draws[seed][:size], mode, reference=fp32, batch_size=50),
                                   test_x, test_y) for seed in (seeds if size < MANY else seeds[:1])]
                    curve.append({"images": size, "mean": statistics.mean(scores), "min": min(scores),
                                  "max": max(scores), "scores": scores})
                data[name]["curves"][f"{label}, {mode}"] = {"before": before, "points": curve}
                print(name, label, mode, [round(p["mean"], 2) for p in curve], flush=True)
    suffix = "_quick" if args.quick else ""
    data = merged("calib_size" + suffix, data)
    rows = []
    for name, entry in data.items():
        for key, curve in entry["curves"].items():
            label, mode = key.rsplit(", ", 1)
            rows.append([name, label, mode, f"{curve['before']:.2f}",
                         *[f"{p['mean']:.2f} ({p['min']:.1f}-{p['max']:.1f})" if len(p["scores"]) > 1
                           else f"{p['mean']:.2f}" for p in curve["points"]]])
    body = (f"Top-1 % on {names['test']} ({len(test_y)} images) after re-normalizing on N unlabeled training images: "
            f"mean (min-max) over {len(seeds)} random draws below {MANY} images, one draw from {MANY} on. The `no renorm` column is the compressed model with its "
            "trained statistics.\n\n"
            + markdown_table(["model", "compression", "mode", "no renorm", *[f"N={s}" for s in sizes]], rows))
    write_result("calib_size" + suffix, "Accuracy vs number of calibration images", command_line(), body, data)
    plot(data, RESULTS / f"calib_size{suffix}.png")


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], data.items()):
        for index, (label, curve) in enumerate(entry["curves"].items()):
            color = f"C{index}"
            points = curve["points"]
            x = [p["images"] for p in points]
            ax.errorbar(x, [p["mean"] for p in points],
                        yerr=[[p["mean"] - p["min"] for p in points], [p["max"] - p["mean"] for p in points]],
                        marker="o", capsize=3, color=color, label=label)
            ax.axhline(curve["before"], color=color, linestyle=":", linewidth=0.8)
        ax.axhline(entry["fp32"], color="black", linewidth=0.8, label="FP32")
        ax.set_xscale("log")
        ax.set_xlabel("unlabeled calibration images")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{name} (dotted: before re-normalization)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
