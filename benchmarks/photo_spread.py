"""Lite0's agreement on photos:eval: how much is the calibration sample, how much the photos?

    python -m benchmarks.photo_spread [--subsets 3] [--dampings 0.1 0.3] [--sweeps 0] [--refined 64]
                                      [--settings "W4 uniform" ...]

EfficientNet-Lite0, first/last 8-bit, the rest as each of --settings says (the
weight settings of benchmarks.reconstruct's Lite0 table). For each of --subsets seeded
calibration samples (256 of the first 500 crops of photos:calib:1000; subset s is
torch.randperm(500) under seed s): round to nearest + shift, and GPTQ reconstruction on
the 256 crops at each damping (with and without shift). Each model is scored twice
against the FP32 model: on photos:eval:500 (four *other* photos: what the issue's
targets are measured on) and on crops 500-999 of photos:calib (the calibration photos,
crops not used: in the calibration's own domain). With --refined N, two more GPTQ rows per
damping: on the subset's 256 crops and the next N of its permutation as they are (more real
crops), and with those N refined (ReconstructConfig.refined = N, --reconstruct-refined).
Writes docs/results/photo_spread.md, or --out NAME.md.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import markdown_table, write_result
from benchmarks.reconstruct import LITE0_SETTINGS
from renorm.data import Batches, open_images
from renorm.evaluate import agreement, predict
from renorm.models import load_model
from renorm.quantize.plan import parse_layer_bits
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.reconstruct import ReconstructConfig, reconstruct
from renorm.renormalize import renormalize

CALIBRATION = 256  # crops per subset (reconstruct's default number of images)
POOL = 500  # subsets are drawn from the first POOL crops of photos:calib; the next POOL are held out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--refined", type=int, default=0, help="also rows with N more crops, as they are and refined")
    parser.add_argument("--sweeps", type=int, nargs="+", default=[0],
                        help="coordinate-descent sweeps after GPTQ (ReconstructConfig.sweeps); one row each")
    settings = {label: (bits, scheme, layer_bits) for label, bits, scheme, layer_bits, _ in LITE0_SETTINGS}
    parser.add_argument("--settings", nargs="+", default=["W4 uniform"], choices=list(settings))
    parser.add_argument("--out", default="photo_spread", help="result name under docs/results/")
    args = parser.parse_args()
    loaded = load_model("efficientnet-lite0")
    fp32 = loaded.model
    pool = Batches(open_images(f"photos:calib:{2 * POOL}", loaded.preset), 50).first(2 * POOL)
    sets = {"eval": Batches(open_images(f"photos:eval:{POOL}", loaded.preset), 50).first(POOL), "held": pool[POOL:]}
    references = {name: predict(fp32, images, 50)[0] for name, images in sets.items()}
    results: dict[str, list[dict]] = {}

    def score(label: str, model: torch.nn.Module, subset: int) -> None:
        row = {name: agreement(predict(model, images, 50)[0], references[name]) for name, images in sets.items()}
        results.setdefault(label, []).append({"subset": subset, **row})
        print(label, subset, row, flush=True)

    for setting in args.settings:
        bits, scheme, layer_bits = settings[setting]
        quantized = quantize_weights(fp32, WeightQuantConfig(bits, scheme, layer_bits=parse_layer_bits(layer_bits)))
        prefix = "" if args.settings == ["W4 uniform"] else f"{setting}: "
        for subset in range(1, args.subsets + 1):
            order = torch.randperm(POOL, generator=torch.Generator().manual_seed(subset))
            calib, more = pool[:POOL][order[:CALIBRATION]], pool[:POOL][order[:CALIBRATION + args.refined]]
            score(f"{prefix}round to nearest + shift", renormalize(quantized, calib, "shift", reference=fp32), subset)
            for damping in args.dampings:
                for sweeps in args.sweeps:
                    rebuilt = reconstruct(quantized, fp32, calib, ReconstructConfig(damping=damping, sweeps=sweeps,
                                                                                      num_images=CALIBRATION))
                    label = f"{prefix}GPTQ, damping {damping:g}" + (f", {sweeps} sweeps of descent" if sweeps else "")
                    score(label, rebuilt, subset)
                    score(f"{label} + shift", renormalize(rebuilt, calib, "shift", reference=fp32), subset)
                    if not args.refined:
                        continue
                    for extra, config in ((f"{args.refined} more crops", {"num_images": len(more)}),
                                          (f"{args.refined} refined", {"num_images": CALIBRATION,
                                                                       "refined": args.refined})):
                        rebuilt = reconstruct(quantized, fp32, more, ReconstructConfig(damping=damping, sweeps=sweeps,
                                                                                         **config))
                        score(f"{label}, {extra}", rebuilt, subset)
                        score(f"{label}, {extra} + shift", renormalize(rebuilt, calib, "shift", reference=fp32), subset)

    def cells(row: dict) -> list[str]:
        return [f"{row[name]['agreement_top1']:.1f} / {row[name]['agreement_top5']:.1f} / {row[name]['kl']:.3f}"
                for name in sets]

    def spread(rows: list[dict], name: str, key: str, digits: int) -> str:
        values = [row[name][key] for row in rows]
        return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    per_subset = markdown_table(["setting", "subset", "photos:eval top-1 / top-5 / KL",
                                 "held-out crops of the calibration photos top-1 / top-5 / KL"],
                                [[label, str(row["subset"]), *cells(row)] for label, rows in results.items()
                                 for row in rows])
    summary = markdown_table(["setting", "photos:eval top-1", "photos:eval KL", "held-out top-1", "held-out KL"],
                             [[label, spread(rows, "eval", "agreement_top1", 1), spread(rows, "eval", "kl", 3),
                               spread(rows, "held", "agreement_top1", 1), spread(rows, "held", "kl", 3)]
                              for label, rows in results.items()])
    options = "" if (args.subsets, args.dampings, args.sweeps, args.settings, args.out, args.refined) == (
        3, [0.1, 0.3], [0], ["W4 uniform"], "photo_spread", 0) else \
        f" --subsets {args.subsets} --dampings {' '.join(f'{d:g}' for d in args.dampings)}" \
        + (f" --sweeps {' '.join(str(s) for s in args.sweeps)}" if args.sweeps != [0] else "") \
        + (f" --refined {args.refined}" if args.refined else "") + " --settings " \
        + " ".join(f'"{setting}"' for setting in args.settings) + f" --out {args.out}"
    body = (f"EfficientNet-Lite0, {', '.join(args.settings)} (first/last 8-bit). Each subset: {CALIBRATION} of the "
            f"first {POOL} crops of photos:calib:{2 * POOL} (seeded permutation), used for reconstruction and "
            f"re-normalization. Agreement with FP32 (top-1 % / top-5 % / KL(FP32 || model)) on photos:eval:{POOL} "
            f"(four other photos) and on crops {POOL}-{2 * POOL - 1} of photos:calib (same five photos, crops not "
            f"used). Mean (min-max) over the {args.subsets} subsets:\n\n" + summary + "\n\nPer subset:\n\n"
            + per_subset)
    write_result(args.out, "Agreement on other photos and on the calibration photos, per calibration subset",
                 f"python -m benchmarks.photo_spread{options}", body,
                 {"settings": args.settings, "results": results})


if __name__ == "__main__":
    main()
