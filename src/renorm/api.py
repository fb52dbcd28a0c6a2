"""compress(): the one-call pipeline, and its Config.

load -> prune -> quantize weights -> re-normalize BatchNorm -> calibrate activations ->
evaluate each stage. The caller's model is never modified.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from renorm import __version__
from renorm.device import check_threads, default_threads, threads
from renorm.data import Batches, ImageSource, Preset, first_images, open_images, sample
from renorm.errors import RenormError
from renorm.evaluate import agreement, accuracy, images_counted, predict
from renorm.export.program import MARK as PROGRAM_MARK
from renorm.forward import as_logits, eval_mode, forward
from renorm.layers import check_layer_names
from renorm.models import LoadedModel, load_model
from renorm.quantize.activations import (ActivationQuantConfig, activation_quantization_stats,
                                         calibrate_activations)
from renorm.quantize.allocation import allocate_bits, check_average_bits
from renorm.quantize.weights import WeightQuantConfig, layer_plans, quantize_weights, weight_quantization_stats
from renorm.reconstruct import ReconstructConfig, reconstruct
from renorm.renormalize import CHOICES, renormalize_with_summary
from renorm.report import accuracy_table, stage


@dataclass(frozen=True)
class Config:
    """Everything `compress` does. wbits=32 leaves weights in float, abits=32 activations."""

    wbits: int = 4
    scheme: str = "pow2"
    first_last_bits: int = 8
    abits: int = 32
    # exact, shift, none or auto (renorm.renormalize). exact is the default after pruning too:
    # over the 10 pruning rows of docs/results/pruning.md it averaged 0.6 points above shift
    # (shift won resnet18's filter rows, exact mobilenet_v2's).
    renorm: str = "exact"
    num_images: int = 1000
    act_images: int = 400
    act_method: str = "minmax"  # how each activation range is chosen: see renorm.quantize.activations.METHODS
    batch_size: int = 50
    chunk: int = 64
    seed: int = 0
    exclude: tuple[str, ...] = ()
    prune: float = 0.0
    prune_type: str = "unstructured"
    prune_scope: str = "layer"
    prune_importance: str = "l1"
    prune_budget: str = "filters"
    prune_exclude: tuple[str, ...] = ()
    prune_first_last: bool = False
    prune_depthwise: bool = False
    layer_bits: tuple[tuple[str, int], ...] = ()  # (pattern, bits): see renorm.quantize.plan
    avg_bits: float | None = None  # allocate bits per layer to this average (label-free sensitivity)
    reconstruct: str = "none"  # a method of renorm.reconstruct, or none
    reconstruct_images: int = 256
    reconstruct_damping: float | str = 0.1  # see ReconstructConfig.damping
    reconstruct_sweeps: int = 0  # see ReconstructConfig.sweeps
    reconstruct_refined: int = 0  # see ReconstructConfig.refined
    sensitivity_images: int = 32  # calibration images that measure each layer's sensitivity for avg_bits
    # torch's CPU threads while compress runs: a number, None (as they are), or "auto": renorm.device's
    # default_threads() chosen again at the start of every stage, so that a process started during a long
    # stage is seen at the next one; see renorm.device
    threads: int | str | None = None

    def __post_init__(self) -> None:
        if self.renorm not in CHOICES:
            raise RenormError(f"--renorm {self.renorm!r} is not a mode; choose one of {', '.join(CHOICES)}")
        if self.batch_size < 1:
            raise RenormError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_images < 1:
            raise RenormError(f"--num-images must be at least 1, got {self.num_images}")
        if self.chunk < 1:
            raise RenormError(f"--chunk must be at least 1 image, got {self.chunk}")
        if self.abits != 32:
            self.activation_config()
        self.weight_config()
        if self.prune:
            self.prune_config()
        if self.avg_bits is not None:
            check_average_bits(self.avg_bits)
        if self.reconstruct != "none":
            self.reconstruct_config()
        if self.threads is not None and self.threads != "auto":
            if isinstance(self.threads, bool) or not isinstance(self.threads, int):
                raise RenormError(f"threads {self.threads!r}: give a whole number >= 1, None or 'auto'")
            check_threads(self.threads)

    def weight_config(self, extra_bits: tuple[tuple[str, int], ...] = ()) -> WeightQuantConfig:
        return WeightQuantConfig(self.wbits, self.scheme, self.first_last_bits, tuple(self.exclude),
                                 layer_bits=tuple(self.layer_bits) + tuple(extra_bits))

    def activation_config(self) -> ActivationQuantConfig:
        return ActivationQuantConfig(self.abits, self.act_images, seed=self.seed, method=self.act_method)

    def reconstruct_config(self) -> ReconstructConfig:
        return ReconstructConfig(method=self.reconstruct, num_images=self.reconstruct_images, seed=self.seed,
                                 damping=self.reconstruct_damping, sweeps=self.reconstruct_sweeps,
                                 refined=self.reconstruct_refined)

    def prune_config(self):
        from renorm.prune import PruneConfig

        return PruneConfig(self.prune, self.prune_type, self.prune_scope, self.prune_importance,
                           tuple(self.prune_exclude), self.seed, self.prune_budget, self.prune_first_last,
                           self.prune_depthwise)


NOT_EVALUATED = {"source": None, "images": 0,
                 "note": "no evaluation data given (eval_data= / --eval): no stage was evaluated, accuracy is empty"}


@dataclass
class Result:
    """The compressed model and the report (see renorm.report for its keys)."""

    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)


def compress(model: nn.Module | str | LoadedModel, calib: Any, config: Config = Config(),
             eval_data: Any = None, preset: Preset | None = None, progress: bool = False) -> Result:
    """Compress `model` and re-normalize it on the unlabeled `calib` images.

    model: an nn.Module, a LoadedModel, or a model spec (see renorm.models.load_model).
    calib / eval_data: an ImageSource, a data spec string (preprocessed with `preset`, by
    default the model's own), a tensor, or a DataLoader. Labeled eval data gives accuracy;
    unlabeled gives agreement with the FP32 model; without eval_data no stage is
    evaluated (report["accuracy"] is empty and report["evaluation"] says so). Every
    option is checked against the model before any pass over the data. Every stage runs
    on the model's device (move it with .to(device) first); config.threads sets torch's
    CPU threads for the call ("auto": chosen again at the start of every stage).
    """
    with threads(torch.get_num_threads() if config.threads == "auto" else config.threads):
        return _compress(_as_loaded(model), calib, config, eval_data, preset, progress)


def _compress(loaded: LoadedModel, calib: Any, config: Config, eval_data: Any, preset: Preset | None,
              progress: bool) -> Result:
    fp32 = loaded.model  # never modified, never switched to eval mode: see renorm.forward.eval_mode
    if loaded.source.get("kind") == "onnx" or type(fp32).__name__ == "OnnxModule":
        raise RenormError("an ONNX file can be evaluated but not compressed; compress the PyTorch model "
                          "(torchvision:NAME --weights FILE, or a renorm file) and export it with --onnx")
    if loaded.source.get("kind") == "program" or getattr(fp32, PROGRAM_MARK, False):
        raise RenormError(f"{loaded.spec} holds a traced program (torch.export) of a model renorm has no spec for: "
                          "it can be evaluated but not compressed again; compress the original model instead")
    if isinstance(fp32, torch.jit.ScriptModule):
        raise RenormError("a TorchScript model can be evaluated but not compressed: PyTorch allows no hooks or "
                          "module surgery on it; load the eager model instead (torchvision:NAME --weights FILE)")
    check_layer_names(fp32, config.exclude, "--exclude")
    check_layer_names(fp32, config.prune_exclude, "--prune-exclude")
    preset = preset or loaded.preset
    calib = _as_source(calib, preset, labeled=False)
    if isinstance(calib, ImageSource):
        calib = sample(calib, config.num_images, config.seed)
    else:
        calib = first_images(calib, config.num_images)
    if isinstance(eval_data, str):
        eval_data = _as_source(eval_data, preset, labeled=None)
    example = _check_input_fits(fp32, calib, config, evaluated=eval_data is not None)
    layer_plans(fp32, config.weight_config(), example)  # names every --layer-bits pattern that matches nothing, now
    stages: dict[str, dict] = {}
    accuracy_by_stage: dict[str, dict] = {}
    evaluator = _Evaluator(eval_data, fp32, config.batch_size, progress) if eval_data is not None else None
    if evaluator:
        with _stage(stages, config, "evaluate_fp32"):
            accuracy_by_stage["fp32"] = evaluator(fp32, "evaluate fp32")

    work = copy.deepcopy(fp32).eval()  # the one copy every stage works on in place
    prune_report = bits_report = None
    if config.prune:
        from renorm.prune import prune

        with _stage(stages, config, "prune"):
            example = _example(calib, config, count=config.batch_size)  # traces, and times the pruned model
            work, prune_report = prune(work, config.prune_config(), example=example, inplace=True)
    reference = copy.deepcopy(work) if config.reconstruct != "none" and config.prune else fp32
    weight_config = config.weight_config()
    if config.avg_bits is not None:
        with _stage(stages, config, "allocate_bits"):
            allocation, bits_report = allocate_bits(work, _example(calib, config, count=config.sensitivity_images),
                                                    weight_config, config.avg_bits, progress=progress)
        weight_config = config.weight_config(allocation)
    with _stage(stages, config, "quantize"):
        quantize_weights(work, weight_config, progress, example, inplace=True)
    if config.reconstruct != "none":
        with _stage(stages, config, "reconstruct"):
            reconstruct(work, reference, calib, config.reconstruct_config(), batch_size=config.batch_size,
                        inplace=True, progress=progress)
    if evaluator and (config.wbits != 32 or config.prune):
        with _stage(stages, config, "evaluate_compressed"):
            accuracy_by_stage["compressed"] = evaluator(work, "evaluate compressed")

    with _stage(stages, config, "renormalize"):
        work, batchnorm = renormalize_with_summary(work, calib, config.renorm, reference=fp32,
                                                   batch_size=config.batch_size, chunk=config.chunk, inplace=True,
                                                   progress=progress)
    if evaluator and config.renorm != "none":
        with _stage(stages, config, "evaluate_renormalized"):
            accuracy_by_stage["renormalized"] = evaluator(work, "evaluate renormalized")

    if config.abits != 32:
        with _stage(stages, config, "calibrate_activations"):
            calibrate_activations(work, calib, config.activation_config(), config.batch_size, progress, inplace=True)
        if evaluator:
            with _stage(stages, config, "evaluate_final"):
                accuracy_by_stage["final"] = evaluator(work, "evaluate final")

    report = _report(loaded, preset, fp32, work, config, calib, evaluator, accuracy_by_stage, stages)
    report["batchnorm"] = batchnorm
    if prune_report is not None:
        report["prune"] = prune_report
    if bits_report is not None:
        report["bits"] = bits_report
    return Result(work, report)


@contextmanager
def _stage(stages: dict[str, dict], config: Config, name: str) -> Iterator[dict]:
    """renorm.report.stage, after choosing the thread count again when config.threads is "auto"
    (recorded as the stage's "threads")."""
    chosen = None
    if config.threads == "auto":
        chosen = default_threads()
        torch.set_num_threads(chosen)
    with stage(stages, name) as record:
        if chosen is not None:
            record["threads"] = chosen
        yield record


def _report(loaded: LoadedModel, preset: Preset | None, fp32: nn.Module, work: nn.Module, config: Config,
            calib: Any, evaluator: "_Evaluator | None", accuracy_by_stage: dict, stages: dict) -> dict[str, Any]:
    return {
        "renorm_version": __version__,
        "model": {"spec": loaded.spec, "preset": preset.describe() if preset else None,
                  "parameters": sum(p.numel() for p in fp32.parameters())},
        "config": dataclasses.asdict(config),
        "calibration": _source_info(calib, config.num_images),
        "evaluation": evaluator.info() if evaluator else NOT_EVALUATED,
        "accuracy": accuracy_by_stage,
        "table": accuracy_table(accuracy_by_stage) if accuracy_by_stage else "",
        "stages": stages,
        "weights": weight_quantization_stats(work),
        "activations": activation_quantization_stats(work),
    }


def _as_loaded(model: nn.Module | str | LoadedModel) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, nn.Module):
        return LoadedModel(model, type(model).__name__, None)
    raise RenormError(f"model must be an nn.Module or a model spec, not a {type(model).__name__}")


def _as_source(data: Any, preset: Preset | None, labeled: bool | None) -> Any:
    if isinstance(data, str):
        if preset is None:
            raise RenormError(f"to read {data!r} renorm needs a preprocessing preset for this model: pass "
                              "preset= (e.g. renorm.PRESETS['imagenet'] or renorm.make_preset(...))")
        return open_images(data, preset, labeled=labeled)
    return data


@torch.no_grad()
def _check_input_fits(model: nn.Module, calib: Any, config: Config, evaluated: bool) -> torch.Tensor:
    """Fail fast, before any pass over the data, when the images do not fit the model (or, when
    stages are evaluated, its output holds no class scores); return the example image."""
    example = _example(calib, config)
    with eval_mode(model):
        output = forward(model, example)
    if evaluated:
        as_logits(output)
    return example


def _example(calib: Any, config: Config, count: int = 1) -> torch.Tensor:
    """The first `count` calibration images, as one batch."""
    return Batches(calib, config.batch_size).first(count)


def _source_info(data: Any, requested: int) -> dict[str, Any]:
    if isinstance(data, ImageSource):
        return {"source": data.name, "images_requested": requested,
                "images_used": len(data) - len(data.skipped), "skipped": len(data.skipped),
                "skipped_files": list(data.skipped)}
    info = {"source": type(data).__name__, "images_requested": requested}
    return {**info, "images_used": len(data)} if isinstance(data, torch.Tensor) else info


class _Evaluator:
    """Evaluates each stage on the same data; caches the FP32 logits for agreement."""

    def __init__(self, data: Any, fp32: nn.Module, batch_size: int, progress: bool):
        self.data, self.fp32, self.batch_size, self.progress = data, fp32, batch_size, progress
        self.reference_logits: torch.Tensor | None = None
        self.labeled = False
        self.count = 0

    def __call__(self, model: nn.Module, desc: str) -> dict[str, float]:
        logits, labels = predict(model, self.data, self.batch_size, self.progress, desc)
        if self.reference_logits is None:
            self.reference_logits = logits if model is self.fp32 else predict(self.fp32, self.data, self.batch_size)[0]
        self.labeled, self.count = labels is not None, images_counted(logits, across_processes=True)
        if labels is not None:
            return accuracy(logits, labels, across_processes=True)
        return agreement(logits, self.reference_logits, across_processes=True)

    def info(self) -> dict[str, Any]:
        name = self.data.name if isinstance(self.data, ImageSource) else type(self.data).__name__
        skipped = len(self.data.skipped) if isinstance(self.data, ImageSource) else 0
        return {"source": name, "images": self.count, "labeled": self.labeled, "skipped": skipped,
                "metric": "accuracy" if self.labeled else "agreement with the FP32 model"}
