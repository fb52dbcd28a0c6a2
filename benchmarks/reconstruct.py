"""Reconstruction: round-to-nearest vs each method, with and without re-normalization.

    python -m benchmarks.reconstruct [--quick] [--models efficientnet-lite0 fmnist-mobilenet_v2 fmnist-resnet18
                                     resnet18-224 tune]

Each model can run in its own process (`--models NAME`); the tables are rendered from
docs/results/reconstruct.json, which keeps the models measured before.

EfficientNet-Lite0 (ImageNet weights): calibration on 500 crops of photos:calib (the
reconstruction uses the first 256 of them, renorm's default), agreement with the FP32
model's own predictions on 500 crops of photos:eval (no photo in common): top-1 / top-5
agreement and KL(FP32 || model). Weights W4 uniform, W4 uniform with depthwise convs at
8 bits, W4 pow2, W3 uniform, W8 uniform; first conv and last linear layer 8-bit.
Fashion-MNIST references: 1000 unlabeled training images (reconstruction uses 256),
top-1 on the full 10k test set (or the bundled subset, said in the table), at W4A8
(uniform and pow2), W3 and W2 uniform. resnet18-224: torchvision resnet18 (random
weights: only the cost is measured) on 256 crops of photos:calib at 224 px, W4 uniform.
tune: the solvers' settings on the rounding problems of Lite0's W4 layers (objective
left, as a fraction of round-to-nearest's, averaged over every 4th layer).
Each row: seconds and peak RSS of the reconstruction stage itself (renorm.report.stage).
"""
from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

import torch

from benchmarks.common import COMMIT, agree, copy_of, fashion_mnist, markdown_table, merged, top1, write_result
from renorm.data import Batches, open_images
from renorm.evaluate import predict
from renorm.models import load_model
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.plan import parse_layer_bits
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize
from renorm.report import stage

reconstruction = importlib.import_module("renorm.reconstruct")
# method name in the tables -> ReconstructConfig fields (rtn: no reconstruction)
METHODS = {"rtn": None, "gptq": {"method": "gptq"}, "gptq, damping 0.01": {"method": "gptq", "damping": 0.01},
           "gptq, damping auto": {"method": "gptq", "damping": "auto"},
           "gptq, FP32 inputs": {"method": "gptq", "inputs": "fp32"},
           "gptq, 500 images": {"method": "gptq", "num_images": 500},
           "gptq + descent": {"method": "gptq", "sweeps": 3},
           "gptq + descent, 500 images": {"method": "gptq", "sweeps": 3, "num_images": 500},
           "gptq, 1000 images": {"method": "gptq", "num_images": 1000},
           "gptq + descent, 1000 images": {"method": "gptq", "sweeps": 3, "num_images": 1000},
           "gptq, 64 refined": {"method": "gptq", "refined": 64},
           "adaround": {"method": "adaround"}, "nearest": {"method": "nearest"}}
ALL = ("rtn", "gptq", "gptq, 64 refined", "gptq, damping 0.01", "gptq, FP32 inputs", "adaround")
LITE0_SETTINGS = (("W4 uniform", 4, "uniform", (), ALL),
                  ("W4 uniform, depthwise 8-bit", 4, "uniform", ("depthwise=8",), ("rtn", "gptq", "gptq, 64 refined")),
                  ("W4 pow2", 4, "pow2", (), ("rtn", "gptq", "gptq, 64 refined")),
                  ("W3 uniform", 3, "uniform", (), ("rtn", "gptq", "gptq, 64 refined")),
                  ("W8 uniform", 8, "uniform", (), ("rtn", "gptq", "gptq, 64 refined")))
FMNIST_SETTINGS = (("W4A8 uniform", 4, "uniform", 8), ("W4A8 pow2", 4, "pow2", 8), ("W3 uniform", 3, "uniform", 32),
                   ("W2 uniform", 2, "uniform", 32))
# adaround where it fits a CPU budget: mobilenet_v2 at W2 only (805 s at W4A8 on one thread of a shared machine);
# resnet18's 3x3 convs have K = 4608 inputs per row, ~30 GFLOP per Adam step, far outside it
FMNIST_DEFAULT = ("rtn", "gptq", "gptq, FP32 inputs", "gptq, 64 refined")
DESCENT = ("gptq + descent", "gptq + descent, 500 images")
# every calibration image (1000): the images AIMET's AdaRound used in benchmarks.peers_reconstruct
ALL_IMAGES = ("gptq, 1000 images", "gptq + descent, 1000 images")
LOW_BITS = ("gptq, 500 images", *DESCENT, *ALL_IMAGES)  # the W3 and W2 rows beyond the default ones
W2 = ("rtn", "gptq", "gptq, damping 0.01", "gptq, FP32 inputs", "gptq, 64 refined", *LOW_BITS)
FMNIST_METHODS = {name: {"W4A8 uniform": FMNIST_DEFAULT + ALL_IMAGES, "W4A8 pow2": FMNIST_DEFAULT + ALL_IMAGES,
                         "W3 uniform": FMNIST_DEFAULT + LOW_BITS, "W2 uniform": W2 + extra}
                  for name, extra in (("fmnist-mobilenet_v2", ("adaround",)), ("fmnist-resnet18", ()))}


