"""renorm side by side with the tools people use today, in one run.

Peers are not dependencies of renorm; they live in their own environment:

    python3.11 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 nncf==3.4.0 aimet-torch==2.42.0 -e '.[prune]'
    NNCF_EXTENSION_LOAD_TIMEOUT=0 .venv-peers/bin/python -m benchmarks.peers [--quick]

(about 3 minutes to install; NNCF compiles a C++ extension on first use, ~1.5 minutes.)

1. Re-estimation on the *same compressed weights* (renorm's quantizers, renorm's
   magnitude pruning, and Torch-Pruning's MagnitudePruner for filters), the same 1000
   unlabeled images in batches of 50: torch `update_bn`, NNCF `batch_norm_adaptation`,
   AIMET `reestimate_bn_stats`, renorm `exact` and `shift`. Top-1 on the full test set.
   resnet18: W4 pow2, W3 and W2 uniform, 70% unstructured, 30% and 50% filters;
   mobilenet_v2: W4 pow2, 70% unstructured, 30% filters.
2. Whole post-training pipelines: NNCF INT8 (`nncf.quantize`, its default W8A8 with
   bias correction) and AIMET W4A8 (`QuantizationSimModel`, per-channel 4-bit weights,
   8-bit activations, encodings from 400 images, then `reestimate_bn_stats`) next to
   renorm W8A8 and W4A8.
3. Time of each re-estimation vs one inference pass, 200 synthetic 224x224 images,
   torchvision resnet18 with random weights (speed does not depend on the weights).
About 35 minutes (2 threads, measured).
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

from benchmarks.common import command_line, copy_of, fashion_mnist, markdown_table, timed, top1, write_result  # noqa: E402
from renorm.models import load_model  # noqa: E402
from renorm.prune import PruneConfig, magnitude_prune  # noqa: E402
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations  # noqa: E402
from renorm.quantize.weights import WeightQuantConfig, quantize_weights  # noqa: E402
from renorm.renormalize import renormalize  # noqa: E402


def batches(images: torch.Tensor, size: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i:i + size], torch.zeros(len(images[i:i + size]), dtype=torch.long))
            for i in range(0, len(images), size)]


# --------------------------------------------------------------------------- re-estimators
def peer_update_bn(model, images, fp32):
    model = copy_of(model)
    update_bn([x for x, _ in batches(images)], model)
    return model.eval()


def peer_nncf(model, images, fp32):
    import nncf

    model = copy_of(model)
    nncf.batch_norm_adaptation(model, nncf.Dataset(batches(images), lambda item: item[0]), num_iterations=None)
    return model.eval()


def peer_aimet(model, images, fp32):
    from aimet_torch.bn_reestimation import reestimate_bn_stats

    model = copy_of(model)
    loader = batches(images)
    reestimate_bn_stats(model, loader, num_batches=len(loader), forward_fn=lambda m, b: m(b[0]))
    return model.eval()


REESTIMATORS = {
    "none": lambda model, images, fp32: model,
    "torch update_bn": peer_update_bn,
    "NNCF batch_norm_adaptation": peer_nncf,
    "AIMET reestimate_bn_stats": peer_aimet,
    "renorm exact": lambda model, images, fp32: renormalize(model, images, "exact", batch_size=50),
    "renorm shift": lambda model, images, fp32: renormalize(model, images, "shift", reference=fp32, batch_size=50),
}


def torch_pruning_filters(model, fraction: float, example: torch.Tensor):
    import torch_pruning as tp

    model = copy_of(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, example[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=fraction, ignored_layers=[last])
    pruner.step()
    return model.eval()


SHORT_ROWS = ("W2 uniform (renorm)", "70% unstructured (renorm)", "30% filters (Torch-Pruning)")
FEW_ROWS = ("W4 pow2 (renorm)", "70% unstructured (renorm)", "30% filters (Torch-Pruning)")


def compressions(fp32, example, rows=None):
    """(label, compressed model) for each row, or for those named in `rows`."""
    def quantized(bits, scheme):
        model = copy_of(fp32)
        quantize_weights(model, WeightQuantConfig(bits=bits, scheme=scheme), inplace=True)
        return model

    def sparse(fraction):
        model = copy_of(fp32)
        magnitude_prune(model, PruneConfig(fraction))
        return model

    makers = {
        "W4 pow2 (renorm)": lambda: quantized(4, "pow2"),
        "W3 uniform (renorm)": lambda: quantized(3, "uniform"),
        "W2 uniform (renorm)": lambda: quantized(2, "uniform"),
        "70% unstructured (renorm)": lambda: sparse(0.7),
        "30% filters (Torch-Pruning)": lambda: torch_pruning_filters(fp32, 0.3, example),
        "50% filters (Torch-Pruning)": lambda: torch_pruning_filters(fp32, 0.5, example),
    }
    for label, make in makers.items():
        if rows is None or label in rows:
            yield label, make()


def reestimation_table(models, calib, test_x, test_y, rows_of):
    """rows_of(index of the model) -> the compression rows to run for it (None: all)."""
    rows, data = [], []
    for index, name in enumerate(models):
        fp32 = load_model(name).model
        base = top1(fp32, test_x, test_y)
        for label, compressed in compressions(fp32, test_x, rows_of(index)):
            result = {}
            for method, run in REESTIMATORS.items():
                model, seconds = timed(run, compressed, calib, fp32)
                result[method] = top1(model, test_x, test_y)
                data.append({"model": name, "compression": label, "method": method, "top1": result[method],
                             "seconds": round(seconds, 2), "fp32": base})
            rows.append([name, label, *[f"{result[m]:.2f}" for m in REESTIMATORS]])
            print(rows[-1], flush=True)
    header = ["model", "compressed weights", *REESTIMATORS]
    return markdown_table(header, rows), data


# --------------------------------------------------------------------------- pipelines
def nncf_int8(fp32, calib):
    import nncf

    return nncf.quantize(copy_of(fp32), nncf.Dataset(batches(calib), lambda item: item[0]),
                         subset_size=len(batches(calib)))


def aimet_w4a8(fp32, calib, reestimate: bool):
    from aimet_torch.bn_reestimation import reestimate_bn_stats
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(copy_of(fp32), dummy_input=calib[:1], quant_scheme=QuantScheme.post_training_tf,
                               default_param_bw=4, default_output_bw=8)

    def forward(model, _):
        with torch.no_grad():
            for x, _ in batches(calib[:400]):
                model(x)

    sim.compute_encodings(forward, None)
    if reestimate:
        loader = batches(calib)
        reestimate_bn_stats(sim.model, loader, num_batches=len(loader), forward_fn=lambda m, b: m(b[0]))
    return sim.model.eval()


def renorm_pipeline(fp32, calib, bits, scheme, mode):
    model = copy_of(fp32)
    quantize_weights(model, WeightQuantConfig(bits=bits, scheme=scheme), inplace=True)
    model = renormalize(model, calib, mode, reference=fp32, batch_size=50)
    calibrate_activations(model, calib, ActivationQuantConfig(bits=8, num_images=400), batch_size=50, inplace=True)
    return model


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pipeline_table(models, calib, test_x, test_y, skip=frozenset(), stored=None):
    """stored: earlier rows (peers.json's "pipelines") shown, marked, for the peers not installed here."""
    rows, data = [], []
    missing = {label for label, module in (("NNCF", "nncf"), ("AIMET", "aimet_torch")) if not installed(module)}
    for name in models:
        fp32 = load_model(name).model
        runs = {
            "NNCF INT8 (nncf.quantize, W8A8)": lambda: nncf_int8(fp32, calib),
            "renorm W8A8 (uniform, exact)": lambda: renorm_pipeline(fp32, calib, 8, "uniform", "exact"),
            "renorm W8A8 (uniform, shift)": lambda: renorm_pipeline(fp32, calib, 8, "uniform", "shift"),
            "AIMET W4A8 (QuantSim)": lambda: aimet_w4a8(fp32, calib, reestimate=False),
            "AIMET W4A8 + reestimate_bn_stats": lambda: aimet_w4a8(fp32, calib, reestimate=True),
            "renorm W4A8 (uniform, exact)": lambda: renorm_pipeline(fp32, calib, 4, "uniform", "exact"),
            "renorm W4A8 (pow2, exact)": lambda: renorm_pipeline(fp32, calib, 4, "pow2", "exact"),
            "renorm W4A8 (pow2, shift)": lambda: renorm_pipeline(fp32, calib, 4, "pow2", "shift"),
        }
        base = top1(fp32, test_x, test_y)
        rows.append([name, "FP32", f"{base:.2f}", ""])
        for label, make in runs.items():
            if label in skip:
                continue
            if label.split()[0] in missing:
                old = next((r for r in (stored or {}).get("pipelines", []) if r["model"] == name
                            and r["pipeline"] == label), None)
                if old is not None:
                    data.append({**old, "stored": stored["commit"]})
                    rows.append([name, label + f" (stored: commit {stored['commit']})", f"{old['top1']:.2f}",
                                 f"{old['seconds']:.1f}"])
                continue
            model, seconds = timed(make)
            accuracy = top1(model, test_x, test_y)
            data.append({"model": name, "pipeline": label, "top1": accuracy, "seconds": round(seconds, 1)})
            rows.append([name, label, f"{accuracy:.2f}", f"{seconds:.1f}"])
            print(rows[-1], flush=True)
    return markdown_table(["model", "pipeline", "top-1 %", "seconds"], rows), data


# --------------------------------------------------------------------------- speed
@torch.no_grad()
def inference(model, images):
    for x, _ in batches(images):
        model(x)


def speed_table(num_images: int):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    images = torch.randn(num_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fp32 = copy.deepcopy(model)
    timings = {"inference pass": min(timed(inference, model, images)[1] for _ in range(2))}
    for method, run in REESTIMATORS.items():
        if method != "none":
            timings[method] = min(timed(run, model, images, fp32)[1] for _ in range(2))
    rows = [[method, f"{seconds:.1f}", f"{seconds / timings['inference pass']:.2f}x"] for method, seconds in timings.items()]
    return markdown_table(["method", "seconds", "vs inference"], rows), timings


def short_run() -> None:
    """The rows that fit in a quarter of an hour on 2 cores, written as they complete."""
    import aimet_torch
    import nncf

    calib, test_x, test_y, names = fashion_mnist(1000)
    header = (f"Peers: NNCF {nncf.__version__}, AIMET (aimet-torch) {getattr(aimet_torch, '__version__', '?')}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s). Top-1 % on {names['test']} "
              f"({len(test_y)} images); {len(calib)} unlabeled images from {names['calib']}, batches of 50, for every "
              "method. A shortened run (`--short`): fmnist-resnet18 only.")
    reestimation, data1 = reestimation_table(("fmnist-resnet18",), calib, test_x, test_y, lambda index: SHORT_ROWS)
    body = [header, "", "### Re-estimating BatchNorm on the same compressed weights", "", reestimation]
    write_result("peers", "renorm vs NNCF, AIMET, torch and Torch-Pruning", command_line(), "\n".join(body),
                 {"reestimation": data1})
    skip = {"NNCF INT8 (nncf.quantize, W8A8)", "renorm W8A8 (uniform, exact)", "renorm W4A8 (pow2, shift)"}
    pipelines, data2 = pipeline_table(("fmnist-resnet18",), calib, test_x, test_y, skip)
    body += ["", "### Whole post-training pipelines", "", pipelines]
    write_result("peers", "renorm vs NNCF, AIMET, torch and Torch-Pruning", command_line(), "\n".join(body),
                 {"reestimation": data1, "pipelines": data2})


def pipelines_run() -> None:
    """The whole-pipeline table alone (about 5 minutes on 2 threads)."""
    import json

    from benchmarks.common import RESULTS

    stored = json.loads((RESULTS / "peers.json").read_text()) if (RESULTS / "peers.json").exists() else {}
    stored["commit"] = stored.get("commit", "6fffead")  # the commit peers.md's last full run names
    calib, test_x, test_y, names = fashion_mnist(1000)
    versions = ", ".join(f"{label} {__import__(module).__version__}" for label, module in
                         (("NNCF", "nncf"), ("AIMET", "aimet_torch")) if installed(module))
    pipelines, data = pipeline_table(("fmnist-resnet18", "fmnist-mobilenet_v2"), calib, test_x, test_y, stored=stored)
    body = (f"Peers run here: {versions or 'none'}; torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
            f"Top-1 % on {names['test']} ({len(test_y)} images); {len(calib)} unlabeled images from {names['calib']}, "
            "batches of 50. Rows marked stored are copied from peers.json (that peer is not installed in this "
            "environment), with the commit of the run that measured them.\n\n" + pipelines)
    write_result("peers_pipelines", "Whole post-training pipelines: renorm vs NNCF and AIMET", command_line(), body,
                 {"pipelines": data})


def w8a8_timing() -> None:
    """nncf.quantize against renorm's W8A8 pipeline (uniform, exact), each timed twice in turn in one process
    (the first NNCF call loads its extension: the second pair is the one to read); then renorm's top-1."""
    calib, test_x, test_y, _ = fashion_mnist(1000)
    for name in ("fmnist-resnet18", "fmnist-mobilenet_v2"):
        fp32 = load_model(name).model
        for _ in range(2):
            _, nncf_seconds = timed(nncf_int8, fp32, calib)
            model, renorm_seconds = timed(renorm_pipeline, fp32, calib, 8, "uniform", "exact")
            print(f"{name}: nncf.quantize {nncf_seconds:.1f} s, renorm W8A8 {renorm_seconds:.1f} s, "
                  f"{renorm_seconds / nncf_seconds:.2f}x", flush=True)
        print(f"{name}: renorm W8A8 top-1 {top1(model, test_x, test_y):.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet18, 2000 test images, fewer rows, 100 timing images")
    parser.add_argument("--pipelines", action="store_true", help="only the whole-pipeline rows, both models, full "
                        "test set, into peers_pipelines.md; a peer not installed keeps its row from peers.json")
    parser.add_argument("--w8a8-timing", action="store_true", help="only nncf.quantize against renorm's W8A8 "
                        "pipeline, timed in turn in one process (needs NNCF)")
    parser.add_argument("--short", action="store_true", help="resnet18 only, full test set: W2 uniform, 70%% "
                        "unstructured, 30%% filters; pipelines without the W8A8 rows; no timing section")
    args = parser.parse_args()
    if args.short:
        return short_run()
    if args.pipelines:
        return pipelines_run()
    if args.w8a8_timing:
        return w8a8_timing()
    models = ("fmnist-resnet18",) if args.quick else ("fmnist-resnet18", "fmnist-mobilenet_v2")
    calib, test_x, test_y, names = fashion_mnist(1000, 2000 if args.quick else None)
    reestimation, data1 = reestimation_table(models, calib, test_x, test_y,
                                             lambda index: FEW_ROWS if args.quick or index > 0 else None)
    pipelines, data2 = pipeline_table(models, calib, test_x, test_y)
    timing_images = 100 if args.quick else 200
    speed, data3 = speed_table(timing_images)
    import aimet_torch
    import nncf

    body = "\n".join([
        f"Peers: NNCF {nncf.__version__}, AIMET (aimet-torch) {getattr(aimet_torch, '__version__', '?')}, "
        f"torch {torch.__version__}. Top-1 % on {names['test']} ({len(test_y)} images); {len(calib)} unlabeled "
        f"images from {names['calib']}, batches of 50, for every method.", "",
        "### Re-estimating BatchNorm on the same compressed weights", "", reestimation, "",
        "### Whole post-training pipelines", "", pipelines, "",
        "### Time of re-estimation vs one inference pass (torchvision resnet18, random weights, "
        f"{timing_images} synthetic 224x224 images, batches of 50; renorm re-chunks them to its 64, "
        f"{torch.get_num_threads()} threads)", "",
        speed])
    write_result("peers" + ("_quick" if args.quick else ""), "renorm vs NNCF, AIMET, torch and Torch-Pruning",
                 command_line(), body, {"reestimation": data1, "pipelines": data2, "speed": data3})


if __name__ == "__main__":
    main()
