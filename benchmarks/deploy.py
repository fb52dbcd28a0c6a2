"""Deployment: parity of renorm's INT8 ONNX graph with its PyTorch model, and its speed in ONNX Runtime.

    python -m benchmarks.deploy [--parts parity speed files] [--quick]

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

parity-lite0: EfficientNet-Lite0 (its real weights, where renorm[zoo] is installed), W8A8
and W4A8 uniform with shift re-normalization, calibrated on 500 crops of photos:calib:
agreement with the FP32 model on 500 crops of photos:eval of the PyTorch model and of the
ONNX file, their top-1 agreement with each other and KL between them, how close to a
tie (softmax margin between the first two classes) the crops are that they split, and
the floor float round-off alone sets: the same PyTorch model run in float64 against
float32 (and the ONNX file against float64).

openvino: the same FP32 and renorm W8A8 ONNX files as speed, compiled by OpenVINO for the
CPU (`pip install openvino`; skipped without it) with INFERENCE_NUM_THREADS =
RENORM_BENCH_THREADS, latency at batch 1 and 32 timed the same way, and how many of the
compiled graph's convolutions and matrix products run in 8-bit integers (the runtime
model's precision of each).

files: the size of renorm's own `--out` file at W4 (pow2 4-bit weights; first and last
layer uniform 8-bit, the compress defaults, or uniform 4-bit) against the fp32 state_dict, for the speed
models, a timm resnet18 and a user-defined nn.Module (a VGG-style CNN defined here, so
that no spec names it): the file that rebuilds the architecture from its spec, the one
that stores it as a torch.export program, and the whole pickled module (what `--out`
wrote for such models before; now only where torch.export fails). Each program file is
loaded back (without trust_pickle) and must give outputs equal to the compressed model's.
"""
from __future__ import annotations

import argparse
import copy
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

PARTS = ("parity", "parity-lite0", "speed", "openvino", "files")
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


def lite0_parity(quick: bool, folder: Path) -> list:
    """EfficientNet-Lite0 (real weights): agreement of the ONNX file with renorm's PyTorch model, by photos."""
    from renorm.data import Batches, open_images

    try:
        loaded = load_model("efficientnet-lite0")
    except Exception:  # noqa: BLE001 - renorm[zoo] missing
        print("efficientnet-lite0: not installed, skipped", flush=True)
        return []
    count = 100 if quick else 500
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), 50).first(count)
    test = Batches(open_images(f"photos:eval:{count}", loaded.preset), 50).first(count)
    fp32_logits, _ = predict(loaded.model, test, 50)
    rows = []
    for setting in ("W8A8 uniform", "W4A8 uniform"):
        wbits, scheme = SETTINGS[setting]
        model = compress(loaded, calib, Config(wbits=wbits, scheme=scheme, abits=8, num_images=count,
                                               act_images=min(400, count), renorm="shift")).model
        path = folder / f"lite0-{wbits}.onnx"
        summary = export_onnx(model, path, calib[:1], calib=calib, calib_images=256, spec="efficientnet-lite0",
                              preset=loaded.preset)
        torch_logits, _ = predict(model, test, 50)
        onnx_logits, _ = predict(OnnxModule(path, threads=THREADS), test, 50)
        # the floor float round-off sets: the same PyTorch model computed in float64 (every rounding to an
        # 8-bit level the same function of exact-er values) against float32
        exact = copy.deepcopy(model).double()
        with torch.no_grad():
            double_logits = torch.cat([exact(test[i:i + 50].double()) for i in range(0, len(test), 50)]).float()
        integer, floats = kernel_summary(path)
        between = agreement(onnx_logits, torch_logits)
        top2 = torch_logits.softmax(1).topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]  # how close each crop is to a tie between its first two classes
        split = torch_logits.argmax(1) != onnx_logits.argmax(1)
        row = ["efficientnet-lite0", setting + ", shift", agreement(torch_logits, fp32_logits)["agreement_top1"],
               agreement(onnx_logits, fp32_logits)["agreement_top1"], between["agreement_top1"],
               f"{between['kl']:.4f}", f"{agreement(torch_logits, fp32_logits)['kl']:.4f}",
               f"{float(margin[split].median()):.3f}" if split.any() else "-", f"{float(margin.median()):.3f}",
               agreement(torch_logits, double_logits)["agreement_top1"],
               agreement(onnx_logits, double_logits)["agreement_top1"],
               integer, floats, f"{summary['bytes'] / 1e6:.2f}"]
        rows.append(row)
        print(markdown_table(LITE0_PARITY_HEADER, [row]).splitlines()[-1], flush=True)
    return rows


