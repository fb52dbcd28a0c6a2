"""Deployment: parity of renorm's INT8 ONNX graph with its PyTorch model, and its speed in ONNX Runtime.

    python -m benchmarks.deploy [--parts parity speed] [--quick]

parity: both Fashion-MNIST reference models, W8A8 uniform, W4A8 pow2 and W4A8 uniform
(renorm compress defaults otherwise: 1000 calibration images, 400 for activations, exact
re-normalization, activations quantized at every tensor an INT8 graph quantizes), exported
with `renorm.export_onnx` (renorm's own quantizers become the graph's Q/DQ pairs); top-1 of
the PyTorch model and of the ONNX file run
by onnxruntime on fashion-mnist:test, their top-1 agreement, and what ONNX Runtime's CPU
provider made of the graph (integer kernels, float convs left).

speed: torchvision resnet18, mobilenet_v2, resnet50 (random weights, seeded) and
EfficientNet-Lite0 (its real weights, where `renorm[zoo]` is installed) at 224 px.
ONNX Runtime FP32 (the float model written by `export_onnx` with no quantizer: BatchNorm
folded, float weights), renorm W8A8 uniform exported by `export_onnx`, and ONNX Runtime's own
`quantize_static` (QDQ, per-channel int8 weights, uint8 activations, after its
`quant_pre_process`) as the anchor, all calibrated on the same 32 synthetic images.
Latency: median of timed runs after 3 warm-up runs, batch 1 (30 runs) and 32 (8 runs),
`intra_op_num_threads` = RENORM_BENCH_THREADS (default 2); file sizes in MB (10^6 bytes).
The three sessions of a model are timed interleaved, run by run, so that the load of a
shared machine moves all three alike; the ratios are the numbers to read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from benchmarks.common import RESULTS, THREADS, command_line, fashion_mnist, markdown_table, provenance, write_result
from renorm.api import Config, compress
from renorm.evaluate import accuracy, agreement, predict
from renorm.export.onnx_qdq import export_onnx
from renorm.export.onnx_runtime import OnnxModule, integer_operators, session
from renorm.models import load_model

PARTS = ("parity", "speed")
SETTINGS = {"W8A8 uniform": (8, "uniform"), "W4A8 pow2": (4, "pow2"), "W4A8 uniform": (4, "uniform")}
SPEED_MODELS = ("resnet18", "mobilenet_v2", "resnet50", "efficientnet-lite0")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")


def kernel_summary(path: Path) -> tuple[str, int]:
    operators = integer_operators(path)
    integer = ", ".join(f"{op} {n}" for op, n in operators.items() if op.startswith("Q") and op != "QuantizeLinear")
    return integer, sum(operators.get(op, 0) for op in FLOAT_OPS)


def parity(quick: bool, folder: Path) -> tuple[list, dict]:
    """Table rows, and the images used."""
    calib, test_x, test_y, names = fashion_mnist(num_calib=200 if quick else 1000, num_test=1000 if quick else None)
    rows = []
    for spec in ("fmnist-resnet18", "fmnist-mobilenet_v2"):
        loaded = load_model(spec)
        for setting, (wbits, scheme) in SETTINGS.items():
            config = Config(wbits=wbits, scheme=scheme, abits=8, num_images=len(calib), act_images=min(400, len(calib)))
            model = compress(loaded, calib, config).model
            path = folder / f"{spec}-{wbits}-{scheme}.onnx"
            summary = export_onnx(model, path, calib[:1], calib=calib, calib_images=256, spec=spec,
                                  preset=loaded.preset, num_classes=10)
            torch_logits, _ = predict(model, test_x, 500)
            onnx_logits, _ = predict(OnnxModule(path, threads=THREADS), test_x, 500)
            agree = agreement(onnx_logits, torch_logits)["agreement_top1"]
            integer, floats = kernel_summary(path)
            row = [spec, setting, accuracy(torch_logits, test_y)["top1"], accuracy(onnx_logits, test_y)["top1"], agree,
                   integer, floats, f"{summary['bytes'] / 1e6:.2f}"]
            rows.append(row)
            print(markdown_table(PARITY_HEADER, [row]).splitlines()[-1], flush=True)
    return rows, {"test": names["test"], "test_images": len(test_y), "calib": names["calib"], "calib_images": len(calib)}


PARITY_HEADER = ["model", "setting", "PyTorch top-1 %", "ONNX top-1 %", "agreement top-1 %", "integer kernels (ORT)",
                 "float convs", "ONNX MB"]


def speed_model(name: str) -> torch.nn.Module | None:
    """The FP32 model; None when it is not installed."""
    torch.manual_seed(0)
    if name.startswith("efficientnet"):
        try:
            return load_model(name).model
        except Exception:  # noqa: BLE001 - renorm[zoo] missing
            return None
    return torchvision.models.get_model(name, weights=None).eval()


def _ort_quantize_static(fp32_path: Path, out: Path, images: np.ndarray, folder: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.items, None)

    prepared = folder / f"{fp32_path.stem}-pre.onnx"
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def _latency(sessions: dict[str, object], batch: int, runs: int) -> dict[str, float]:
    """Median ms per run of each session on the same batch, interleaved run by run."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for name, runner in sessions.items():
        for _ in range(3):
            runner.run(None, {runner.get_inputs()[0].name: x})
    for _ in range(runs):
        for name, runner in sessions.items():
            start = time.perf_counter()
            runner.run(None, {runner.get_inputs()[0].name: x})
            times[name].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(quick: bool, folder: Path, models: list[str]) -> tuple[list, dict]:
    images = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows, data = [], {}
    for name in models:
        fp32 = speed_model(name)
        if fp32 is None:
            print(f"{name}: not installed, skipped", flush=True)
            continue
        try:
            row, details = _speed_row(name, fp32, images, folder, quick)
        except Exception as error:  # noqa: BLE001 - one model's failure should not lose the others' rows
            print(f"{name}: failed: {error}", flush=True)
            continue
        rows.append(row)
        data[name] = details
        print(markdown_table(SPEED_HEADER, [row]).splitlines()[-1], flush=True)
    return rows, data


