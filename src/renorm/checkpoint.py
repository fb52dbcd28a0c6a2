"""Model files and what rebuilds a model: `LoadedModel`, state_dicts applied with clear errors.

The floor below `models` (model specs) and `export` (renorm's own files): both read
and apply state_dicts, and a `LoadedModel` is what one loads and the other saves.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from renorm.errors import RenormError, one_line
from renorm.images import Preset


@dataclass
class LoadedModel:
    """A model with what is needed to preprocess its input and to rebuild it later."""

    model: nn.Module
    spec: str
    preset: Preset | None
    num_classes: int | None = None
    source: dict[str, Any] = field(default_factory=dict)


def load_state_dict_file(model: nn.Module, path: Path, what: str) -> None:
    """Load a state_dict (or a checkpoint holding one) safely into `model`, with clear errors."""
    if not path.exists():
        raise RenormError(f"weights file {path} does not exist")
    state = read_torch_file(path, "weights file", untrusted="holds more than tensors (a pickled object); save "
                            "model.state_dict() instead, or load the whole module as MODEL with --trust-pickle")
    state = find_state_dict(state)
    if state is None:
        raise RenormError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint with "
                          "'state_dict' / 'model' in it)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    apply_state_dict(model, state, f"weights {path.name}", what)


def read_torch_file(path: Path, what: str, trust_pickle: bool = False, untrusted: str = "") -> Any:
    """torch.load(path) on the CPU; whole pickled objects only with trust_pickle (unpickling runs code).

    A file that is not a torch file at all (an image, text, an empty file...) is named as
    such before torch reads it. untrusted: the rest of the message when the file holds
    pickled objects and trust_pickle is False.
    """
    found = describe_file(path)
    if found is not None:
        raise RenormError(f"{what} {path} is {found}, not a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise RenormError(f"{path} {untrusted}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for damaged files
        raise RenormError(f"cannot read {what} {path}: {one_line(error)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise RenormError(f"cannot read {what} {path}, even trusting its pickles: {one_line(error)}") from None


_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
          (b"RIFF", "a RIFF file (a WebP image?)"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
          (b"\x93NUMPY", "a NumPy array file"), (b"\x89HDF", "an HDF5 file (a Keras model?)"))


def describe_file(path: Path) -> str | None:
    """None when `path` can be a torch file (a zip archive or a pickle); else what it is, in words."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return None if zipfile.is_zipfile(path) else "a damaged or truncated zip archive (a torch file cut short?)"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return None  # a pickle: torch's legacy format
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file (renorm reads torch.save files)"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "a text file"
    return "neither a zip archive nor a pickle"


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str, what: str) -> None:
    """model.load_state_dict(state) with a one-line error that names the mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch in {len(mismatched)} tensors (first: {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise RenormError(f"{name} do not fit {what}: {'; '.join(parts)}; check the architecture "
                          "and --num-classes")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            found = find_state_dict(obj.get(key))
            if found is not None:
                return found
    return None