EARLIER_COMMIT = "ee00610"  # rows in reconstruct.json without a "commit" field were measured there


def _chosen(methods, args) -> tuple[str, ...]:
    """The methods to measure now (--methods); the others keep their rows from reconstruct.json."""
    return tuple(m for m in methods if args.methods is None or m in args.methods)


def _label(entry: dict[str, Any], latest: str) -> str:
    """The method, and the commit it was measured at when that is not the table's latest."""
    commit = entry.get("commit", EARLIER_COMMIT)
    return entry["method"] + (f" (at {commit})" if commit != latest and entry["method"] else "")


def _reference_commit(entries: list[dict]) -> str:
    """The commit of the default method's rows: rows measured at another commit say which."""
    return next((e.get("commit", EARLIER_COMMIT) for e in entries if e["method"] == "gptq"), EARLIER_COMMIT)


def _keep_unmeasured(name: str, rows: list[dict], args) -> list[dict]:
    """With --methods: the new rows, plus the earlier rows of the methods not measured now, in table order."""
    if args.methods is None:
        return rows
    earlier = merged("reconstruct" + ("_quick" if args.quick else ""), {}).get(name, [])
    fresh = {(row["weights"], row["method"]): row for row in rows}
    kept = [fresh.pop((row["weights"], row["method"]), None) or {"commit": EARLIER_COMMIT, **row} for row in earlier]
    combined = kept + list(fresh.values())
    weights = list(dict.fromkeys(row["weights"] for row in combined))
    order = ["", *METHODS]
    return sorted(combined, key=lambda row: (weights.index(row["weights"]), order.index(row["method"])))


def reconstructed(fp32, quantized, calib, method: str, images: int) -> tuple[torch.nn.Module, dict]:
    """The quantized model after `method` (or as it is, for round-to-nearest), with time and memory."""
    if METHODS[method] is None:
        return quantized, {"seconds": 0.0, "peak_rss_mb": None}
    stages: dict[str, dict] = {}
    config = reconstruction.ReconstructConfig(**{"num_images": images, **METHODS[method]})
    with stage(stages, "reconstruct"):
        model = reconstruction.reconstruct(quantized, fp32, calib, config)
    return model, stages["reconstruct"]


def lite0_data(count: int):
    loaded = load_model("efficientnet-lite0")
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), 50).first(count)
    test = Batches(open_images(f"photos:eval:{count}", loaded.preset), 50).first(count)
    return loaded.model, calib, test


def lite0_rows(args) -> list[dict]:
    fp32, calib, test = lite0_data(200 if args.quick else 500)
    reference, _ = predict(fp32, test, 50)
    data = []
    for label, bits, scheme, layer_bits, methods in (LITE0_SETTINGS[:1] if args.quick else LITE0_SETTINGS):
        quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=bits, scheme=scheme,
                                                                      layer_bits=parse_layer_bits(layer_bits)))
        for method in _chosen(methods if not args.quick else ("rtn", "gptq"), args):
            model, cost = reconstructed(fp32, quantized, calib, method, args.images)
            result = {mode: agree(renormalize(model, calib, mode, reference=fp32), test, reference)
                      for mode in ("none", "shift")}
            data.append({"weights": label, "method": method, **result, **cost, "images": args.images,
                         "commit": COMMIT})
            print(data[-1], flush=True)
    return data


def fmnist_rows(name: str, args, data_cache: dict) -> list[dict]:
    if "data" not in data_cache:
        data_cache["data"] = fashion_mnist(1000, num_test=2000 if args.quick else None)
    calib, test_x, test_y, names = data_cache["data"]
    fp32 = load_model(name).model
    data = [{"weights": "FP32", "method": "", "none": top1(fp32, test_x, test_y), "test": names["test"]}]
    for label, bits, scheme, abits in (FMNIST_SETTINGS[:1] if args.quick else FMNIST_SETTINGS):
        quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=bits, scheme=scheme))
        methods = FMNIST_METHODS.get(name, {}).get(label, FMNIST_DEFAULT)
        for method in _chosen(methods if not args.quick else ("rtn", "gptq"), args):
            model, cost = reconstructed(fp32, quantized, calib, method, args.images)
            result = {}
            for mode in ("none", "exact"):
                final = renormalize(model, calib, mode, reference=fp32)
                if abits != 32:
                    final = calibrate_activations(final, calib, ActivationQuantConfig(bits=abits))
                result[mode] = top1(final, test_x, test_y)
            data.append({"weights": label, "method": method, **result, **cost, "test": names["test"],
                         "images": (METHODS[method] or {}).get("num_images", args.images), "commit": COMMIT})
            print(data[-1], flush=True)
    return data


