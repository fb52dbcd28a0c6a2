"""The peer baseline of renorm's reconstruction: AIMET AdaRound (and AIMET BatchNorm re-estimation).

AIMET is not a dependency of renorm; it lives in its own environment, outside the repository:

    python3.11 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 aimet-torch==2.42.0 -e '/work/main[zoo,photos,prune]'
    cd /work/main && /work/peers-venv/bin/python -m benchmarks.peers_reconstruct [--quick] [--models ...]

The same models, images and bit widths as renorm's reconstruction benchmark:
  efficientnet-lite0 (ImageNet weights): AdaRound on the first 500 crops of photos:calib,
      agreement with the FP32 model's own predictions on 500 crops of photos:eval
      (top-1 / top-5 agreement %, KL(FP32 || model)); W4 and W3, weights only.
  fmnist-resnet18, fmnist-mobilenet_v2: 1000 unlabeled Fashion-MNIST train images,
      top-1 % on the full 10k labeled test set; W4A8, W3 and W2 (weights only).
First conv and last linear layer at 8 bits everywhere.

Each row is AIMET's own pipeline (aimet-torch 2.42 API, read from its source:
aimet_torch/adaround/adaround_weight.py and aimet_torch/_base/adaround/adaround_weight.py):
  1. `prepare_model` (AIMET's model preparer: functional adds and reused ReLUs become
     modules). EfficientNet-Lite0's TF-"same"-padding convs are first rewritten as
     ZeroPad2d + nn.Conv2d (identical outputs, checked) because AIMET neither wraps the
     custom module nor pads its cached inputs in AdaRound.
  2. `Adaround.apply_adaround(model, dummy, AdaroundParameters(loader, num_batches,
     default_num_iterations), ..., default_param_bw=bits, param_bw_override_list=[(first conv, 8),
     (last linear, 8)], default_quant_scheme=post_training_tf_enhanced)`: AIMET's default
     config (per-channel symmetric weights), the calibration images in batches of 50, all
     batches, seeded.
  3. `QuantizationSimModel` on the AdaRounded weights, `set_and_freeze_param_encodings`,
     first/last weights 8-bit; activation quantizers removed for the weight-only rows, 8-bit
     activations (tf_enhanced, encodings from all calibration images) for the A8 rows.
  4. with and without `reestimate_bn_stats` on the same images (batches of 50); in the A8 rows
     the activation encodings are recomputed after it.
The round-to-nearest row is the same QuantSim without step 2 (the weight encodings AdaRound
starts from). Seconds: AdaRound itself, the whole pipeline (1-3), and the BN re-estimation.

AdaRound's cost: AIMET's default is 15000 iterations per layer below 8 bits (10000 at 8;
aimet_torch/_base/adaround/adaround_weight.py), each one a batch of 32 cached layer inputs.
Measured at one thread on this shared machine, 100 iterations: fmnist-resnet18 (1000 images)
1.22 s per iteration over all 21 layers plus 2 minutes of activation sampling, so the default
would take about 5 hours per setting; EfficientNet-Lite0 (500 crops, 224 px) 2.9 s per
iteration for its first 4 layers alone. So the rows ran fewer iterations, as the table's
"iterations" column says: 500 per layer for the Fashion-MNIST models (--iterations) and 100
for EfficientNet-Lite0 (--effnet-iterations); AIMET's beta annealing and warm start scale with
the count. --default-row adds one row per fmnist setting at AIMET's default (not in the
published table: hours per row here). EfficientNet-Lite0 AdaRound did not finish even at 100:
with the machine's load average at 7-12, the W4 run had optimized 8 of the 50 layers after
42 minutes (the 112x112 and 56x56 layers took 2.5-9 minutes each: AIMET samples the layer's
input/output over all 500 crops with two forward passes per layer, then copies 32 cached
samples per iteration) and was stopped; the table names the rows it lacks. The W3
round-to-nearest row then ran on its own (--settings W3 --methods nearest).
Timings: 1 thread (torch.set_num_threads(1), OMP_NUM_THREADS=1) on a 2-core machine shared
with other jobs (the three models ran as three concurrent processes), wall clock.
--render-only rewrites the Markdown table from the JSON without running anything.
"""
from __future__ import annotations

