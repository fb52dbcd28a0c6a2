"""Saving and loading compressed models.

A renorm file is a plain torch.save of tensors, numbers and strings (it loads with
weights_only=True, so opening one runs no code), its zip entries deflated (torch.load
reads them as they are; 11-20% smaller than torch.save's stored entries on the
benchmarks' models): how to rebuild the architecture, the
preprocessing preset, the state_dict without the quantized weights, and for each
quantized layer its integer codes (packed two per byte at <= 4 bits) and per-channel
scales, the activation quantizers, pruning masks and removed channels.

The architecture is a spec (torchvision, timm, the reference models, EfficientNet-Lite)
where the model came from one; any other model is stored as a torch.export program with
its tensors stripped (renorm.export.program). Only where torch.export cannot trace the
model is the whole module pickled, with a warning; such a file loads with trust_pickle.
"""
from __future__ import annotations

import copy
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from renorm import __version__
from renorm.checkpoint import LoadedModel, apply_state_dict
from renorm.errors import RenormError
from renorm.export.program import NotExportable, export_program, load_program
from renorm.files import check_output, write_atomic
from renorm.images import Preset
from renorm.quantize import activations
from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE, QuantizedWeight, set_mask

FORMAT = 1
SPEC_KINDS = ("torchvision", "timm", "reference", "efficientnet-lite")  # rebuilt from the spec alone


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten int8 codes; at <= 4 bits store two per byte (offset by 8 into 0..15)."""
    flat = codes.reshape(-1).to(torch.int16)
    if bits > 4:
        return flat.to(torch.int8)
    nibbles = (flat + 8).to(torch.uint8)
    if len(nibbles) % 2:
        nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_codes."""
    count = 1
    for size in shape:
        count *= size
    if bits > 4:
        return packed.to(torch.int8).reshape(shape)
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], dim=1).reshape(-1)[:count].to(torch.int8).reshape(shape)


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    """A boolean mask as bits (numpy.packbits) and its shape."""
    import numpy as np

    return {"bits": torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8))),
            "shape": list(mask.shape)}