def resnet18_rows(args) -> list[dict]:
    """Cost only: torchvision resnet18 (random weights) at 224 px, W4 uniform, each method but adaround."""
    import torchvision

    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18(weights=None).eval()
    loaded = load_model("efficientnet-lite0")  # its preset: ImageNet normalization, 224 px crops
    count = args.images + 64  # the refined rows take the 64 after the first args.images
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), 50).first(count)
    quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=4, scheme="uniform"))
    data = []
    for method in _chosen(("gptq", "gptq, FP32 inputs", "gptq, 64 refined"), args):
        _, cost = reconstructed(fp32, quantized, calib, method, args.images)
        data.append({"weights": "W4 uniform", "method": method, **cost, "images": args.images, "commit": COMMIT})
        print(data[-1], flush=True)
    return data


def tune_rows(args) -> list[dict]:
    """The solvers' settings on Lite0's W4 uniform rounding problems (every 4th layer, FP32 inputs)."""
    from renorm.reconstruct.solvers import solve_adaround, solve_gptq, solve_nearest

    fp32, calib, _ = lite0_data(args.images)
    quantized = quantize_weights(copy_of(fp32), WeightQuantConfig(bits=4, scheme="uniform"))
    problems = []
    original = reconstruction.SOLVERS["nearest"]
    reconstruction.SOLVERS["nearest"] = lambda problem, config: (problems.append(problem), original(problem, config))[1]
    try:
        reconstruction.reconstruct(quantized, fp32, calib, reconstruction.ReconstructConfig(
            method="nearest", num_images=args.images, inputs="fp32"))
    finally:
        reconstruction.SOLVERS["nearest"] = original
    picked = problems[1:-1:4]

    def left(solver) -> tuple[float, float]:
        start, ratios = time.perf_counter(), []
        for problem in picked:
            nearest, scale = solve_nearest(problem)
            values, new_scale = solver(problem)
            ratios.append(float(problem.error(values * new_scale[..., None]).sum()
                                / problem.error(nearest * scale[..., None]).sum()))
        return sum(ratios) / len(ratios), time.perf_counter() - start

    data = []
    settings = [("gptq, rounds 2", lambda p: solve_gptq(p, 2)), ("gptq, rounds 1", lambda p: solve_gptq(p, 1)),
                ("gptq, rounds 2, 3 sweeps of descent", lambda p: solve_gptq(p, 2, 3))]
    for steps, rate, penalty in ((1000, 0.01, 0.01), (1000, 0.1, 1.0), (1000, 0.1, 3.0)):
        settings.append((f"adaround, {steps} steps, lr {rate}, regularization {penalty}",
                         lambda p, s=steps, r=rate, g=penalty: solve_adaround(p, s, r, g)))
    for label, solver in settings:
        ratio, seconds = left(solver)
        data.append({"solver": label, "objective_left": ratio, "seconds": seconds, "layers": len(picked),
                     "commit": COMMIT, "damping": reconstruction.ReconstructConfig().damping})
        print(data[-1], flush=True)
    return data


def _cell(result: dict[str, Any]) -> str:
    return f"{result['agreement_top1']:.1f} / {result['agreement_top5']:.1f} / {result['kl']:.3f}"


def _cost(entry: dict[str, Any]) -> list[str]:
    mib = entry.get("peak_rss_mb")
    return [f"{entry['seconds']:.0f}" if mib is not None else "", "" if mib is None else f"{mib:.0f}"]