import os

os.environ.setdefault("RENORM_BENCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import RESULTS, THREADS, agree, command_line, fashion_mnist, markdown_table, merged, top1, write_result  # noqa: E402
from renorm.data import Batches, open_images  # noqa: E402
from renorm.evaluate import predict  # noqa: E402
from renorm.models import load_model  # noqa: E402

torch.set_num_threads(THREADS)

MODELS = ("efficientnet-lite0", "fmnist-resnet18", "fmnist-mobilenet_v2")
# (label, weight bits, activation bits or None for float activations)
SETTINGS = {
    "efficientnet-lite0": (("W4", 4, None), ("W3", 3, None)),
    "fmnist-resnet18": (("W4A8", 4, 8), ("W3", 3, None), ("W2", 2, None)),
    "fmnist-mobilenet_v2": (("W4A8", 4, 8), ("W3", 3, None), ("W2", 2, None)),
}
BATCH = 50
SEED = 0


# --------------------------------------------------------------------------- data
def effnet_data(count: int):
    loaded = load_model("efficientnet-lite0")
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), BATCH).first(count)
    test = Batches(open_images(f"photos:eval:{count}", loaded.preset), BATCH).first(count)
    return loaded.model.eval(), calib, test, {"calib": f"photos:calib ({count} crops)",
                                              "test": f"photos:eval ({count} crops)"}


def loader(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i:i + BATCH], torch.zeros(len(images[i:i + BATCH]), dtype=torch.long))
            for i in range(0, len(images), BATCH)]


def forward_fn(model, batch):
    return model(batch[0])


# --------------------------------------------------------------------------- model preparation
def plain_convs(model: nn.Module) -> nn.Module:
    """Rewrite EfficientNet-Lite's Conv2dStaticSamePadding as ZeroPad2d + nn.Conv2d (same outputs)."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind == "Conv2dStaticSamePadding":
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None)
                conv.load_state_dict(child.state_dict(), strict=False)
                pad = child.static_padding
                setattr(parent, name, nn.Sequential(pad, conv) if isinstance(pad, nn.ZeroPad2d) else conv)
            elif kind == "Identity" and not isinstance(child, nn.Identity):
                setattr(parent, name, nn.Identity())
    return model


def prepared(fp32: nn.Module, example: torch.Tensor) -> nn.Module:
    from aimet_torch.model_preparer import prepare_model

    model = prepare_model(plain_convs(fp32)).eval()
    with torch.no_grad():
        diff = float((model(example) - fp32(example)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the prepared model differs from FP32 by {diff}")
    return model


def first_and_last(model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """Names of the first conv (in execution order) and the last linear layer."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(names[mod]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    linears = [n for n in order if isinstance(model.get_submodule(n), nn.Linear)]
    return convs[0], linears[-1]



# --------------------------------------------------------------------------- AIMET pipelines
def seed() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