def _speed_row(name: str, fp32: torch.nn.Module, images: torch.Tensor, folder: Path, quick: bool) -> tuple[list, dict]:
    paths = {k: folder / f"{name}-{k}.onnx" for k in ("fp32", "renorm", "ort")}
    export_onnx(fp32, paths["fp32"], images[:1])  # no quantizer: the float graph, BatchNorm folded
    start = time.perf_counter()
    model = compress(fp32, images, Config(wbits=8, scheme="uniform", abits=8, num_images=32, act_images=32,
                                          renorm="none", batch_size=8)).model
    export_onnx(model, paths["renorm"], images[:1], calib=images, calib_images=32, batch_size=8)
    renorm_seconds = time.perf_counter() - start
    _ort_quantize_static(paths["fp32"], paths["ort"], images.numpy(), folder)
    sessions = {k: session(p, threads=THREADS) for k, p in paths.items()}
    integer, floats = kernel_summary(paths["renorm"])
    b1 = _latency(sessions, 1, 10 if quick else 30)
    b32 = _latency(sessions, 32, 3 if quick else 8)
    sizes = {k: p.stat().st_size / 1e6 for k, p in paths.items()}
    row = [name, b1["fp32"], b1["renorm"], b1["fp32"] / b1["renorm"], b1["ort"], b1["fp32"] / b1["ort"],
           b32["fp32"], b32["renorm"], b32["fp32"] / b32["renorm"], b32["ort"], b32["fp32"] / b32["ort"],
           sizes["fp32"], sizes["renorm"], sizes["ort"], integer, floats]
    details = dict(zip(["model", "b1_fp32_ms", "b1_renorm_ms", "b1_renorm_speedup", "b1_ort_ms",
                        "b1_ort_speedup", "b32_fp32_ms", "b32_renorm_ms", "b32_renorm_speedup", "b32_ort_ms",
                        "b32_ort_speedup", "fp32_mb", "renorm_mb", "ort_mb", "integer_kernels", "float_convs"], row))
    details["renorm_quantize_export_seconds"] = round(renorm_seconds, 1)
    return row, details


SPEED_HEADER = ["model", "b1 FP32 ms", "b1 renorm INT8 ms", "x", "b1 ORT INT8 ms", "x", "b32 FP32 ms",
                "b32 renorm INT8 ms", "x", "b32 ORT INT8 ms", "x", "FP32 MB", "renorm MB", "ORT MB",
                "integer kernels (renorm)", "float convs"]


def render(data: dict) -> str:
    """The markdown of every part in `data` (each part keeps the command and provenance it ran with)."""
    body = []
    if "rows" in data.get("parity", {}):
        part = data["parity"]
        body += [f"### Parity: ONNX Runtime against renorm's PyTorch model\n\n`{part['command']}` ({part['provenance']}); "
                 f"test: {part['images']['test_images']} images of {part['images']['test']}, calibration: "
                 f"{part['images']['calib_images']} images of {part['images']['calib']}",
                 markdown_table(PARITY_HEADER, part["rows"])]
    if "rows" in data.get("speed", {}):
        part = data["speed"]
        before, after = part["load_average"]["before"][0], part["load_average"]["after"][0]
        body += [f"### Speed and size at 224 px, {part['threads']} threads\n\n`{part['command']}` ({part['provenance']}); "
                 f"1-minute load average {before:.2f} before, {after:.2f} after (2 cores, shared); x = FP32 latency / "
                 "INT8 latency, measured interleaved in the same run; MB = 10^6 bytes",
                 markdown_table(SPEED_HEADER, part["rows"])]
    return "\n\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="+", choices=SPEED_MODELS, default=list(SPEED_MODELS))
    parser.add_argument("--quick", action="store_true", help="1000 test images, 200 calibration images, fewer runs")
    args = parser.parse_args()
    name = "deploy" + ("_quick" if args.quick else "")
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    stamp = {"command": command_line(), "provenance": provenance()}
    with tempfile.TemporaryDirectory() as folder:
        if "parity" in args.parts:
            rows, images = parity(args.quick, Path(folder))
            data["parity"] = {"rows": rows, "images": images, **stamp}
        if "speed" in args.parts:
            load = os.getloadavg()
            rows, extra = speed(args.quick, Path(folder), args.models)
            data["speed"] = {"rows": rows, "threads": THREADS, "details": extra,
                             "load_average": {"before": load, "after": os.getloadavg()}, **stamp}
    write_result(name, "Deployment: renorm INT8 ONNX in ONNX Runtime", command_line(), render(data), data)


if __name__ == "__main__":
    main()
