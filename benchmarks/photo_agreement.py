"""How steady is top-1 agreement on photos:eval? EfficientNet-Lite0 W4, per photo.

    python -m benchmarks.photo_agreement [--dampings 0.1 0.3]

photos:eval:500 holds crops of only four photos (china, flower, hubble_deep_field,
retina). Top-1 agreement counts a crop when the quantized network's first class is the
FP32 network's; crops of one photo share their near-ties, so a whole photo's crops can
flip together. This prints top-1 agreement per photo beside the pooled top-1 / top-5 / KL
for round-to-nearest and GPTQ reconstruction at a few dampings (W4 uniform, first/last
8-bit, 500 crops of photos:calib, reconstruction on the first 256; none and shift
re-normalization). Writes docs/results/photo_agreement.md.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import markdown_table, write_result
from benchmarks.reconstruct import lite0_data
from renorm.evaluate import agreement, predict
from renorm.photos import SEED, SPLITS
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.reconstruct import ReconstructConfig, reconstruct
from renorm.renormalize import renormalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    fp32, calib, test = lite0_data(args.images)
    reference = predict(fp32, test, 50)[0]
    photo = torch.tensor([int(np.random.default_rng(SEED["eval"] + i).integers(len(SPLITS["eval"])))
                          for i in range(args.images)])
    names = [name.split(".")[0] for _, name in SPLITS["eval"]]
    rows = []

    def row(label: str, model: torch.nn.Module) -> None:
        logits = predict(model, test, 50)[0]
        pooled = agreement(logits, reference)
        same = logits.argmax(1) == reference.argmax(1)
        per_photo = [f"{100 * float(same[photo == k].float().mean()):.0f}" for k in range(len(names))]
        rows.append([label, f"{pooled['agreement_top1']:.1f}", f"{pooled['agreement_top5']:.1f}",
                     f"{pooled['kl']:.3f}", *per_photo])
        print(" | ".join(rows[-1]), flush=True)

    quantized = quantize_weights(fp32, WeightQuantConfig(4, "uniform"))
    row("round to nearest + shift", renormalize(quantized, calib, "shift", reference=fp32))
    for damping in args.dampings:
        rebuilt = reconstruct(quantized, fp32, calib, ReconstructConfig(damping=damping))
        row(f"GPTQ, damping {damping:g}", rebuilt)
        row(f"GPTQ, damping {damping:g} + shift", renormalize(rebuilt, calib, "shift", reference=fp32))
    counts = [str(int((photo == k).sum())) for k in range(len(names))]
    table = markdown_table(["EfficientNet-Lite0 W4 uniform", "top-1", "top-5", "KL",
                            *[f"top-1 on {n} ({c} crops)" for n, c in zip(names, counts)]], rows)
    options = "" if args.dampings == [0.1, 0.3] else " --dampings " + " ".join(f"{d:g}" for d in args.dampings)
    write_result("photo_agreement", "Top-1 agreement on photos:eval, photo by photo",
                 f"python -m benchmarks.photo_agreement{options}",
                 f"Agreement with the FP32 model on {args.images} crops of photos:eval (percent; KL(FP32 || model)).\n\n"
                 + table, {"header": ["setting", "top1", "top5", "kl", *names], "rows": rows})
    print(table)


if __name__ == "__main__":
    main()