def adaround(model: nn.Module, calib: torch.Tensor, bits: int, iterations: int | None, keep8: tuple[str, str]):
    """AIMET AdaRound of `model` (not modified); returns (AdaRounded float model, encodings file, seconds)."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme

    data = loader(calib)
    params = AdaroundParameters(data, len(data), default_num_iterations=iterations, forward_fn=forward_fn)
    folder = tempfile.mkdtemp(prefix="adaround-")
    seed()
    start = time.perf_counter()
    rounded = Adaround.apply_adaround(model, calib[:1], params, path=folder, filename_prefix="adaround",
                                      default_param_bw=bits,
                                      param_bw_override_list=[(model.get_submodule(n), 8) for n in keep8],
                                      default_quant_scheme=QuantScheme.post_training_tf_enhanced)
    return rounded.eval(), os.path.join(folder, "adaround.encodings"), time.perf_counter() - start


def quantsim(model: nn.Module, calib: torch.Tensor, bits: int, act_bits: int | None, keep8: tuple[str, str],
             encodings: str | None = None):
    """AIMET QuantSim with per-channel symmetric `bits`-bit weights (first/last 8-bit), encodings computed."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.nn import BaseQuantizationMixin
    from aimet_torch.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(model, dummy_input=calib[:1], quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_param_bw=bits, default_output_bw=act_bits or 8, config_file="default")
    for name in keep8:
        sim.model.get_submodule(name).param_quantizers["weight"].bitwidth = 8
    if act_bits is None:
        for module in sim.model.modules():
            if isinstance(module, BaseQuantizationMixin):
                module.input_quantizers = nn.ModuleList([None for _ in module.input_quantizers])
                module.output_quantizers = nn.ModuleList([None for _ in module.output_quantizers])
    if encodings is not None:
        sim.set_and_freeze_param_encodings(encodings)
    compute_encodings(sim, calib, act_bits)
    return sim


def compute_encodings(sim, calib: torch.Tensor, act_bits: int | None) -> None:
    images = calib if act_bits else calib[:BATCH]  # weights only: one batch runs the weight quantizers

    def run(model, _):
        with torch.no_grad():
            for x, _ in loader(images):
                model(x)

    sim.compute_encodings(run, None)


def reestimate(sim, calib: torch.Tensor, act_bits: int | None) -> float:
    from aimet_torch.bn_reestimation import reestimate_bn_stats

    start = time.perf_counter()
    data = loader(calib)
    reestimate_bn_stats(sim.model, data, num_batches=len(data), forward_fn=forward_fn)
    if act_bits:
        compute_encodings(sim, calib, act_bits)
    return time.perf_counter() - start


def check_weights(sim, bits: int, keep8: tuple[str, str]) -> None:
    """Every conv/linear weight quantizer: per-channel, symmetric, the intended bit width."""
    from aimet_torch.nn import BaseQuantizationMixin

    for name, module in sim.model.named_modules():
        if isinstance(module, BaseQuantizationMixin) and isinstance(module, (nn.Conv2d, nn.Linear)):
            q = module.param_quantizers["weight"]
            want = 8 if name in keep8 else bits
            if q is None or q.bitwidth != want or not q.symmetric or q.shape[0] != module.weight.shape[0]:
                raise RuntimeError(f"{name}: weight quantizer {q} is not per-channel symmetric {want}-bit")


