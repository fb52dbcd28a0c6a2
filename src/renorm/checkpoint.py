"""Model files and what rebuilds a model: `LoadedModel`, state_dicts applied with clear errors.

The floor below `models` (model specs) and `export` (renorm's own files): both read
and apply state_dicts, and a `LoadedModel` is what one loads and the other saves.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from renorm.errors import RenormError
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RenormError(f"{path} holds more than tensors (a pickled object); save model.state_dict() "
                          "instead, or load the whole module as MODEL with --trust-pickle") from None
    except Exception as error:  # noqa: BLE001
        raise RenormError(f"cannot read weights file {path}: {error}") from None
    state = find_state_dict(state)
    if state is None:
        raise RenormError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint with "
                          "'state_dict' / 'model' in it)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    apply_state_dict(model, state, f"weights {path.name}", what)


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
