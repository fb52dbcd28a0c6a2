"""`renorm` commands: a thin shell over the Python API (parse, call, print).

Bad input exits with status 2 and one line on stderr naming the problem and the fix.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from renorm import distributed
from renorm.errors import RenormError, one_line
from renorm.images import PRESETS
from renorm.prune import BUDGETS, IMPORTANCES, KINDS, SCOPES
from renorm.quantize.plan import SCHEMES
from renorm.renormalize import AUTO_IMAGES, CHOICES, MODES
from renorm.reconstruct import DEFAULT_METHOD as DEFAULT_RECONSTRUCT, METHODS as RECONSTRUCT_METHODS

DEMO_REPORT = "renorm-demo-report.json"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise RenormError(f"{message} (see: {self.prog} --help)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("model", help="torchvision:NAME, timm:NAME, fmnist-resnet18, fmnist-mobilenet_v2, "
                                     "efficientnet-lite0, or a model file (renorm output, TorchScript, ONNX, "
                                     "pickled module)")
    group.add_argument("--weights", help="state_dict file for torchvision:NAME or timm:NAME (or a torchvision "
                                         "weights name)")
    group.add_argument("--num-classes", type=int, help="classes of a torchvision or timm model (default: its own)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a whole pickled nn.Module (unpickling runs code from the file)")
    pre = parser.add_argument_group("preprocessing (default: the model's own preset)")
    pre.add_argument("--preset", choices=PRESETS, help="preprocessing preset")
    pre.add_argument("--resize", type=int, help="resize the shorter side to this many pixels")
    pre.add_argument("--crop", type=int, help="centre-crop to this many pixels")
    pre.add_argument("--mean", type=float, nargs="+", help="1 or 3 numbers (RGB), on a 0..1 scale")
    pre.add_argument("--std", type=float, nargs="+", help="1 or 3 numbers (RGB), on a 0..1 scale")


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: the GPU when "
                       "PyTorch sees one, else the CPU; under torchrun each process takes cuda:LOCAL_RANK)")
    group.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS when set, else the cores "
                       "this process may use less those other processes keep busy)")
    group.add_argument("--workers", type=int, help="processes that decode image files while the model runs "
                       "(default: up to 4, one core left free; 0 for built-in sets already in memory); the images "
                       "and their order do not depend on it")


def _common_options(parser: argparse.ArgumentParser) -> None:
    _runtime_options(parser)
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="renorm", description="Compress a pretrained CNN without labels or retraining: "
                     "quantize or prune it, then re-estimate its BatchNorm statistics on unlabeled images.")
    from renorm import __version__

    parser.add_argument("--version", action="version", version=f"renorm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    compress = commands.add_parser("compress", help="quantize / prune, re-normalize, evaluate, save")
    _model_options(compress)
    compress.add_argument("--calib", required=True, help="unlabeled images: a folder (searched recursively) "
                          "or fashion-mnist:train")
    compress.add_argument("--num-images", type=int, default=1000, help="calibration images sampled (default 1000)")
    q = compress.add_argument_group("quantization")
    q.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8, or 32 for float (default 4)")
    q.add_argument("--scheme", default="pow2", choices=SCHEMES, help="weight levels (default pow2)")
    q.add_argument("--first-last-bits", type=int, default=8, help="first conv / last linear, uniform (0 = float)")
    q.add_argument("--abits", type=int, default=32, help="activation bits (e.g. 8); 32 = float (default)")
    q.add_argument("--act-images", type=int, default=400, help="images to calibrate activations (default 400)")
    q.add_argument("--act-method", default="minmax", choices=("minmax", "mse", "percentile"),
                   help="each activation's range: the observed min/max (default), the least squared error, or "
                   "the 0.01%%/99.99%% percentiles")
    q.add_argument("--exclude", nargs="+", default=[], help="layer names to leave in float")
    q.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=BITS",
                   help="bits for the layers a glob over names or a keyword (depthwise, grouped, pointwise, conv, "
                   "linear, first, last) selects, e.g. depthwise=8 or 'layer4.*=3'; 32 = float; repeatable, "
                   "later ones win")
    q.add_argument("--avg-bits", type=float, metavar="B", help="choose each layer's bits from 2, 3, 4, 8 so that "
                   "the average over all weights is at most B, by each layer's label-free sensitivity (KL against "
                   "FP32 on calibration images)")
    q.add_argument("--frontier", metavar="PLOT.png", help="with --avg-bits: plot size vs agreement along the "
                   "allocation's frontier")
    rc = compress.add_argument_group("reconstruction (re-choose the rounding so each layer matches FP32)")
    rc.add_argument("--reconstruct", action="store_true", help=f"turn it on with the best measured method "
                    f"({DEFAULT_RECONSTRUCT})")
    rc.add_argument("--reconstruct-method", choices=RECONSTRUCT_METHODS,
                    help="turn it on with this method instead")
    rc.add_argument("--reconstruct-images", type=int, default=256,
                    help="calibration images used for reconstruction (default 256)")
    rc.add_argument("--reconstruct-damping", default="0.1", metavar="D|auto",
                    help="ridge on each layer's curvature, in units of its mean diagonal (default 0.1); auto: "
                         "chosen per layer by cross-validation over two folds of the images")
    rc.add_argument("--reconstruct-sweeps", type=int, default=0, metavar="N",
                    help="gptq: N sweeps of coordinate descent over the weights after the rounding (default 0; "
                         "3 helped resnet18 at 2 bits, docs/RESULTS.md)")
    rc.add_argument("--reconstruct-refined", type=int, default=0, metavar="N",
                    help="also reconstruct on N more calibration images moved until the FP32 model's BatchNorm "
                         "layers see their running statistics (default 0; 64: for a few photos unlike the "
                         "training set, docs/RESULTS.md)")
    r = compress.add_argument_group("re-normalization")
    r.add_argument("--renorm", default="exact", choices=CHOICES, help="exact (default: re-estimate from the "
                   "images), shift (correct the trained statistics by the shift compression caused; for few or "
                   "unlike images), none, auto (each of the three, keeping the one whose outputs are closest to "
                   f"FP32 on the last {AUTO_IMAGES} calibration images)")
    r.add_argument("--chunk", type=int, default=64, help="images per progressive re-estimation step "
                   "(default 64; memory is one chunk; the result does not depend on --batch-size)")
    p = compress.add_argument_group("pruning")
    p.add_argument("--prune", type=float, default=0.0, help="fraction of weights (or filters) to remove, 0..1")
    p.add_argument("--prune-type", default="unstructured", choices=KINDS, help="default unstructured")
    p.add_argument("--prune-scope", default="layer", choices=SCOPES, help="one threshold per layer (default) "
                   "or one for all")
    p.add_argument("--prune-importance", default="l1", choices=IMPORTANCES, help="filter importance: L1 norm "
                   "(default), L2 norm, or BatchNorm scale")
    p.add_argument("--prune-budget", default="filters", choices=BUDGETS, help="for filter pruning, --prune is "
                   "the fraction of: filters (default), params, or macs")
    p.add_argument("--prune-exclude", nargs="+", default=[], help="layer names not to prune")
    p.add_argument("--prune-first-last", action="store_true", help="also prune the first conv and last linear layer")
    p.add_argument("--prune-depthwise", action="store_true", help="also prune depthwise convs (unstructured)")
    compress.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default 0)")
    compress.add_argument("--eval", help="evaluation images: labeled (one folder per class, or "
                          "fashion-mnist:test) for accuracy, unlabeled for agreement with FP32")
    compress.add_argument("--out", help="write the compressed model here (renorm evaluate can load it)")
    compress.add_argument("--onnx", metavar="OUT.onnx", help="also write an INT8 ONNX graph (QDQ) that ONNX Runtime "
                          "runs with integer kernels; needs pip install 'renorm[deploy]'")
    _common_options(compress)

    export = commands.add_parser("export", help="write a model as an INT8 ONNX graph for ONNX Runtime")
    _model_options(export)
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument("--calib", help="unlabeled images to calibrate the activations again, for a file from an "
                        "older renorm whose quantizers sit on conv/linear inputs only (a file calibrated by this "
                        "renorm is exported as it is)")
    export.add_argument("--num-images", type=int, default=256, help="calibration images used (default 256)")
    export.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default 0)")
    _common_options(export)

    evaluate = commands.add_parser("evaluate", help="accuracy, or agreement with a reference model")
    _model_options(evaluate)
    evaluate.add_argument("--data", required=True, help="images: labeled folder / fashion-mnist:test, or unlabeled")
    evaluate.add_argument("--reference", help="a reference model spec to measure agreement with")
    evaluate.add_argument("--reference-weights", help="state_dict file for a torchvision:NAME or timm:NAME reference "
                          "(--weights applies to MODEL alone)")
    evaluate.add_argument("--reference-num-classes", type=int, help="classes of a torchvision or timm reference")
    _common_options(evaluate)

    sens = commands.add_parser("sensitivity", help="per-layer pruning sensitivity on unlabeled images")
    _model_options(sens)
    sens.add_argument("--calib", required=True, help="unlabeled images (folder or fashion-mnist:train)")
    sens.add_argument("--num-images", type=int, default=256, help="images used (default 256)")
    sens.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                      help="fractions of each layer's weights to prune, one run each (default 0.3 0.5 0.7 0.9)")
    sens.add_argument("--renorm", default="exact", choices=MODES, help="re-normalize after pruning each layer "
                      "(default exact)")
    sens.add_argument("--plot", default="sensitivity.png", help="PNG plot (default sensitivity.png)")
    sens.add_argument("--seed", type=int, default=0, help="seed of the image sample (default 0)")
    _common_options(sens)

    demo = commands.add_parser("demo", help="the embedded default: reference resnet18, W4A8, exact re-normalization")
    demo.add_argument("--report", default=DEMO_REPORT, help=f"JSON report (default {DEMO_REPORT})")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load(args: argparse.Namespace, reference: bool = False):
    """MODEL with --weights/--num-classes and the preprocessing options, or --reference with its own."""
    from renorm.data import make_preset
    from renorm.models import load_model

    if reference:
        loaded = load_model(args.reference, args.reference_weights, args.reference_num_classes, args.trust_pickle)
        loaded.model.to(args.device)
        return loaded
    loaded = load_model(args.model, args.weights, args.num_classes, args.trust_pickle)
    loaded.model.to(args.device)
    custom = any(getattr(args, k, None) is not None for k in ("preset", "resize", "crop", "mean", "std"))
    if custom:
        loaded.preset = make_preset(args.preset or (loaded.preset or "imagenet"), args.resize, args.crop,
                                    args.mean, args.std)
    if loaded.preset is None:
        loaded.preset = make_preset("imagenet")
    return loaded


def run_compress(args: argparse.Namespace) -> int:
    from renorm.api import Config, compress
    from renorm.data import open_images
    from renorm.export import save_compressed
    from renorm.quantize.plan import parse_layer_bits

    method = args.reconstruct_method or (DEFAULT_RECONSTRUCT if args.reconstruct else "none")
    if args.frontier and args.avg_bits is None:
        raise RenormError("--frontier plots the --avg-bits allocation; add --avg-bits B")
    config = Config(wbits=args.wbits, scheme=args.scheme, first_last_bits=args.first_last_bits, abits=args.abits,
                    renorm=args.renorm, num_images=args.num_images, act_images=args.act_images, act_method=args.act_method,
                    batch_size=args.batch_size, chunk=args.chunk, seed=args.seed,
                    exclude=tuple(args.exclude), prune=args.prune, prune_type=args.prune_type,
                    prune_scope=args.prune_scope, prune_importance=args.prune_importance,
                    prune_budget=args.prune_budget, prune_exclude=tuple(args.prune_exclude),
                    prune_first_last=args.prune_first_last, prune_depthwise=args.prune_depthwise,
                    layer_bits=parse_layer_bits(args.layer_bits), avg_bits=args.avg_bits, reconstruct=method,
                    reconstruct_images=args.reconstruct_images, threads=args.threads if args.threads_given else "auto",
                    reconstruct_damping=parse_damping(args.reconstruct_damping),
                    reconstruct_sweeps=args.reconstruct_sweeps, reconstruct_refined=args.reconstruct_refined)
    _check_outputs(args, (args.model, args.weights), "--out", "--report", "--frontier", "--onnx")
    _check_extras(plot=bool(args.frontier), prune=args.prune > 0 and args.prune_type != "unstructured")
    if args.onnx:
        _check_onnx_options(args.wbits, args.scheme, args.abits, config.layer_bits)
    loaded = _load(args)
    calib = open_images(args.calib, loaded.preset, labeled=False, workers=args.workers)
    eval_data = open_images(args.eval, loaded.preset, workers=args.workers) if args.eval else None
    result = compress(loaded, calib, config, eval_data, progress=_progress(args))
    report = result.report
    if args.frontier:
        from renorm.quantize.allocation import plot_frontier

        plot_frontier(report["bits"], args.frontier, f"{loaded.spec}: bit allocation frontier")
        report["bits"]["plot"] = args.frontier
    report["runtime"] = _runtime_record(args, calib)
    if args.onnx and distributed.is_main():  # before --out: an export that fails leaves no file behind
        from renorm.data import sample

        report["onnx"] = _export_onnx(result.model.cpu(), loaded, args, sample(calib, config.num_images, config.seed))
    if args.out and distributed.is_main():
        size = save_compressed(args.out, result.model.cpu(), loaded, protected=[args.model, args.weights])
        report["output"] = {"path": args.out, "bytes": size}
    _finish(report, args.report)
    return 0


def _check_onnx_options(wbits: int, scheme: str, abits: int, layer_bits: Sequence[tuple[str, int]] = ()) -> None:
    """--onnx: the extra is installed and the bits fit int8 QDQ (before any work)."""
    from renorm.export.onnx_runtime import require
    from renorm.quantize.plan import BITS_RANGE

    require("onnx")
    require("onnxruntime")
    given = [(f"--wbits {wbits}", wbits), *((f"--layer-bits {pattern}={bits}", bits) for pattern, bits in layer_bits)]
    for flag, bits in given:  # pow2 keeps 5 and 6 bits pow2 (at 7 and 8 a layer is quantized uniform)
        if scheme == "pow2" and 4 < bits <= BITS_RANGE["pow2"][1]:
            raise RenormError(f"--onnx takes pow2 weights up to 4 bits (levels up to 2^6 fit int8), not {flag}; "
                              "give 4 bits, 8 (uniform), or --scheme uniform")
    if abits not in (8, 32):
        raise RenormError(f"--onnx takes 8-bit activations (--abits 8) or float ones (--abits 32), not --abits {abits}")


def _export_onnx(model: Any, loaded: Any, args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    from renorm.data import Batches
    from renorm.export.onnx_qdq import export_onnx
    from renorm.export.onnx_runtime import integer_operators

    import torch

    size = loaded.preset.input_size
    example = Batches(calib, 1).first(1) if calib is not None else torch.zeros(1, 3, size, size)
    summary = export_onnx(model, args.onnx, example, calib=calib, calib_images=getattr(args, "export_images", 256),
                          batch_size=args.batch_size, spec=loaded.spec, preset=loaded.preset,
                          num_classes=loaded.num_classes, protected=[args.model, args.weights])
    summary["operators"] = integer_operators(args.onnx)
    return summary


def run_export(args: argparse.Namespace) -> int:
    from renorm.data import open_images, sample

    if args.batch_size < 1:
        raise RenormError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_images < 1:
        raise RenormError(f"--num-images must be at least 1, got {args.num_images}")
    _check_outputs(args, (args.model, args.weights), "--onnx", "--report")
    _check_onnx_options(32, "uniform", 32)
    loaded = _load(args)
    calib = sample(open_images(args.calib, loaded.preset, labeled=False, workers=args.workers), args.num_images,
                   args.seed) if args.calib else None
    args.export_images = args.num_images
    summary = _export_onnx(loaded.model.cpu(), loaded, args, calib)  # ONNX is written from the CPU, as compress does
    if summary.get("float_add_inputs"):
        import warnings

        why = "torch.fx cannot trace the model, so only conv/linear inputs are quantized" if calib is not None else \
            "the model's quantizers sit on conv/linear inputs only (an older renorm file); add --calib IMAGES"
        warnings.warn(f"{summary['float_add_inputs']} residual Add or pool inputs stay float and the convs before "
                      f"them run in float: {why}", stacklevel=2)
    report = {"model": {"spec": loaded.spec, "preset": loaded.preset.describe()}, "onnx": summary}
    if calib is not None:
        report["calibration"] = {"source": calib.name, "images_used": min(len(calib) - len(calib.skipped),
                                                                          args.num_images),
                                 "skipped": len(calib.skipped), "skipped_files": list(calib.skipped)}
    _finish(report, args.report)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from renorm.data import open_images
    from renorm.evaluate import evaluate
    from renorm.report import accuracy_table

    if not args.reference and (args.reference_weights or args.reference_num_classes is not None):
        raise RenormError("--reference-weights and --reference-num-classes need --reference MODEL")
    if args.reference_num_classes is not None and args.reference_num_classes < 1:  # else named --num-classes
        raise RenormError(f"--reference-num-classes must be at least 1, got {args.reference_num_classes}")
    if args.batch_size < 1:
        raise RenormError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_outputs(args, (args.model, args.weights, args.reference, args.reference_weights), "--report")
    loaded = _load(args)
    reference = _load(args, reference=True) if args.reference else None
    data = open_images(args.data, loaded.preset, workers=args.workers)
    metrics = evaluate(loaded.model, data, reference.model if reference else None, args.batch_size,
                       progress=_progress(args))
    accuracy = {"model": {k: v for k, v in metrics.items() if k not in ("images", "seconds")}}
    report = {"model": {"spec": loaded.spec, "preset": loaded.preset.describe()},
              "reference": {"spec": reference.spec, "weights": args.reference_weights,
                            "num_classes": args.reference_num_classes} if reference else None,
              "evaluation": {"source": data.name, "images": metrics["images"], "skipped": len(data.skipped),
                             "skipped_files": list(data.skipped), "seconds": metrics["seconds"]},
              "accuracy": accuracy, "table": accuracy_table(accuracy), "runtime": _runtime_record(args, data)}
    _finish(report, args.report)
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    from renorm.data import open_images, sample
    from renorm.prune import PruneConfig
    from renorm.sensitivity import plot_sensitivity, sensitivity, sensitivity_table

    for fraction in args.sparsities:
        PruneConfig(fraction)  # validates the range
    if args.batch_size < 1:
        raise RenormError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_outputs(args, (args.model, args.weights), "--report", "--plot")
    _check_extras(plot=True)
    loaded = _load(args)
    images = sample(open_images(args.calib, loaded.preset, labeled=False, workers=args.workers), args.num_images,
                    args.seed)
    rows = sensitivity(loaded.model, images, args.sparsities, args.renorm, args.batch_size, progress=not args.quiet)
    report = {"model": {"spec": loaded.spec},
              "calibration": {"source": images.name, "images_used": len(images) - len(images.skipped),
                              "skipped": len(images.skipped), "skipped_files": list(images.skipped)},
              "renorm": args.renorm, "sensitivity": rows, "table": sensitivity_table(rows), "plot": args.plot}
    plot_sensitivity(rows, args.plot, f"{loaded.spec}: per-layer pruning sensitivity ({args.renorm} re-normalization)")
    _finish(report, args.report)
    print(f"plot: {args.plot}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from renorm.demo import demo

    _check_outputs(args, (), "--report")
    report = demo(progress=not args.quiet)
    _finish(report, args.report)
    return 0


def _check_outputs(args: argparse.Namespace, inputs: Sequence[str | None], *flags: str) -> None:
    """Every output path is writable, none is an input, no two are the same file (before any work)."""
    from renorm.files import check_output

    paths = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in flags}
    for flag, path in paths.items():
        check_output(path, flag, inputs)
    given = [(flag, Path(path).expanduser().resolve()) for flag, path in paths.items() if path]
    for index, (flag, path) in enumerate(given):
        for other, other_path in given[index + 1:]:
            if path == other_path:
                raise RenormError(f"{flag} and {other} name the same file {path}; give two file names")


def _check_extras(plot: bool = False, prune: bool = False) -> None:
    """The optional packages this run will need are installed (before any work)."""
    if plot:
        from renorm.plots import pyplot

        pyplot()
    if prune:
        from renorm.prune import require_torch_pruning

        require_torch_pruning()


def parse_damping(text: str) -> float | str:
    """--reconstruct-damping: 'auto' or a number >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise RenormError(f"--reconstruct-damping {text!r}: give a number >= 0 (e.g. 0.1) or auto")
    return value


