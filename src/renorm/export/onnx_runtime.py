"""Running an ONNX file in onnxruntime: sessions, the runtime's own kernels, and an nn.Module wrapper.

`OnnxModule` runs a file through onnxruntime as an nn.Module, so every evaluation path
of renorm takes an ONNX file as it takes a PyTorch model. `integer_operators` counts the
operators of the graph ONNX Runtime's CPU provider actually runs (after its fusions):
QLinearConv / QLinearAdd / QGemm where it found integer kernels, Conv where it did not.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from renorm.errors import RenormError, one_line

METADATA_KEY = "renorm"
DEPLOY_HINT = "pip install 'renorm[deploy]' (onnx and onnxruntime)"


def require(module: str) -> Any:
    """Import onnx or onnxruntime, or raise a RenormError that names the extra to install."""
    try:
        return __import__(module)
    except ImportError:
        raise RenormError(f"ONNX export and evaluation need {module}: {DEPLOY_HINT}") from None


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime CPU InferenceSession of `path` (optionally writing the graph the runtime optimized)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's problem
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise RenormError(f"onnxruntime cannot load {path}: {one_line(error)[:300]}") from None


def integer_operators(path: str | Path) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime's CPU provider runs for `path` (after its fusions)."""
    onnx = require("onnx")
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        session(path, threads=1, optimized_path=optimized)
        counts = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return dict(sorted(counts.items()))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The renorm metadata of an ONNX file (spec, preset, num_classes), or {} for a foreign file."""
    onnx = require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001
        raise RenormError(f"cannot read ONNX file {path}: {one_line(error)[:200]}") from None
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, as an nn.Module taking and returning float tensors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.session = session(path, threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().to(torch.float32).numpy()
        try:
            outputs = self.session.run(None, {self.input_name: array})
        except Exception as error:  # noqa: BLE001 - becomes renorm.forward's one-line explanation
            raise RuntimeError(" ".join(str(error).split())) from None
        return torch.from_numpy(outputs[0])

    def extra_repr(self) -> str:
        return self.path