# --------------------------------------------------------------------------- benchmark
def run_model(name: str, args, publish) -> dict:
    """Run every row of one model; publish(result) after each (a cut-short run keeps its finished rows)."""
    started = time.perf_counter()
    if name == "efficientnet-lite0":
        fp32, calib, test, names = effnet_data(100 if args.quick else 500)
        reference, _ = predict(fp32, test, BATCH)

        def metric(model):
            return agree(model, test, reference)
        iterations = args.effnet_iterations
    else:
        calib, test_x, test_y, names = fashion_mnist(100 if args.quick else 1000, 2000 if args.quick else None)
        fp32 = load_model(name).model.eval()

        def metric(model):
            return {"top1": top1(model, test_x, test_y)}
        iterations = args.iterations
    base = prepared(fp32, calib[:4])
    keep8 = first_and_last(base, calib[:1])
    settings = SETTINGS[name][:1] if args.quick else SETTINGS[name]
    settings = [s for s in settings if not args.settings or s[0] in args.settings]
    choices = (((0,) if "nearest" in args.methods else ())
               + ((iterations,) if "adaround" in args.methods else ())
               + ((None,) if args.default_row and name != "efficientnet-lite0" and not args.quick else ()))
    runs = [(label, bits, act, it) for label, bits, act in settings for it in choices]
    result = {"model": name, "names": names, "calib_images": len(calib), "fp32": metric(fp32), "first_last_8bit": list(keep8),
              "rows": [], "complete": False, "seconds_model": 0.0}
    print(name, "FP32", result["fp32"], flush=True)
    for label, bits, act, it in runs:
        start = time.perf_counter()
        seconds_adaround = None
        if it == 0:
            sim = quantsim(base, calib, bits, act, keep8)
        else:
            rounded, encodings, seconds_adaround = adaround(base, calib, bits, it, keep8)
            sim = quantsim(rounded, calib, bits, act, keep8, encodings)
        pipeline = time.perf_counter() - start
        check_weights(sim, bits, keep8)
        plain = metric(sim.model.eval())
        seconds_bn = reestimate(sim, calib, act)
        renormed = metric(sim.model.eval())
        row = {"setting": label, "weight_bits": bits, "activation_bits": act,
               "method": "round to nearest" if it == 0 else "AdaRound",
               "iterations": it if it != 0 else None, "default_iterations": it is None,
               "no_bn_reestimation": plain, "reestimate_bn_stats": renormed,
               "seconds_adaround": None if seconds_adaround is None else round(seconds_adaround, 1),
               "seconds_pipeline": round(pipeline, 1), "seconds_reestimate": round(seconds_bn, 1)}
        result["rows"].append(row)
        result["seconds_model"] = round(time.perf_counter() - started, 1)
        print(name, row, flush=True)
        del sim
        publish(name, result)
    result["complete"] = True
    publish(name, result)
    return result


def with_previous_rows(result: dict, before: dict | None, args) -> dict:
    """A run of some settings/methods of a model: keep the previous run's other rows of that model."""
    if not before:
        return result
    ran = {(r["setting"], r["method"]) for r in result["rows"]}
    kept = [r for r in before.get("rows", []) if (r["setting"], r["method"]) not in ran]
    order = [label for label, _, _ in SETTINGS[result["model"]]]
    rows = sorted(kept + result["rows"], key=lambda r: (order.index(r["setting"]), r["method"] != "round to nearest",
                                                          r["iterations"] or 0))
    seconds = result["seconds_model"] + (before.get("seconds_model", 0.0) if kept else 0.0)
    return {**result, "rows": rows, "seconds_model": round(seconds, 1),
            "complete": result["complete"] and before.get("complete", True)}


def cell(metric: dict) -> str:
    if "top1" in metric:
        return f"{metric['top1']:.2f}"
    return f"{metric['agreement_top1']:.1f} / {metric['agreement_top5']:.1f} / {metric['kl']:.3f}"


def table(data: dict) -> str:
    rows = []
    for name in MODELS:
        if name not in data:
            continue
        entry = data[name]
        rows.append([name, "FP32", "", "", cell(entry["fp32"]), "", "", "", ""])
        for row in entry["rows"]:
            iterations = "" if row["method"] != "AdaRound" else (
                "15000 (AIMET default)" if row["default_iterations"] else str(row["iterations"]))
            rows.append([name, row["setting"], row["method"], iterations, cell(row["no_bn_reestimation"]),
                         cell(row["reestimate_bn_stats"]),
                         "" if row["seconds_adaround"] is None else f"{row['seconds_adaround']:.0f}",
                         f"{row['seconds_pipeline']:.0f}", f"{row['seconds_reestimate']:.0f}"])
    return markdown_table(["model", "weights", "AIMET", "iterations", "no BN re-estimation",
                           "+ reestimate_bn_stats", "AdaRound s", "pipeline s", "re-estimation s"], rows)


TITLE = "Peer baseline for reconstruction: AIMET AdaRound"


def missing(data: dict) -> list[str]:
    """A line naming the rows of the plan that the table lacks (a run cut short or not made)."""
    absent = [f"{name} {label} {method}" for name, entry in data.items() if "rows" in entry
              for label, _, _ in SETTINGS[name] for method in ("round to nearest", "AdaRound")
              if not any(r["setting"] == label and r["method"] == method for r in entry["rows"])]
    return ["", "Not run (no numbers): " + ", ".join(absent) + "."] if absent else []