def unpack_mask(packed: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    count = int(np.prod(packed["shape"])) if packed["shape"] else 1
    bits = np.unpackbits(packed["bits"].numpy())[:count].astype(bool)
    return torch.from_numpy(bits).reshape(packed["shape"])


def save_compressed(path: str | Path, model: nn.Module, loaded: LoadedModel | None = None,
                    preset: Preset | None = None, protected: list[str | Path] = (),
                    example: torch.Tensor | None = None) -> int:
    """Write `model` to `path` atomically; return the file size in bytes.

    loaded: what `model` was compressed from (renorm.load_model's result: its spec rebuilds
    the architecture); None for a model of one's own, stored as a torch.export program.
    protected: input files that must never be overwritten (the input model, its weights).
    example: a batch of input images to trace a model that no spec names (default: zeros
    of the preset's input size, 224 px without a preset).
    """
    check_output(path, "--out", protected)
    loaded = loaded or LoadedModel(model, type(model).__name__, None)
    kind = loaded.source.get("kind")
    if kind == "torchscript":
        raise RenormError("a TorchScript input cannot be saved as a renorm file; load the model as "
                          "torchvision:NAME --weights FILE to get a file renorm can rebuild")
    preset = preset or loaded.preset
    quantized = {name: q for name, m in model.named_modules() if (q := getattr(m, ATTRIBUTE, None)) is not None}
    skip = {f"{name}.weight" for name in quantized}
    payload: dict[str, Any] = {
        "renorm_format": FORMAT,
        "renorm_version": __version__,
        "spec": loaded.spec,
        "source": dict(loaded.source),
        "num_classes": loaded.num_classes,
        "preset": preset.describe() if preset else None,
        "state_dict": {k: v for k, v in model.state_dict().items() if k not in skip},
        "quantized": {name: {"codes": pack_codes(q.codes, q.bits), "shape": list(q.codes.shape), "scale": q.scale,
                             "scheme": q.scheme, "bits": q.bits, "axis": q.axis,
                             "relative_error": q.relative_error} for name, q in quantized.items()},
        "activations": {name: {"scale": q.scale, "zero_point": q.zero_point, "bits": q.bits,
                               "relative_error": q.relative_error}
                        for name, m in model.named_modules() if (q := getattr(m, activations.ATTRIBUTE, None))},
        "activation_points": activations.activation_points(model),
        "masks": {name: pack_mask(m) for name, module in model.named_modules()
                  if (m := getattr(module, MASK_ATTRIBUTE, None)) is not None},
        "pruned_channels": getattr(model, "_renorm_pruned_channels", None),
    }
    if kind not in SPEC_KINDS:
        payload.update(_architecture_without_spec(model, loaded, preset, example))
    content = payload
    if payload.get("pickled_module"):  # the module without its quantizers: they are restored from the payload
        bare = copy.deepcopy(model)
        activations.detach(bare)
        content = {**payload, "module": bare}
    return write_atomic(path, lambda handle: handle.write(deflated_torch_save(content)))


def deflated_torch_save(content: Any) -> bytes:
    """torch.save(content) with every zip entry deflated: the same archive, which torch.load reads as it is."""
    stored = io.BytesIO()
    torch.save(content, stored)
    stored.seek(0)
    packed = io.BytesIO()
    with zipfile.ZipFile(stored) as source, \
            zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as target:
        for entry in source.infolist():  # torch's order: data.pkl first, then the tensors' records
            target.writestr(entry.filename, source.read(entry.filename))
    return packed.getvalue()


def _architecture_without_spec(model: nn.Module, loaded: LoadedModel, preset: Preset | None,
                               example: torch.Tensor | None) -> dict[str, Any]:
    """The payload entries that rebuild a model no spec names: a torch.export program, else (warned) a pickle."""
    if example is None:
        size = preset.input_size if preset else 224
        example = torch.zeros(2, 3, size, size)
    example = example.detach().cpu().float()
    if len(example) < 2:  # traced on one image, the program would take batches of one alone
        example = torch.cat([example[:1], example[:1]])
    try:
        program = export_program(model, example)
    except NotExportable as error:
        warnings.warn(f"torch.export cannot trace {type(model).__name__} ({error}); the file pickles the whole "
                      "module instead (larger; loading it needs --trust-pickle)", stacklevel=3)
        return {"source": {**loaded.source, "kind": "pickle"}, "pickled_module": True}
    return {"source": {"kind": "program", "class": f"{type(model).__module__}.{type(model).__qualname__}",
                       "from": loaded.source.get("kind"), "torch": str(torch.__version__)},
            "program": torch.frombuffer(bytearray(program), dtype=torch.uint8)}


def load_compressed(payload: dict[str, Any], path: Path, build: Callable[[dict[str, Any]], nn.Module],
                    trust_pickle: bool = False) -> LoadedModel:
    """Rebuild a model written by save_compressed (payload as read by torch.load).

    build: turns the file's "source" record into the bare architecture (renorm.models
    passes its own builder, so this module never imports that one).
    """
    if payload.get("renorm_format") != FORMAT:
        raise RenormError(f"{path} was written by a renorm with file format {payload.get('renorm_format')}; "
                          f"this renorm reads format {FORMAT}")
    source = payload["source"]
    kind = source.get("kind")
    if kind == "pickle":
        if not trust_pickle:
            raise RenormError(f"{path} holds a pickled module; pass --trust-pickle if you trust it")
        model = torch.load(path, map_location="cpu", weights_only=False)["module"]
    elif kind == "program":
        model = load_program(payload["program"].numpy().tobytes(), str(path))
    else:
        model = build(source)
    if payload.get("pruned_channels") and kind != "program":  # a program has the pruned shapes already
        from renorm.prune import apply_pruned_channels

        apply_pruned_channels(model, payload["pruned_channels"])
    state = dict(payload["state_dict"])
    modules = dict(model.named_modules())
    restored: dict[str, QuantizedWeight] = {}
    for name, entry in payload["quantized"].items():
        if name not in modules:
            raise RenormError(f"{path} quantizes a layer {name!r} that the rebuilt model lacks")
        codes = unpack_codes(entry["codes"], entry["bits"], tuple(entry["shape"]))
        restored[name] = QuantizedWeight(codes, entry["scale"], entry["scheme"], entry["bits"], entry["axis"],
                                         entry.get("relative_error", float("nan")))
        state[f"{name}.weight"] = restored[name].dequantize()
    apply_state_dict(model, state, f"the contents of {path.name}", payload["spec"])
    for name, quantized in restored.items():
        setattr(modules[name], ATTRIBUTE, quantized)
    for name, mask in payload.get("masks", {}).items():
        set_mask(modules[name], unpack_mask(mask))
    for name, entry in payload.get("activations", {}).items():
        # files before zero points held "signed" (levels -127..127): zero point 2^(bits-1) on 0..2^bits-1
        zero_point = entry["zero_point"] if "zero_point" in entry else (2 ** (entry["bits"] - 1) if entry["signed"] else 0)
        quantizer = activations.ActivationQuantizer(entry["scale"], zero_point, entry["bits"],
                                                    entry.get("relative_error", float("nan")))
        if kind == "program":  # the program quantizes already; kept for the record (reports) only
            setattr(modules[name], activations.ATTRIBUTE, quantizer)
        else:
            activations.attach(modules[name], quantizer)
    if payload.get("activation_points") and kind != "program":
        activations.install_points(model, payload["activation_points"])
    if payload.get("pruned_channels"):
        model._renorm_pruned_channels = payload["pruned_channels"]
    preset = Preset(**{**payload["preset"], "mean": tuple(payload["preset"]["mean"]),
                       "std": tuple(payload["preset"]["std"])}) if payload.get("preset") else None
    model.eval()
    return LoadedModel(model, str(path), preset, payload.get("num_classes"), {"kind": "renorm", **source})