LITE0_PARITY_HEADER = ["model", "setting", "PyTorch: agreement with FP32 top-1 %", "ONNX: agreement with FP32 top-1 %",
                       "ONNX vs PyTorch top-1 agreement %", "KL(PyTorch || ONNX)", "KL(FP32 || PyTorch)",
                       "median top-2 margin, crops they split", "median top-2 margin, all crops",
                       "PyTorch float32 vs float64 top-1 agreement %", "ONNX vs PyTorch float64 top-1 agreement %",
                       "integer kernels (ORT)", "float convs", "ONNX MB"]

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
    return _per_model(models, lambda name, fp32, images: _speed_row(name, fp32, images, folder, quick), SPEED_HEADER)


def _per_model(models: list[str], make_row, header: list[str]) -> tuple[list, dict]:
    """make_row(name, fp32, images) -> (row, details) for each installed model; a failure costs only its row."""
    images = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows, data = [], {}
    for name in models:
        fp32 = speed_model(name)
        if fp32 is None:
            print(f"{name}: not installed, skipped", flush=True)
            continue
        try:
            row, details = make_row(name, fp32, images)
        except Exception as error:  # noqa: BLE001 - one model's failure should not lose the others' rows
            print(f"{name}: failed: {error}", flush=True)
            continue
        rows.append(row)
        data[name] = details
        print(markdown_table(header, [row]).splitlines()[-1], flush=True)
    return rows, data


def _speed_row(name: str, fp32: torch.nn.Module, images: torch.Tensor, folder: Path, quick: bool) -> tuple[list, dict]:
    paths, renorm_seconds = _exports(name, fp32, images, folder)
    paths["ort"] = folder / f"{name}-ort.onnx"
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


def _exports(name: str, fp32: torch.nn.Module, images: torch.Tensor, folder: Path) -> tuple[dict[str, Path], float]:
    """The FP32 graph (no quantizer, BatchNorm folded) and renorm's W8A8 graph of a speed model as ONNX files,
    and the seconds renorm took to quantize and export."""
    paths = {k: folder / f"{name}-{k}.onnx" for k in ("fp32", "renorm")}
    export_onnx(fp32, paths["fp32"], images[:1])
    start = time.perf_counter()
    model = compress(fp32, images, Config(wbits=8, scheme="uniform", abits=8, num_images=32, act_images=32,
                                          renorm="none", batch_size=8)).model
    export_onnx(model, paths["renorm"], images[:1], calib=images, calib_images=32, batch_size=8)
    return paths, time.perf_counter() - start


class _OpenVinoRunner:
    """An OpenVINO compiled model behind the two methods _latency calls."""

    def __init__(self, path: Path, batch: int):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): [batch, 3, 224, 224]})
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()

    def get_inputs(self):
        return [type("Input", (), {"name": 0})()]

    def run(self, _outputs, feeds):
        return self.request.infer({0: next(iter(feeds.values()))})

    def integer_share(self) -> str:
        """Convolutions and matrix products of the compiled graph that run in 8-bit integers, of all."""
        kinds = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")
        ops = [op for op in self.compiled.get_runtime_model().get_ordered_ops()
               if op.get_rt_info()["layerType"].astype(str) in kinds]
        integer = [op for op in ops if op.get_rt_info()["runtimePrecision"].astype(str).lower() in ("i8", "u8")]
        return f"{len(integer)} of {len(ops)}"


def openvino_speed(quick: bool, folder: Path, models: list[str]) -> tuple[list, dict]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino: not installed (pip install openvino), skipped", flush=True)
        return [], {}
    return _per_model(models, lambda name, fp32, images: _openvino_row(name, fp32, images, folder, quick),
                      OPENVINO_HEADER)


def _openvino_row(name: str, fp32: torch.nn.Module, images: torch.Tensor, folder: Path, quick: bool
                  ) -> tuple[list, dict]:
    paths, _ = _exports(name, fp32, images, folder)
    row = [name]
    for batch, runs in ((1, 10 if quick else 30), (32, 3 if quick else 8)):
        runners = {k: _OpenVinoRunner(p, batch) for k, p in paths.items()}
        ms = _latency(runners, batch, runs)
        row += [ms["fp32"], ms["renorm"], ms["fp32"] / ms["renorm"]]
    row.append(runners["renorm"].integer_share())
    return row, dict(zip(["model", "b1_fp32_ms", "b1_renorm_ms", "b1_speedup", "b32_fp32_ms", "b32_renorm_ms",
                          "b32_speedup", "integer_convs"], row))


