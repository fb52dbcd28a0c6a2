"""Speed and memory: re-normalization vs one inference pass, the whole pipeline, peak RSS.

    python -m benchmarks.speed [--quick]

Re-normalization vs inference: 500 images (--timing-images); the whole pipeline: 1000.
Timing rows use random weights (resnet18/50) or the real EfficientNet-Lite0 weights,
and synthetic images (N(0,1), 224x224): speed does not depend on either. Inference and
exact re-normalization: best of three interleaved runs (--repeats); shift and update_bn:
one run; the time inside renorm's statistics hooks is also clocked within each exact
pass (a share that the machine's load does not move). `--parts` reruns some sections.
2 threads, batch 64
(renorm's re-normalization chunk, so that every method makes the same forward calls:
on a CPU the batch size alone moves the time of a pass by up to 30%).
Memory rows run `renorm compress` in a subprocess on crops of natural photos
(photos:calib) with 1000 and 4000 calibration images. Full run: about 25 minutes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch.optim.swa_utils import update_bn

from benchmarks.common import RESULTS, THREADS, command_line, copy_of, markdown_table, timed, write_result
from renorm.api import Config, compress
from renorm.models import LoadedModel, load_model
from renorm.renormalize import renormalize

BATCH = 64  # = renormalize's default chunk
PARTS = ("renormalize", "pipeline", "memory")


def models(quick: bool):
    names = ["resnet18"] if quick else ["resnet18", "resnet50"]
    for name in names:
        torch.manual_seed(0)
        yield f"torchvision {name} (random weights)", torchvision.models.get_model(name).eval()
    yield "EfficientNet-Lite0", load_model("efficientnet-lite0").model


@torch.no_grad()
def inference(model, images: torch.Tensor, batch_size: int = BATCH) -> None:
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])


@contextmanager
def statistics_clock():
    """Seconds spent inside renorm's BatchNorm hooks (moments and setting statistics).

    Measured within the pass, so unlike a difference of two passes it does not move with
    the machine's load; a benchmark-only wrapper around two module functions.
    """
    module = importlib.import_module("renorm.renormalize")
    spent = [0.0]
    originals = {name: getattr(module, name) for name in ("_batch_moments", "_set_statistics")}

    def clocked(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    for name, fn in originals.items():
        setattr(module, name, clocked(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def renorm_timings(num_images: int, quick: bool, repeats: int) -> list[dict]:
    images = torch.randn(num_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    loader = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]
    rows = []
    for name, model in models(quick):
        reference = copy_of(model)
        times: dict[str, list[float]] = {"inference": [], "exact": [], "shift": [], "update_bn": []}
        shares = []
        for _ in range(repeats):
            times["inference"].append(timed(inference, model, images)[1])
            with statistics_clock() as spent:
                times["exact"].append(timed(renormalize, model, images, "exact", batch_size=BATCH)[1])
            shares.append(spent[0] / times["exact"][-1])
        times["shift"].append(timed(renormalize, model, images, "shift", reference=reference, batch_size=BATCH)[1])
        copy = copy_of(model)
        times["update_bn"].append(timed(update_bn, loader, copy)[1])
        best = {k: min(v) for k, v in times.items()}
        rows.append({"model": name, "images": num_images, **{f"{k}_s": round(v, 2) for k, v in best.items()},
                     "exact_ratio": round(best["exact"] / best["inference"], 3),
                     "statistics_share": round(min(shares), 3),
                     "shift_ratio": round(best["shift"] / best["inference"], 3),
                     "update_bn_ratio": round(best["update_bn"] / best["inference"], 3)})
        print(rows[-1], flush=True)
    return rows


def pipeline_timings(num_images: int, quick: bool) -> list[dict]:
    """The whole W4A8 pipeline (pow2 weights, exact re-normalization, 8-bit activations)."""
    images = torch.randn(num_images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows = []
    for name in (["resnet18"] if quick else ["resnet18", "resnet50"]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        loaded = LoadedModel(model, f"torchvision:{name}", None)
        result, seconds = timed(compress, loaded, images, Config(wbits=4, abits=8, num_images=num_images))
        stages = result.report["stages"]
        rows.append({"model": f"torchvision {name} (random weights)", "images": num_images, "total_s": round(seconds, 1),
                     **{f"{k}_s": v["seconds"] for k, v in stages.items()}})
        print(rows[-1], flush=True)
    return rows


def memory_rows(counts: list[int]) -> list[dict]:
    """Peak RSS of `renorm compress` (a fresh process each) for several calibration-set sizes."""
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "r.json"
            command = [sys.executable, "-c", _CHILD, "compress", "torchvision:resnet18", "--calib", "photos:calib",
                       "--num-images", str(count), "--wbits", "4", "--abits", "8", "--quiet", "--report", str(report)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr)
            usage = json.loads(done.stdout.strip().splitlines()[-1])
            stages = json.loads(report.read_text())["stages"]
        rows.append({"images": count, "peak_rss_mb": round(usage["maxrss_mb"], 0),
                     "renormalize_s": stages["renormalize"]["seconds"],
                     "renormalize_peak_rss_mb": stages["renormalize"]["peak_rss_mb"]})
        print(rows[-1], flush=True)
    return rows


# The child runs the CLI, then prints its own peak RSS as JSON on the last line.
_CHILD = (f"import json, resource, sys, torch; torch.set_num_threads({THREADS}); from renorm.cli import main; "
          "code = main(sys.argv[1:]); "
          "print(json.dumps({'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})); "
          "sys.exit(code)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 images, resnet18 and Lite0 only")
    parser.add_argument("--timing-images", type=int, default=500,
                        help="images for the re-normalization vs inference rows (default 500; the ratio is what counts)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of inference and exact (the best counts)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measure these only; the others keep their last results (docs/results/speed.json)")
    args = parser.parse_args()
    n = 100 if args.quick else args.timing_images
    name = "speed" + ("_quick" if args.quick else "")
    previous = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() else {}
    renorm_rows = renorm_timings(n, args.quick, args.repeats) if "renormalize" in args.parts else previous["renormalize"]
    pipe_rows = pipeline_timings(100 if args.quick else 1000, args.quick) if "pipeline" in args.parts else previous["pipeline"]
    mem_rows = memory_rows([100, 400] if args.quick else [1000, 4000]) if "memory" in args.parts else previous["memory"]
    n = renorm_rows[0]["images"]
    body = ["### Re-normalization vs one inference pass", "",
            f"{n} synthetic 224x224 images, batch {BATCH} for every method (renorm's chunk), {THREADS} threads; "
            "inference and `exact`: the best of interleaved runs, the others one run. `exact`: renorm's default (one "
            "progressive pass); `shift` also runs the FP32 model; `update_bn`: `torch.optim.swa_utils.update_bn` "
            "(per-batch train-mode statistics). *Statistics share*: the part of the `exact` pass spent in renorm's "
            "BatchNorm hooks, clocked inside the pass (unlike the ratios, it does not move with the machine's load).", "",
            markdown_table(["model", "inference s", "exact s", "exact / inference", "statistics share", "shift s",
                            "shift / inference", "update_bn s", "update_bn / inference"],
                           [[r["model"], r["inference_s"], r["exact_s"], f"{r['exact_ratio']:.2f}x",
                             f"{100 * r['statistics_share']:.1f}%" if "statistics_share" in r else "", r["shift_s"],
                             f"{r['shift_ratio']:.2f}x", r["update_bn_s"], f"{r['update_bn_ratio']:.2f}x"]
                            for r in renorm_rows]),
            "", "### Whole pipeline (W4A8: pow2 weights, exact re-normalization, 8-bit activations)", "",
            markdown_table(["model", "images", "total s", "quantize s", "renormalize s", "calibrate activations s"],
                           [[r["model"], r["images"], r["total_s"], r.get("quantize_s", ""), r.get("renormalize_s", ""),
                             r.get("calibrate_activations_s", "")] for r in pipe_rows]),
            "", "### Peak memory of `renorm compress` vs calibration-set size", "",
            "`renorm compress torchvision:resnet18 --calib photos:calib --num-images N --wbits 4 --abits 8`, "
            "a fresh process each; peak RSS of the whole process and of the re-normalization stage.", "",
            markdown_table(["calibration images", "peak RSS MiB", "renormalize s", "renormalize peak RSS MiB"],
                           [[r["images"], r["peak_rss_mb"], r["renormalize_s"], r["renormalize_peak_rss_mb"]]
                            for r in mem_rows])]
    write_result(name, "Speed and memory", command_line(), "\n".join(body),
                 {"renormalize": renorm_rows, "pipeline": pipe_rows, "memory": mem_rows})


if __name__ == "__main__":
    main()
