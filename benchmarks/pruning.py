"""Fashion-MNIST reference models: pruning x re-normalization, and what filter pruning saves.

    python -m benchmarks.pruning [--quick]

Unstructured magnitude pruning (50/70/90% of each conv/linear layer but the first and
last) and filter pruning (30/50% of each layer's output channels, L1 norm, Torch-Pruning
dependency graph), each without re-normalization, with `exact` and with `shift`, on the
full 10k test set with 1000 unlabeled training images. For filter pruning also params,
MACs, file size and CPU latency (batch 64, 2 threads, median of 20, the two models alternating). About 4 minutes.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import command_line, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from renorm.models import load_model
from renorm.prune import PruneConfig, prune
from renorm.renormalize import renormalize

MODELS = ("fmnist-resnet18", "fmnist-mobilenet_v2")
SETTINGS = (("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9), ("filter", 0.3), ("filter", 0.5))
MODES = ("none", "exact", "shift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2000 test images, resnet18, two settings")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="run these only; the table keeps the others' last results")
    args = parser.parse_args()
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if args.quick else None)
    settings = (("unstructured", 0.7), ("filter", 0.3)) if args.quick else SETTINGS
    data = {}
    for name in (MODELS[:1] if args.quick else args.models):
        fp32 = load_model(name).model
        base = top1(fp32, test_x, test_y)
        data[name] = {"fp32": base, "settings": []}
        example = test_x[:64]
        for kind, fraction in settings:
            pruned, report = prune(copy_of(fp32), PruneConfig(fraction, kind), example=example, latency_repeats=20)
            result = {mode: top1(renormalize(pruned, calib, mode, reference=fp32, batch_size=50), test_x, test_y)
                      for mode in MODES}
            entry = {"type": kind, "fraction": fraction, **result,
                     **{k: v for k, v in report.items() if k != "layers"}}
            data[name]["settings"].append(entry)
            print(name, kind, fraction, result, flush=True)
    suffix = "_quick" if args.quick else ""
    data = merged("pruning" + suffix, data)
    accuracy_rows, cost_rows = [], []
    for name, model_entry in data.items():
        base = model_entry["fp32"]
        accuracy_rows.append([name, "FP32", f"{base:.2f}", "", "", ""])
        for entry in model_entry["settings"]:
            label = f"{entry['type']} {entry['fraction']:.0%}"
            accuracy_rows.append([name, label, f"{entry['none']:.2f}", f"{entry['exact']:.2f}", f"{entry['shift']:.2f}",
                                  f"{max(entry['exact'], entry['shift']) - base:+.2f}"])
            if entry["type"] == "filter":
                cost_rows.append([name, label, f"{entry['params_before'] / 1e6:.2f}M → {entry['params_after'] / 1e6:.2f}M",
                                  f"{entry['macs_before'] / 1e6:.1f}M → {entry['macs_after'] / 1e6:.1f}M",
                                  f"{entry['bytes_before'] / 2**20:.1f} → {entry['bytes_after'] / 2**20:.1f}",
                                  f"{entry['latency_ms_before']:.1f} → {entry['latency_ms_after']:.1f}",
                                  f"{entry['latency_ms_before'] / entry['latency_ms_after']:.2f}x"])
    body = (f"Top-1 % on {names['test']} ({len(test_y)} images); re-normalization on {len(calib)} unlabeled images "
            f"from {names['calib']}. Unstructured: the fraction of each conv/linear layer's weights (first conv and "
            "last linear spared, depthwise convs spared); filter: the fraction of each layer's output channels "
            "(last linear spared), removed for real.\n\n"
            + markdown_table(["model", "pruning", "no renorm", "exact", "shift", "best vs FP32"], accuracy_rows)
            + "\n\nFilter pruning, measured (params, MACs per image, fp32 state_dict size in MiB, CPU latency of a "
              f"batch of 64 at 32x32 in ms, {torch.get_num_threads()} threads):\n\n"
            + markdown_table(["model", "pruning", "params", "MACs", "size MiB", "latency ms", "speed-up"], cost_rows))
    write_result("pruning" + suffix, "Pruning and re-normalization (Fashion-MNIST)",
                 command_line(), body, data)


if __name__ == "__main__":
    main()