def render(everything: dict[str, list[dict]]) -> str:
    tables = []
    if "efficientnet-lite0" in everything:
        entries = everything["efficientnet-lite0"]
        latest = _reference_commit(entries)
        rows = [[e["weights"], _label(e, latest), _cell(e["none"]), _cell(e["shift"]), *_cost(e)] for e in entries]
        tables.append("### EfficientNet-Lite0: top-1 agreement % / top-5 agreement % / KL against FP32\n\n"
                      + markdown_table(["weights", "method", "no renorm", "shift", "reconstruct s", "peak RSS MiB"],
                                       rows))
    for name in ("fmnist-mobilenet_v2", "fmnist-resnet18"):
        if name in everything:
            entries = everything[name]
            latest = _reference_commit(entries)
            rows = [[e["weights"], _label(e, latest), f"{e['none']:.2f}", f"{e['exact']:.2f}" if "exact" in e else "",
                     *(_cost(e) if "seconds" in e else ["", ""])] for e in entries]
            tables.append(f"### {name}: top-1 % on {entries[0]['test']}\n\n"
                          + markdown_table(["weights", "method", "no renorm", "exact", "reconstruct s",
                                            "peak RSS MiB"], rows))
    if "resnet18-224" in everything:
        rows = [[e["weights"], e["method"], str(e["images"]), *_cost(e)] for e in everything["resnet18-224"]]
        tables.append("### torchvision resnet18 at 224 px (random weights): cost only\n\n"
                      + markdown_table(["weights", "method", "images", "reconstruct s", "peak RSS MiB"], rows))
    if "tune" in everything:
        rows = [[e["solver"], f"{e['objective_left']:.3f}", f"{e['seconds']:.1f}"] for e in everything["tune"]]
        tune = everything["tune"][0]
        tables.append(f"### Solver settings on Lite0's W4 uniform layers ({tune['layers']} layers; measured at "
                      f"{tune.get('commit', EARLIER_COMMIT) + ', damping ' + str(tune.get('damping', 0.01))})"
                      "\n\n" + markdown_table(["solver", "objective left (nearest = 1)", "seconds"], rows))
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one setting per model, 200 crops / 2000 test images")
    parser.add_argument("--models", nargs="*", default=["efficientnet-lite0", "fmnist-mobilenet_v2", "fmnist-resnet18",
                                                        "resnet18-224", "tune"])
    parser.add_argument("--images", type=int, help="images the reconstruction uses (default 256; --quick 64)")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS),
                        help="measure only these methods; the model's other rows stay as reconstruct.json has them, "
                             "marked with the commit they were measured at")
    args = parser.parse_args()
    args.images = args.images or (64 if args.quick else 256)
    cache = {}
    for name in args.models:  # each model's rows are written as soon as they are measured
        if name == "efficientnet-lite0":
            rows = lite0_rows(args)
        elif name == "resnet18-224":
            rows = resnet18_rows(args)
        elif name == "tune":
            rows = tune_rows(args)
        else:
            rows = fmnist_rows(name, args, cache)
        write(args, {name: _keep_unmeasured(name, rows, args)})
    if not args.models:  # re-render the tables from the JSON
        write(args, {})


def write(args, rows: dict[str, list[dict]]) -> None:
    suffix = "_quick" if args.quick else ""
    data = merged("reconstruct" + suffix, rows)
    body = ("`rtn`: round to nearest (renorm's quantizer, no reconstruction). `gptq`, `adaround`: "
            "renorm.reconstruct with that method on the first `images` calibration images (256: layer by layer in "
            "execution order, inputs from the partly quantized network, BatchNorm offsets absorbed, damping 0.1); "
            "`gptq, damping 0.01`: GPTQ's usual damping (renorm's default before 6d216d7; the rows marked \"at "
            "ee00610\" ran with it); `gptq, damping auto`: damping chosen per layer by cross-validation over two folds "
            "of the images (fitted on one, scored on the other; at 73bd706); `gptq, FP32 "
            "inputs`: the same with every layer's inputs from the FP32 network; `gptq, 500 images`: the default on 500 "
            "calibration images (`--reconstruct-images 500`); `gptq + descent`: the default, then three sweeps of "
            "coordinate descent over the weights (each weight moved one level down or up where that lowers the layer's "
            "objective, then the row scales refitted; `ReconstructConfig(sweeps=3)`, not the default); `..., 1000 images`: on "
            "every calibration image, the 1000 that AIMET's AdaRound uses in benchmarks.peers_reconstruct; `gptq, 64 refined`: "
            "the default on its 256 images and 64 more (the next 64 calibration images) moved by 30 Adam passes until "
            "the FP32 model's BatchNorm layers see their running statistics (`--reconstruct-refined 64`; the time "
            "includes that). Then re-normalization (`no renorm`: "
            "the statistics reconstruction left) and, for A8 rows, 8-bit activations. Times on a shared 2-core "
            "machine.\n\n" + render(data))
    command = "python -m benchmarks.reconstruct" + (" --quick" if args.quick else "")
    write_result("reconstruct" + suffix, "Reconstruction", command + " (or one model at a time: --models NAME)", body,
                 data)


if __name__ == "__main__":
    main()