def render(data: dict, version: str) -> str:
    return "\n".join([
        f"AIMET (aimet-torch {version}) AdaRound and `reestimate_bn_stats`, torch {torch.__version__}, "
        f"{THREADS} thread(s) on a 2-core machine shared with other jobs (timings are wall clock). "
        "Per-channel symmetric weights (AIMET's default config, tf_enhanced encodings), first conv and last "
        "linear 8-bit; AIMET `prepare_model` first. Weight-only rows keep activations in float; A8 rows "
        "quantize activations to 8 bits (encodings from the calibration images). AdaRound uses all "
        "calibration images (batches of 50; AIMET samples 32 cached layer inputs per iteration); AIMET's "
        "default is 15000 iterations per layer below 8 bits, the iterations column says what ran. "
        "efficientnet-lite0: each cell top-1 agreement % / top-5 agreement % / KL(FP32 || model) with the "
        "FP32 model's predictions on photos:eval crops (calibration: photos:calib crops, no photo in common). "
        "fmnist models: top-1 % on the labeled test set, calibration on unlabeled train images. "
        "Seconds: AdaRound alone; the pipeline (AdaRound + QuantSim + encodings); re-estimation (plus "
        "re-computed activation encodings in A8 rows).",
        "",
        "Data: " + "; ".join(f"{n}: calibration {d['names']['calib']} ({d['calib_images']} images), "
                             f"evaluation {d['names']['test']}, "
                             + (f"whole model {d['seconds_model'] / 60:.1f} min" if d.get("complete", True) else
                                f"INCOMPLETE, {len(d['rows'])} rows in {d['seconds_model'] / 60:.1f} min")
                             for n, d in data.items() if "names" in d),
        "",
        table(data),
        *missing(data)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="100 calibration images (and 100 eval crops / 2000 test images), first setting only, "
                             "50 AdaRound iterations (efficientnet-lite0: 10)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--iterations", type=int, default=500, help="AdaRound iterations per layer, fmnist models")
    parser.add_argument("--effnet-iterations", type=int, default=100,
                        help="AdaRound iterations per layer, efficientnet-lite0")
    parser.add_argument("--settings", nargs="+", help="only these settings (W4A8, W4, W3, W2); the table keeps "
                        "the other rows of a model from the previous run")
    parser.add_argument("--methods", nargs="+", choices=("nearest", "adaround"), default=["nearest", "adaround"],
                        help="AIMET round-to-nearest rows, AdaRound rows, or both")
    parser.add_argument("--default-row", action="store_true",
                        help="also one AdaRound row per fmnist setting at AIMET's default (15000 iterations per layer)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite the table from docs/results/peers_reconstruct.json")
    args = parser.parse_args()
    if args.render_only:
        import aimet_torch

        data = json.loads((RESULTS / "peers_reconstruct.json").read_text())
        write_result("peers_reconstruct", TITLE, "python -m benchmarks.peers_reconstruct",
                     render(data, getattr(aimet_torch, "__version__", "?")), data)
        return
    if args.quick:
        args.iterations, args.effnet_iterations = 50, 10
    import aimet_torch

    output = "peers_reconstruct" + ("_quick" if args.quick else "")
    data: dict = {}

    previous = {} if args.quick or not (RESULTS / f"{output}.json").exists() else \
        json.loads((RESULTS / f"{output}.json").read_text())

    def publish(name: str, result: dict) -> None:
        nonlocal data
        result = with_previous_rows(result, previous.get(name), args) if args.settings or len(args.methods) < 2 \
            else result
        data[name] = result
        data = merged(output, {name: result}) if not args.quick else data
        write_result(output, TITLE, command_line(), render(data, getattr(aimet_torch, "__version__", "?")), data)

    for name in args.models:
        run_model(name, args, publish)


if __name__ == "__main__":
    main()