def _runtime_record(args: argparse.Namespace, images: Any) -> dict[str, Any]:
    """Where the command ran, for the report."""
    return {"device": str(args.device), "threads": args.threads, "workers": images.workers,
            "processes": distributed.world_size()}


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and distributed.is_main()


def _finish(report: dict[str, Any], report_path: str | None) -> None:
    """Print the summary and write the report (in the main process only, under torchrun)."""
    from renorm.report import write_json_atomic

    if not distributed.is_main():
        return
    summary = _summary(report)
    if summary:
        print(summary)
    if report.get("table"):
        print(report["table"])
    if report_path:
        write_json_atomic(report_path, report)
        print(f"report: {report_path}")


def _summary(report: dict[str, Any]) -> str:
    lines = []
    if "model" in report:
        lines.append(f"model: {report['model']['spec']}")
    calib = report.get("calibration")
    if calib and "images_used" in calib:
        lines.append(f"calibration: {calib['images_used']} images from {calib['source']}"
                     + (f" ({calib['skipped']} unreadable, skipped)" if calib.get("skipped") else ""))
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("source") is None:
        lines.append("evaluation: none (add --eval DATA to measure each stage)")
    elif evaluation:
        lines.append(f"evaluation: {evaluation['images']} images from {evaluation['source']}"
                     + (f" ({evaluation['skipped']} unreadable, skipped)" if evaluation.get("skipped") else ""))
    stages = report.get("stages")
    if stages:
        lines.append("time: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in stages.items())
                     + f"; peak memory {max(v['peak_rss_mb'] for v in stages.values()):.0f} MiB")
    batchnorm = report.get("batchnorm")
    if batchnorm and batchnorm.get("mode") == "auto" and batchnorm.get("kl"):
        lines.append(f"re-normalization: auto chose {batchnorm['chosen']} (KL to FP32 on {batchnorm['scored_images']} "
                     "calibration images: " + ", ".join(f"{m} {v:.4f}" for m, v in batchnorm["kl"].items()) + ")")
    pruned = report.get("prune")
    if pruned:
        line = (f"pruned ({pruned['type']} {pruned['fraction']:.0%}): params {pruned['params_before'] / 1e6:.2f}M -> "
                f"{pruned['params_after'] / 1e6:.2f}M, MACs {pruned['macs_before'] / 1e6:.1f}M -> "
                f"{pruned['macs_after'] / 1e6:.1f}M")
        if "sparsity" in pruned:
            line += f", sparsity {pruned['sparsity']:.1%} of conv/linear weights"
        if "latency_ms_after" in pruned:
            line += (f", latency {pruned['latency_ms_before']:.1f} -> {pruned['latency_ms_after']:.1f} ms "
                     f"(batch {pruned['latency_batch']}, {pruned['threads']} threads)")
        lines.append(line)
    bits = report.get("bits")
    if bits:
        counts: dict[int, int] = {}
        for value in bits["allocation"].values():
            counts[value] = counts.get(value, 0) + 1
        lines.append(f"bits: average {bits['average_bits']:.2f} (budget {bits['budget']:g}); layers per bits: "
                     + ", ".join(f"{b}: {n}" for b, n in sorted(counts.items())))
    if "output" in report:
        lines.append(f"saved: {report['output']['path']} ({report['output']['bytes'] / 2**20:.2f} MiB)")
    onnx = report.get("onnx")
    if onnx:
        operators = onnx["operators"]
        integer = ", ".join(f"{op} {n}" for op, n in operators.items() if op.startswith("Q") and op != "QuantizeLinear")
        floats = sum(operators.get(op, 0) for op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm"))
        lines.append(f"onnx: {onnx['path']} ({onnx['bytes'] / 2**20:.2f} MiB); ONNX Runtime runs "
                     f"{integer or 'no integer kernel'}; float conv/gemm {floats}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: exit 2 and one line on stderr, nothing else.

    Warnings are held until the command ends, then printed once each ("renorm:
    warning: ..."); when the command fails, its one error line is all that is printed.
    """
    parser = build_parser()
    handlers = {"compress": run_compress, "evaluate": run_evaluate, "sensitivity": run_sensitivity, "demo": run_demo,
                "export": run_export}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        # torch's deprecation notices (e.g. for TorchScript) are not the user's problem
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            args = parser.parse_args(argv)
            with _runtime(args):
                code = handlers[args.command](args)
        except RenormError as error:
            return _fail(one_line(error))
        except OSError as error:
            return _fail(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
        except KeyboardInterrupt:
            _print_warnings(caught)
            print("renorm: interrupted", file=sys.stderr)
            return 130
    _print_warnings(caught)
    return code


@contextmanager
def _runtime(args: argparse.Namespace) -> Iterator[None]:
    """Threads, the device (args.device becomes a torch.device) and, under torchrun, the process group."""
    import torch

    from renorm.device import check_threads, default_threads, resolve_device

    args.threads_given = getattr(args, "threads", None) is not None  # else compress chooses again at each stage
    threads = check_threads(args.threads) if args.threads_given else default_threads()
    args.threads = threads
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise RenormError(f"--workers must be 0 or more, got {args.workers}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    args.device = resolve_device(getattr(args, "device", "cpu"))
    if distributed.launched() and args.command not in ("compress", "evaluate"):
        raise RenormError(f"renorm {args.command} runs in one process; run it without torchrun")
    joined = distributed.setup(args.device)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if joined:
            distributed.teardown()


def _fail(message: str) -> int:
    if distributed.is_main():
        print(f"renorm: error: {message}", file=sys.stderr)
    return 2


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    if not distributed.is_main():
        return
    for message in dict.fromkeys(one_line(w.message) for w in caught):
        print(f"renorm: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
