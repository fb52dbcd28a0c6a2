"""Which re-normalization after which compression? `--renorm auto` against each mode.

    python -m benchmarks.renorm_auto [--quick] [--models fmnist-resnet18 fmnist-mobilenet_v2 efficientnet-lite0]

For each Fashion-MNIST reference and weight setting (round to nearest, and renorm's
default GPTQ reconstruction): the weights are compressed once; then each mode (none,
shift, exact) re-normalizes a copy, 8-bit activations are calibrated where the setting
says A8, and the copy is scored on the full test set. `auto` runs on the same
compressed weights; it keeps the statistics of one of the three modes (checked here,
tensor for tensor), so its top-1 is that mode's. Its choice is label-free: the lowest
mean KL(FP32 || model) on the last 256 of the 1000 calibration images (reconstruction
fits the first 256). Columns: top-1 % per mode, auto's choice and its top-1 against
`exact` (the default) and against the best mode in hindsight, each mode's KL on those
images, and the seconds of `exact` and of `auto`. Each model can run in its own process;
the table is rendered from docs/results/renorm_auto.json, which keeps the models measured
before. EfficientNet-Lite0 (ImageNet weights, no activation quantization): calibration on
500 crops of photos:calib, scored by top-1 agreement with its FP32 self on 500 crops of
photos:eval (KL(FP32 || model) there in brackets), as in benchmarks.reconstruct.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from benchmarks.common import COMMIT, agree, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from benchmarks.reconstruct import lite0_data
from renorm.evaluate import predict
from renorm.models import load_model
from renorm.quantize.plan import parse_layer_bits
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import MODES, batchnorm_layers, renormalize_with_summary

reconstruction = importlib.import_module("renorm.reconstruct")
MODELS = ("fmnist-resnet18", "fmnist-mobilenet_v2", "efficientnet-lite0")
# label -> (bits, scheme, activation bits, reconstruct, --layer-bits)
SETTINGS = {"W8A8 uniform": (8, "uniform", 8, False, ()), "W4A8 uniform": (4, "uniform", 8, False, ()),
            "W4A8 pow2": (4, "pow2", 8, False, ()), "W3 uniform": (3, "uniform", 32, False, ()),
            "W2 uniform": (2, "uniform", 32, False, ()), "W4A8 uniform, gptq": (4, "uniform", 8, True, ()),
            "W4A8 pow2, gptq": (4, "pow2", 8, True, ()), "W3 uniform, gptq": (3, "uniform", 32, True, ()),
            "W2 uniform, gptq": (2, "uniform", 32, True, ())}
LITE0_SETTINGS = {"W8 uniform": (8, "uniform", 32, False, ()), "W4 uniform": (4, "uniform", 32, False, ()),
                  "W8 uniform, gptq": (8, "uniform", 32, True, ()), "W4 uniform, gptq": (4, "uniform", 32, True, ()),
                  "W4 uniform, depthwise 8-bit, gptq": (4, "uniform", 32, True, ("depthwise=8",)),
                  "W4 pow2, gptq": (4, "pow2", 32, True, ()), "W3 uniform, gptq": (3, "uniform", 32, True, ())}


def statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for _, bn in batchnorm_layers(model) for t in (bn.running_mean, bn.running_var)]


def measure(name: str, fp32: torch.nn.Module, calib: torch.Tensor, settings: dict, score) -> list[dict]:
    """Rows of one model; score(model) -> {"top1": ..., and for agreement "kl"}."""
    rows = []
    for label, (bits, scheme, abits, rebuild, layer_bits) in settings.items():
        config = WeightQuantConfig(bits=bits, scheme=scheme, layer_bits=parse_layer_bits(layer_bits))
        weights = quantize_weights(copy_of(fp32), config)
        if rebuild:
            weights = reconstruction.reconstruct(weights, fp32, calib, reconstruction.ReconstructConfig("gptq"))
        row = {"model": name, "setting": label, "top1": {}, "eval_kl": {}, "seconds": {}}
        kept = {}
        for mode in MODES:
            start = time.perf_counter()
            model, _ = renormalize_with_summary(weights, calib, mode, reference=fp32)
            row["seconds"][mode] = time.perf_counter() - start
            kept[mode] = statistics(model)
            if abits != 32:
                model = calibrate_activations(model, calib, ActivationQuantConfig(abits))
            scores = score(model)
            row["top1"][mode] = scores["top1"]
            if "kl" in scores:
                row["eval_kl"][mode] = scores["kl"]
        start = time.perf_counter()
        model, summary = renormalize_with_summary(weights, calib, "auto", reference=fp32)
        row["seconds"]["auto"] = time.perf_counter() - start
        row["chosen"], row["kl"] = summary["chosen"], summary["kl"]
        same = all(torch.equal(a, b) for a, b in zip(statistics(model), kept[row["chosen"]]))
        assert same, f"{name} {label}: auto's statistics are not those of {row['chosen']}"
        row["top1"]["auto"] = row["top1"][row["chosen"]]
        rows.append(row)
        print(name, label, row["top1"], row["chosen"], {k: round(v, 1) for k, v in row["seconds"].items()}, flush=True)
    return rows


def render(data: dict[str, list[dict]]) -> str:
    lines, sentences = [], []
    for name in data:
        gains, regrets = [], []
        for row in data[name]:
            t = row["top1"]
            best = max(t[m] for m in MODES)
            gains.append(t["auto"] - t["exact"])
            regrets.append(best - t["auto"])
            cells = [f"{t[m]:.2f}" + (f" ({row['eval_kl'][m]:.3f})" if row.get("eval_kl") else "") for m in MODES]
            lines.append([name, row["setting"], *cells, f"{row['chosen']}",
                          f"{t['auto']:.2f}", f"{t['auto'] - t['exact']:+.2f}", f"{best - t['auto']:.2f}",
                          " / ".join(f"{row['kl'][m]:.4f}" for m in MODES),
                          f"{row['seconds']['exact']:.1f}", f"{row['seconds']['auto']:.1f}", row["commit"]])
        sentences.append(f"{name}: over {len(gains)} rows auto is {sum(gains) / len(gains):+.2f} point from `exact` "
                         f"on average (from {min(gains):+.2f} to {max(gains):+.2f}) and {sum(regrets) / len(regrets):.2f} "
                         f"below the best mode in hindsight (at most {max(regrets):.2f}); it picked the best mode on "
                         f"{sum(r == 0 for r in regrets)} of them.")
    table = markdown_table(["model", "weights", *MODES, "auto chose", "auto", "auto - exact", "best - auto",
                            "KL " + " / ".join(MODES), "exact s", "auto s", "commit"], lines)
    return table + "\n\n" + "\n".join(f"- {s}" for s in sentences)


def _few(settings: dict, count: int, args) -> dict:
    """The settings asked for (--settings), else with --quick the first and, with count 2, the last (a
    reconstructed one), else all."""
    names = list(settings)
    if args.settings:
        names = [name for name in names if name in args.settings]
    elif args.quick:
        names = (names[:1] + names[-1:])[:count]
    return {name: settings[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2000 test images, 200 crops, two settings per "
                        "Fashion-MNIST model and one for Lite0")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS,
                        help="models to measure (none: re-render the table from the .json)")
    parser.add_argument("--settings", nargs="+", metavar="LABEL", help="only these settings (labels as in the "
                        "table), e.g. \"W4 uniform, gptq\"")
    args = parser.parse_args()
    unknown = set(args.settings or ()) - set(SETTINGS) - set(LITE0_SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS) + list(LITE0_SETTINGS)}")
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if args.quick else None)
    suffix = "_quick" if args.quick else ""
    fresh = {}
    for name in args.models:
        if name == "efficientnet-lite0":
            fp32, crops, test = lite0_data(200 if args.quick else 500)
            reference, _ = predict(fp32, test, 50)

            def score(model, test=test, reference=reference):
                result = agree(model, test, reference)
                return {"top1": result["agreement_top1"], "kl": result["kl"]}

            rows = measure(name, fp32.eval(), crops, _few(LITE0_SETTINGS, 1, args), score)
        else:
            rows = measure(name, load_model(name).model.eval(), calib, _few(SETTINGS, 2, args),
                           lambda model: {"top1": top1(model, test_x, test_y)})
        fresh[name] = [{**row, "commit": COMMIT} for row in rows]
    data = merged("renorm_auto" + suffix, fresh)
    body = (f"{len(calib)} unlabeled images from {names['calib']}; top-1 % on {names['test']} ({len(test_y)} "
            "images); weights quantized per output channel, first and last layer 8-bit; gptq: renorm's default "
            "reconstruction (256 images, damping 0.1); A8: 8-bit activations calibrated after re-normalization. "
            "KL: mean KL(FP32 || model) on the last 256 calibration images, before activation quantization, what "
            "auto compares. Seconds: the re-normalization stage alone, one process. efficientnet-lite0: top-1 "
            "agreement % with FP32 on 500 crops of photos:eval (KL(FP32 || model) there), calibration on 500 crops "
            "of photos:calib.\n\n" + render(data))
    write_result("renorm_auto" + suffix, "Re-normalization mode: auto against none, shift and exact",
                 "python -m benchmarks.renorm_auto", body, data)


if __name__ == "__main__":
    main()
