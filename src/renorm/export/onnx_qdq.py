"""ONNX export: an INT8 QDQ graph that ONNX Runtime runs with integer kernels, and a runner for it.

`export_onnx` writes the model renorm simulates in float as a graph of explicit
QuantizeLinear/DequantizeLinear (QDQ) pairs:
  - every BatchNorm that directly follows a conv/linear layer is folded into it; the fold
    multiplies each output channel by gamma/sqrt(var+eps), so it changes only the
    per-channel scale (and the sign of the codes), never the integer codes;
  - each quantized weight is an int8 initializer (renorm's levels: uniform codes, or the
    pow2 levels +-2^k, which fit int8 up to 4 bits; each channel stretched by the
    largest whole factor that stays in int8) with per-channel scales, dequantized by
    DequantizeLinear(axis = output channels); the bias of a layer whose input is
    quantized too is int32 with scale input_scale * weight_scale, as the integer
    kernel adds it;
  - each tensor renorm quantizes (see renorm.quantize.points: conv/linear inputs, the
    inputs and output of residual Adds and concatenations, the input and output of
    pooling) is a QuantizeLinear/DequantizeLinear pair in the graph, written by the ONNX
    exporter from renorm's own fake quantization (uint8, renorm's scale and zero point),
    so that ONNX Runtime computes what renorm's PyTorch model computes; a ReLU6 Clip whose
    quantizer saturates at 6 anyway becomes a Relu (exact).
ONNX Runtime's CPU provider then turns DQ -> Conv -> Q into QLinearConv and DQ -> Add
-> Q into QLinearAdd; `onnx_runtime.integer_operators` counts what the runtime made of a file.
A model whose quantizers are input hooks (a file written before renorm had graph points, or a
model torch.fx cannot trace) gets a pair on each conv/linear input only; its Add and pool
inputs stay float, unless `calib` images are given: then its activations are calibrated
again, on the graph points.

`renorm.export.onnx_runtime` runs such a file (and counts the runtime's kernels).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from renorm import __version__
from renorm.errors import RenormError, one_line
from renorm.files import check_output, write_atomic
from renorm.images import Preset
from renorm.quantize import activations
from renorm.quantize import points as graph_points
from renorm.export.fold import fold_batchnorms
from renorm.export.onnx_runtime import METADATA_KEY, OnnxModule, require
from renorm.export.program import MARK as PROGRAM_MARK
from renorm.quantize.weights import ATTRIBUTE, code_values

OPSET = 17


# --------------------------------------------------------------------------- preparing the model
def _int8_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (int8 levels, per-channel scale, output axis) of every quantized layer."""
    found = {}
    for name, module in model.named_modules():
        quantized = getattr(module, ATTRIBUTE, None)
        if quantized is None:
            continue
        values = code_values(quantized.codes, quantized.scheme)
        if float(values.abs().max()) > 127:
            raise RenormError(f"layer {name!r} has {quantized.bits}-bit {quantized.scheme} weights whose levels reach "
                              f"{float(values.abs().max()):g}, beyond int8; ONNX export takes pow2 weights up to "
                              "4 bits and uniform up to 8 bits (--wbits / --layer-bits)")
        found[name] = (values.to(torch.int8), quantized.scale.detach().to(torch.float32).clone(), quantized.axis)
    return found