OPENVINO_HEADER = ["model", "b1 FP32 ms", "b1 renorm INT8 ms", "x", "b32 FP32 ms", "b32 renorm INT8 ms", "x",
                   "integer convs/matmuls (renorm)"]

SPEED_HEADER = ["model", "b1 FP32 ms", "b1 renorm INT8 ms", "x", "b1 ORT INT8 ms", "x", "b32 FP32 ms",
                "b32 renorm INT8 ms", "x", "b32 ORT INT8 ms", "x", "FP32 MB", "renorm MB", "ORT MB",
                "integer kernels (renorm)", "float convs"]


class CustomNet(torch.nn.Module):
    """A user's own CNN (no spec names it): VGG-style stages of conv-BN-ReLU, global pool, linear."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, width = [], 3
        for out, stride in ((64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            layers += [torch.nn.Conv2d(width, out, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(out),
                       torch.nn.ReLU(inplace=True)]
            width = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


FILE_SETTINGS = {"W4, first/last 8-bit": 8, "W4 everywhere": 4}
FILE_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet-lite0", "timm:resnet18", "custom")


def _file_model(name: str):
    """(LoadedModel, whether a spec rebuilds it); None when not installed."""
    from renorm.checkpoint import LoadedModel

    torch.manual_seed(0)
    if name == "custom":
        return LoadedModel(CustomNet().eval(), "CustomNet", None), False
    try:
        loaded = load_model(name if ":" in name or name.startswith("efficientnet") else f"torchvision:{name}")
    except Exception:  # noqa: BLE001 - renorm[zoo] or timm missing
        return None
    return loaded, True


def files(folder: Path, models: list[str]) -> tuple[list, dict]:
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights

    rows, data = [], {}
    for name in models:
        found = _file_model(name)
        if found is None:
            print(f"{name}: not installed, skipped", flush=True)
            continue
        loaded, by_spec = found
        fp32_path = folder / f"{name.replace(':', '-')}-fp32.pt"
        torch.save(loaded.model.state_dict(), fp32_path)
        fp32 = fp32_path.stat().st_size
        for setting, first_last in FILE_SETTINGS.items():
            model = quantize_weights(loaded.model, WeightQuantConfig(bits=4, scheme="pow2", first_last_bits=first_last))
            row, data[f"{name} {setting}"] = _file_row(name, setting, loaded, model, by_spec, fp32, folder)
            rows.append(row)
            print(markdown_table(FILES_HEADER, [row]).splitlines()[-1], flush=True)
    return rows, data


def _file_row(name: str, setting: str, loaded, model: torch.nn.Module, by_spec: bool, fp32: int,
              folder: Path) -> tuple[list, dict]:
    import warnings
    from unittest import mock

    from renorm.export import save_compressed
    from renorm.export.program import NotExportable

    example = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    bare = type(loaded)(model, loaded.spec, loaded.preset, loaded.num_classes, {})  # as if no spec named it
    sizes = {"spec": save_compressed(folder / "spec.pt", model, loaded, example=example) if by_spec else None}
    start = time.perf_counter()
    sizes["program"] = save_compressed(folder / "program.pt", model, bare, example=example)
    seconds = time.perf_counter() - start
    reloaded = load_model(str(folder / "program.pt")).model
    with torch.no_grad():
        exact = bool(torch.equal(reloaded(example), model(example)))
    with warnings.catch_warnings(), mock.patch("renorm.export.packed.export_program",
                                               side_effect=NotExportable("benchmark: the pickle path")):
        warnings.simplefilter("ignore")
        sizes["pickle"] = save_compressed(folder / "pickle.pt", model, bare, example=example)
    cells = [name, setting, fp32 / 1e6, fp32 / _smallest_possible(model)]
    for key in ("spec", "program", "pickle"):
        cells += [sizes[key] / 1e6, fp32 / sizes[key]] if sizes[key] else ["-", "-"]
    row = [*cells, "yes" if exact else "NO", round(seconds, 1)]
    return row, {"fp32_bytes": fp32, **{f"{k}_bytes": v for k, v in sizes.items()}, "program_exact": exact,
                 "program_save_seconds": seconds}


def _smallest_possible(model: torch.nn.Module) -> float:
    """Bytes of the codes at their bits plus every other tensor of the state_dict as it is: no file holds less."""
    from renorm.quantize.weights import ATTRIBUTE

    quantized = {name: q for name, m in model.named_modules() if (q := getattr(m, ATTRIBUTE, None)) is not None}
    codes = sum(q.codes.numel() * q.bits / 8 for q in quantized.values())
    weights = {f"{name}.weight" for name in quantized}
    rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in weights)
    return codes + rest


FILES_HEADER = ["model", "setting", "fp32 state_dict MB", "fp32 / (codes + other tensors)", "W4 by spec MB",
                "fp32 / file", "W4 program MB", "fp32 / file",
                "W4 pickled module MB", "fp32 / file", "program reloads exactly", "program save s"]


def _timed(part: dict) -> str:
    """The command, provenance and load of a timed part."""
    before, after = part["load_average"]["before"][0], part["load_average"]["after"][0]
    return (f"`{part['command']}` ({part['provenance']}); 1-minute load average {before:.2f} before, {after:.2f} "
            "after (2 cores, shared); x = FP32 latency / INT8 latency, measured interleaved in the same run")


def render(data: dict) -> str:
    """The markdown of every part in `data` (each part keeps the command and provenance it ran with)."""
    body = []
    if "rows" in data.get("parity", {}):
        part = data["parity"]
        body += [f"### Parity: ONNX Runtime against renorm's PyTorch model\n\n`{part['command']}` ({part['provenance']}); "
                 f"test: {part['images']['test_images']} images of {part['images']['test']}, calibration: "
                 f"{part['images']['calib_images']} images of {part['images']['calib']}",
                 markdown_table(PARITY_HEADER, part["rows"])]
    if "rows" in data.get("parity-lite0", {}):
        part = data["parity-lite0"]
        body += [f"### Parity on EfficientNet-Lite0 (ImageNet weights), by agreement\n\n`{part['command']}` "
                 f"({part['provenance']}); calibration and activation ranges on crops of photos:calib, agreement on "
                 "the same number of crops of photos:eval; `shift` re-normalization",
                 markdown_table(LITE0_PARITY_HEADER, part["rows"])]
    if "rows" in data.get("speed", {}):
        part = data["speed"]
        body += [f"### Speed and size at 224 px, {part['threads']} threads\n\n{_timed(part)}; MB = 10^6 bytes",
                 markdown_table(SPEED_HEADER, part["rows"])]
    if "rows" in data.get("openvino", {}):
        part = data["openvino"]
        body += [f"### OpenVINO {part['version']}: the same ONNX files, {part['threads']} threads\n\n{_timed(part)}",
                 markdown_table(OPENVINO_HEADER, part["rows"])]
    if "rows" in data.get("files", {}):
        part = data["files"]
        body += [f"### renorm files (`--out`) at W4 against the fp32 state_dict\n\n`{part['command']}` "
                 f"({part['provenance']}); W4 = pow2 4-bit weights, the first and last layer uniform 8-bit (the "
                 "compress defaults) or uniform 4-bit too (`--first-last-bits 4`); random weights, seeded "
                 "(EfficientNet-Lite0: its real ones); MB = 10^6 bytes; fp32 / file: how many times smaller the file is (target: "
                 ">= 6); fp32 / (codes + other tensors): the ratio of the raw payload, the codes at their bits and every "
                 "other tensor as it is (BatchNorm statistics, biases, scales), which renorm's files pass where they "
                 "deflate their zip entries (rows measured since that change); random weights leave BatchNorm at 1 and 0, which "
                 "deflate squeezes more than trained statistics",
                 markdown_table(FILES_HEADER, part["rows"])]
    return "\n\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="+", choices=SPEED_MODELS, default=list(SPEED_MODELS))
    parser.add_argument("--file-models", nargs="+", choices=FILE_MODELS, default=list(FILE_MODELS))
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
        if "parity-lite0" in args.parts:
            rows = lite0_parity(args.quick, Path(folder))
            if rows:
                data["parity-lite0"] = {"rows": rows, **stamp}
        if "speed" in args.parts:
            load = os.getloadavg()
            rows, extra = speed(args.quick, Path(folder), args.models)
            data["speed"] = {"rows": rows, "threads": THREADS, "details": extra,
                             "load_average": {"before": load, "after": os.getloadavg()}, **stamp}
        if "openvino" in args.parts:
            load = os.getloadavg()
            rows, extra = openvino_speed(args.quick, Path(folder), args.models)
            if rows:
                import openvino

                data["openvino"] = {"rows": rows, "threads": THREADS, "details": extra, "version": openvino.__version__,
                                    "load_average": {"before": load, "after": os.getloadavg()}, **stamp}
        if "files" in args.parts:
            rows, extra = files(Path(folder), args.file_models)
            data["files"] = {"rows": rows, "details": extra, **stamp}
    write_result(name, "Deployment: renorm INT8 ONNX in ONNX Runtime", command_line(), render(data), data)


if __name__ == "__main__":
    main()