def _input_quantizers(model: nn.Module) -> dict[str, activations.ActivationQuantizer]:
    """Input-hook quantizers by layer name; checks that every activation quantizer (hooks, points) is 8-bit."""
    found = {name: q for name, m in model.named_modules() if (q := getattr(m, activations.ATTRIBUTE, None))}
    everything = {**found, **{p["point"]: p for p in activations.activation_points(model)}}
    for name, quantizer in everything.items():
        quantizer = activations.ActivationQuantizer(**{k: quantizer[k] for k in ("scale", "zero_point", "bits")}) \
            if isinstance(quantizer, dict) else quantizer
        if quantizer.bits != 8:
            raise RenormError(f"the input of {name!r} is quantized to {quantizer.bits} bits; ONNX export takes "
                              "8-bit activations (--abits 8) or float ones (--abits 32)")
    return found


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """Send what C++ code writes to the process's stdout and stderr to /dev/null for the block."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _to_float_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """torch.onnx.export of the prepared float model, as an onnx ModelProto (batch size left free)."""
    onnx = require("onnx")
    buffer = io.BytesIO()
    # The TorchScript-based exporter: it writes parameters under their module names, which is how the
    # quantized layers are found in the graph. Its C++ log (a whole IR dump on failure, printed whatever
    # the verbosity) goes to /dev/null: the one-line error says what failed.
    with warnings.catch_warnings(), _silenced_output():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              do_constant_folding=True, verbose=False)
        except RenormError:
            raise
        except Exception as error:  # noqa: BLE001 - the exporter raises many kinds
            message = one_line(error).split(" Torch IR graph")[0]
            raise RenormError(f"the model cannot be exported to ONNX: {message[:300]}") from None
    return onnx.load_from_string(buffer.getvalue())


# --------------------------------------------------------------------------- editing the graph
class _GraphEditor:
    """Adds QDQ nodes and integer initializers to an exported float graph, keeping it topologically sorted."""

    def __init__(self, proto: Any):
        import onnx

        self.onnx, self.proto, self.graph = onnx, proto, proto.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.before: dict[int, list[Any]] = {}  # node index -> new nodes to put just before it
        self.head: list[Any] = []  # new nodes that read only initializers
        self._constants_to_initializers()

    def _constants_to_initializers(self) -> None:
        """The exporter writes the scales and zero points of renorm's quantizers as Constant nodes: make
        them initializers, where the rest of the editing (and ONNX Runtime's fusions) look for them."""
        readers = {name for node in self.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                   for name in node.input[1:]}
        for node in list(self.graph.node):
            if node.op_type == "Constant" and node.output[0] in readers and node.attribute[0].name == "value":
                array = self.onnx.numpy_helper.to_array(node.attribute[0].t)
                self.graph.node.remove(node)
                self.constant(node.output[0], array)

    def consumers(self, tensor: str) -> list[tuple[int, Any]]:
        return [(i, node) for i, node in enumerate(self.graph.node) if tensor in node.input]

    def producer(self, tensor: str) -> Any | None:
        return next((node for node in self.graph.node if tensor in node.output), None)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(self.onnx.numpy_helper.from_array(array, name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def array(self, name: str) -> np.ndarray:
        return self.onnx.numpy_helper.to_array(self.initializers[name])

    def drop_initializer(self, name: str) -> None:
        if not self.consumers(name):
            self.graph.initializer.remove(self.initializers.pop(name))

    def dequantized(self, name: str, integers: np.ndarray, scale: np.ndarray, axis: int) -> str:
        """A DequantizeLinear of integer initializers (per-channel along `axis`); returns its output's name."""
        inputs = [self.constant(f"{name}_quantized", integers), self.constant(f"{name}_scale", scale.astype(np.float32)),
                  self.constant(f"{name}_zero_point", np.zeros(scale.shape, integers.dtype))]
        self.head.append(self.onnx.helper.make_node("DequantizeLinear", inputs, [f"{name}_dequantized"],
                                                    name=f"{name}_DequantizeLinear", axis=axis))
        return f"{name}_dequantized"

    def qdq(self, tensor: str, quantizer: activations.ActivationQuantizer, before: int) -> str:
        """tensor -> QuantizeLinear -> DequantizeLinear, uint8 with the quantizer's zero point; returns the
        DQ output's name (uint8 activations with int8 weights are ONNX Runtime's fast path on x86)."""
        scale = self.constant(f"{tensor}_scale", np.array(quantizer.scale, np.float32))
        zero = self.constant(f"{tensor}_zero_point", np.array(quantizer.zero_point, np.uint8))
        helper = self.onnx.helper
        self.before.setdefault(before, []).extend([
            helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_quantized"], name=f"{tensor}_Q"),
            helper.make_node("DequantizeLinear", [f"{tensor}_quantized", scale, zero], [f"{tensor}_dequantized"],
                             name=f"{tensor}_DQ")])
        return f"{tensor}_dequantized"

    def finish(self) -> None:
        nodes = list(self.head)
        for i, node in enumerate(self.graph.node):
            nodes.extend(self.before.get(i, []))
            nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)


_WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Ops whose float inputs the export quantizes too (scales fitted on calibration images): a residual
# Add and the global pool before the classifier, so the convs that feed them run as integer kernels.
_INTEGER_READERS = ("Add", "GlobalAveragePool")


def _find_layer_node(editor: _GraphEditor, name: str, expected: np.ndarray) -> Any | None:
    """The node that uses layer `name`'s weight: by the initializer's name, else by its values."""
    for node in editor.graph.node:
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] == f"{name}.weight":
            return node
    for node in editor.graph.node:
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in editor.initializers:
            array = editor.array(node.input[1])
            if np.array_equal(array, expected) or (array.ndim == 2 and np.array_equal(array, expected.T)):
                return node
    return None


def _activation_points(editor: _GraphEditor, layers: dict[str, Any], inputs: dict) -> tuple[dict, list[str]]:
    """(tensor -> quantizer) for every quantized tensor, and the Add / pool inputs that still need a scale.

    A tensor read by several quantized layers is quantized once, with the first one's
    quantizer (renorm fits the same scale on the same tensor). A ReLU output that only a
    MaxPool reads, whose output is quantized unsigned, gets the same quantizer (exact).
    """
    tensors: dict[str, activations.ActivationQuantizer] = {}
    for name, node in layers.items():
        if name in inputs:
            tensors.setdefault(node.input[0], inputs[name])
    for node in editor.graph.node:
        quantizer = tensors.get(node.output[0]) if node.op_type == "MaxPool" else None
        source = editor.producer(node.input[0]) if quantizer is not None and not quantizer.signed else None
        if source is not None and source.op_type == "Relu" and len(editor.consumers(node.input[0])) == 1:
            tensors.setdefault(node.input[0], quantizer)
    for node in editor.graph.node:
        # a zero Pad in front of a quantized layer (TensorFlow-style "same" padding): quantize its input
        # too, with the same quantizer (zero is a level, so Q(pad(x)) = pad(Q(x)) exactly), so that the
        # layer before it can end in a QuantizeLinear and run as an integer kernel
        quantizer = tensors.get(node.output[0]) if node.op_type == "Pad" else None
        if quantizer is not None and _zero_pad(editor, node) and len(editor.consumers(node.input[0])) == 1:
            tensors.setdefault(node.input[0], quantizer)
    missing = [t for node in editor.graph.node if node.op_type in _INTEGER_READERS for t in node.input
               if t not in tensors and t not in editor.initializers] if inputs else []
    return tensors, list(dict.fromkeys(missing))


def _zero_pad(editor: _GraphEditor, node: Any) -> bool:
    """A constant-mode Pad whose fill value is zero (or absent)."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant"):
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    fill = node.input[2]
    if fill in editor.initializers:
        return bool(np.all(editor.array(fill) == 0))
    source = editor.producer(fill)
    if source is not None and source.op_type == "Constant":
        return bool(np.all(editor.onnx.numpy_helper.to_array(source.attribute[0].t) == 0))
    return False


def _insert_activation_pairs(editor: _GraphEditor, tensors: dict, layers: dict[str, Any], inputs: dict) -> None:
    """One Q/DQ pair per quantized tensor, read by its quantized layers and by every Add and MaxPool
    that reads the tensor (so that each runs on integers, as in an INT8 graph)."""
    quantized_layer_nodes = {id(node) for name, node in layers.items() if name in inputs}

    def reads(node: Any, slot: int) -> bool:
        return node.op_type in (*_INTEGER_READERS, "MaxPool") or (slot == 0 and id(node) in quantized_layer_nodes) \
            or (node.op_type == "Pad" and slot == 0 and node.output[0] in tensors and _zero_pad(editor, node))

    for tensor, quantizer in tensors.items():
        readers = [(i, node, slot) for i, node in editor.consumers(tensor)
                   for slot, name in enumerate(node.input) if name == tensor and reads(node, slot)]
        if not readers:
            continue
        if len(readers) == len(editor.consumers(tensor)):  # nothing reads the float tensor any more
            _drop_saturated_clip(editor, tensor, quantizer.scale, quantizer.zero_point)
        dequantized = editor.qdq(tensor, quantizer, min(i for i, _, _ in readers))
        for _, node, slot in readers:
            node.input[slot] = dequantized


def _drop_saturated_clip(editor: _GraphEditor, tensor: str, scale: float, zero_point: int) -> None:
    """Clip(0, hi) -> Q becomes Relu -> Q when hi already rounds to the top level (exact).

    renorm's fitted scale after a ReLU6 is often a hair above 6/255; ONNX Runtime then keeps
    the Clip, and the conv before it cannot run as an integer kernel. When round(hi / scale)
    + zero_point is the top level, Q saturates wherever Clip would have cut: the Clip is redundant.
    """
    node = editor.producer(tensor)
    if node is None or node.op_type != "Clip" or len(node.input) < 3:
        return
    bounds = [editor.array(name) if name in editor.initializers else None for name in node.input[1:3]]
    if any(bound is None or bound.size != 1 for bound in bounds) or float(bounds[0]) != 0.0:
        return
    if round(float(bounds[1]) / scale) + zero_point >= 255:
        node.op_type = "Relu"
        del node.input[1:]


def _drop_saturated_clips(editor: _GraphEditor) -> None:
    """_drop_saturated_clip for every Clip that only QuantizeLinear nodes read (renorm's graph points)."""
    for node in list(editor.graph.node):
        if node.op_type != "Clip":
            continue
        readers = [reader for _, reader in editor.consumers(node.output[0])]
        if readers and all(r.op_type == "QuantizeLinear" and r.input[0] == node.output[0] for r in readers):
            scales = {(float(editor.array(r.input[1])), int(editor.array(r.input[2])))
                      for r in readers if r.input[1] in editor.initializers and r.input[2] in editor.initializers}
            if len(scales) == 1 and len(readers) == len({r.name for r in readers}):
                _drop_saturated_clip(editor, node.output[0], *scales.pop())


def _point_scales(editor: _GraphEditor, layers: dict[str, Any]) -> dict[str, activations.ActivationQuantizer]:
    """Layer name -> the quantizer of its input, read from the DequantizeLinear that feeds it."""
    found = {}
    for name, node in layers.items():
        source = editor.producer(node.input[0])
        if source is not None and source.op_type == "DequantizeLinear" and source.input[1] in editor.initializers:
            zero = int(editor.array(source.input[2])) if len(source.input) > 2 and source.input[2] else 0
            found[name] = activations.ActivationQuantizer(float(editor.array(source.input[1])), zero, 8)
    return found


def _stretch_levels(integers: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels * k, scale / k) per channel, k the largest whole number with |levels * k| <= 127."""
    moved = np.moveaxis(integers.astype(np.int32), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1) if moved.size else np.zeros(0, np.int32)
    factor = np.where(peak > 0, 127 // np.maximum(peak, 1), 1).astype(np.int32)
    stretched = moved * factor.reshape(-1, *[1] * (moved.ndim - 1))
    return np.moveaxis(stretched, 0, axis).astype(np.int8), (scale / factor).astype(np.float32)


def _quantize_weights(editor: _GraphEditor, layers: dict[str, Any], weights: dict,
                      input_quantizers: dict) -> dict[str, int]:
    """Int8 weights (per channel) for every quantized layer; int32 biases where its input is quantized too."""
    counts = {"int8_weights": 0, "int32_biases": 0}
    for name, node in layers.items():
        if name not in weights:
            continue
        values, scale, axis = weights[name]
        integers, weight_name = values.numpy(), node.input[1]
        if editor.array(weight_name).shape != integers.shape:  # a transposed matrix (MatMul, Gemm with transB=0)
            integers, axis = integers.T.copy(), 1
        input_quantizer, scale = input_quantizers.get(name), scale.numpy().copy()
        bias_name = node.input[2] if len(node.input) > 2 else ""
        int32_bias = input_quantizer is not None and node.op_type in ("Conv", "Gemm") and \
            bias_name in editor.initializers and len(editor.consumers(bias_name)) == 1
        if int32_bias:
            # The integer kernel adds the bias in steps of input_scale * weight_scale: stretch each channel's
            # levels by the largest whole factor that keeps them in int8 (exact), so those steps are finer.
            integers, scale = _stretch_levels(integers, scale, axis)
            # A channel whose codes are all 0 may carry any weight scale; one that makes its bias (the
            # channel's whole output) exact to 2^-20 relative, not whatever scale the fit left there.
            dead = ~np.any(integers.reshape(integers.shape[0], -1) != 0, axis=1) if axis == 0 else \
                ~np.any(integers != 0, axis=0)
            bias = editor.array(bias_name)
            scale[dead] = np.maximum(np.abs(bias[dead]), 1e-12) / (input_quantizer.scale * 2 ** 20)
        node.input[1] = editor.dequantized(weight_name, integers, scale, axis)
        editor.drop_initializer(weight_name)
        counts["int8_weights"] += 1
        if int32_bias:
            bias_scale = (input_quantizer.scale * scale).astype(np.float32)
            integers = np.clip(np.round(editor.array(bias_name) / bias_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
            node.input[2] = editor.dequantized(bias_name, integers, bias_scale, 0)
            editor.drop_initializer(bias_name)
            counts["int32_biases"] += 1
    return counts


def _quantize_graph(proto: Any, model: nn.Module, weights: dict, inputs: dict) -> dict[str, Any]:
    editor = _GraphEditor(proto)
    modules = dict(model.named_modules())
    layers = {}
    for name in dict.fromkeys([*weights, *inputs]):
        node = _find_layer_node(editor, name, modules[name].weight.detach().numpy())
        if node is None:
            raise RenormError(f"the exported graph has no node for the quantized layer {name!r} (the exporter "
                              "merged or renamed it); ONNX export cannot keep its integer weights")
        layers[name] = node
    if inputs:  # input hooks (an older file, or a model torch.fx cannot trace): pairs on conv/linear inputs
        tensors, missing = _activation_points(editor, layers, inputs)
        input_quantizers = {name: tensors[node.input[0]] for name, node in layers.items() if node.input[0] in tensors}
        _insert_activation_pairs(editor, tensors, layers, inputs)
        quantized = len(tensors)
    else:  # renorm's graph points: the exporter wrote their Q/DQ pairs
        _drop_saturated_clips(editor)
        input_quantizers = _point_scales(editor, layers)
        quantized = sum(node.op_type == "QuantizeLinear" for node in editor.graph.node)
        missing = []
    summary = {**_quantize_weights(editor, layers, weights, input_quantizers), "quantized_tensors": quantized,
               "float_add_inputs": len(missing)}
    editor.finish()
    return summary


# --------------------------------------------------------------------------- the public functions
def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None, *, calib: Any = None,
                calib_images: int = 256, batch_size: int = 50, spec: str | None = None,
                preset: Preset | None = None, num_classes: int | None = None,
                protected: list[str | Path | None] = ()) -> dict[str, Any]:
    """Write `model` (as renorm.compress or the stages leave it) to `path` as an INT8 QDQ ONNX graph.

    example: one or more input images (only their shape matters; the batch size stays
    free in the file); by default the first calibration image. calib: unlabeled images
    (anything renorm.Batches takes); for a model whose activation quantizers are input
    hooks although torch.fx traces it (a file from an older renorm), its first
    `calib_images` calibrate the activations again, on every tensor an INT8 graph
    quantizes (else the residual Add and pool inputs stay float). A model calibrated by
    this renorm, or one torch.fx cannot trace, is exported with its own quantizers.
    spec / preset / num_classes go into the file's metadata so that `renorm evaluate
    FILE.onnx` preprocesses images as the model expects. protected: input files never to
    overwrite. The model is not modified.
    Returns a summary: path, bytes, folded BatchNorms, int8 weights, quantized tensors.
    """
    check_output(path, "--onnx", protected)
    onnx = require("onnx")
    if isinstance(model, OnnxModule):
        raise RenormError(f"{model.path} is already an ONNX file; export the PyTorch model it came from")
    if getattr(model, PROGRAM_MARK, False):
        raise RenormError("a model rebuilt from a torch.export program cannot be exported to ONNX by renorm (its "
                          "layers are a traced graph); give --onnx to the renorm compress run of the original model")
    if isinstance(model, torch.jit.ScriptModule):
        raise RenormError("a TorchScript model cannot be exported to ONNX by renorm (its quantizers and "
                          "BatchNorms cannot be edited); load the eager model instead")
    if example is None:
        if calib is None:
            raise RenormError("export_onnx needs example= (a batch of input images) or calib= (images)")
        from renorm.data import Batches

        example = Batches(calib, 1).first(1)
    prepared = copy.deepcopy(model).eval()
    weights = _int8_weights(prepared)
    inputs = _input_quantizers(prepared)
    # input hooks on a model torch.fx traces: a file from an older renorm, calibrated again on the graph's points;
    # on a model it cannot trace they are what this renorm calibrates (with the user's method), kept as they are
    recalibrated = bool(inputs) and calib is not None and graph_points.trace(prepared) is not None
    if recalibrated:
        activations.calibrate_activations(prepared, calib, activations.ActivationQuantConfig(
            bits=8, num_images=calib_images), batch_size, inplace=True)
        inputs = _input_quantizers(prepared)
    for module in prepared.modules():  # input hooks become explicit pairs below; graph points stay
        if getattr(module, activations.ATTRIBUTE, None) is not None:
            activations.detach_input(module)
    folded = fold_batchnorms(prepared, weights, example[:1].to(torch.float32))
    proto = _to_float_graph(prepared, example[:1].to(torch.float32))
    summary = _quantize_graph(proto, prepared, weights, inputs)
    summary["recalibrated"] = recalibrated
    metadata = {"renorm_version": __version__, "spec": spec, "num_classes": num_classes,
                "preset": preset.describe() if preset else None}
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    proto.producer_name, proto.producer_version = "renorm", __version__
    try:
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001
        raise RenormError(f"the ONNX graph renorm built is invalid ({one_line(error)[:200]}); please report it") from None
    data = proto.SerializeToString()
    size = write_atomic(path, lambda handle: handle.write(data))
    return {"path": str(path), "bytes": size, "folded_batchnorms": folded, **summary}
