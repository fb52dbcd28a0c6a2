"""ONNX export: integer weights in the graph, integer kernels in ONNX Runtime, parity with renorm's model."""
from __future__ import annotations

import copy
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SmallNet, perturbed, write_image
from renorm import cli
from renorm.api import Config, compress
from renorm.data import open_images, sample
from renorm.errors import RenormError
from renorm.evaluate import agreement, predict
from renorm.layers import quantizable_layers
from renorm.models import load_model
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations, input_quantizer
from renorm.quantize.weights import ATTRIBUTE, WeightQuantConfig, code_values, quantize_weights
from renorm.renormalize import renormalize

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from renorm.export.onnx_qdq import export_onnx  # noqa: E402
from renorm.export.onnx_runtime import OnnxModule, integer_operators  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")


def _small_w8a8(images: torch.Tensor, bits: int = 8, scheme: str = "uniform", abits: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize_weights(perturbed(SmallNet()), WeightQuantConfig(bits=bits, scheme=scheme, first_last_bits=8))
    model = renormalize(model, images, "exact", batch_size=32)
    if abits:
        model = calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=96), batch_size=32)
    return model


def _initializers(path) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def _assert_within_one_step(model, path, images, classifier: str, agreement: float) -> None:
    """ONNX Runtime's logits within one output quantization step of the classifier's input, which moves a logit
    by at most |w|_1 * scale, and the same top-1 on at least `agreement` of the images."""
    with torch.no_grad():
        expected = model(images)
    got = OnnxModule(path)(images)
    step = input_quantizer(model, classifier).scale * float(getattr(model, classifier).weight.abs().sum(1).max())
    assert float((got - expected).abs().max()) < step
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= agreement


def test_small_model_runs_in_onnxruntime_like_the_simulation(tmp_path, images):
    model = _small_w8a8(images)
    path = tmp_path / "small.onnx"
    summary = export_onnx(model, path, images[:1], calib=images)
    assert summary["int8_weights"] == 4 and summary["folded_batchnorms"] == 3
    _assert_within_one_step(model, path, images, "fc2", 0.95)


def test_the_graph_holds_integer_weights_not_float_ones(tmp_path, images):
    model = _small_w8a8(images, bits=4, scheme="pow2", abits=False)
    path = tmp_path / "w4.onnx"
    export_onnx(model, path, images[:1])
    initializers = _initializers(path)
    proto = onnx.load(str(path))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert f"{name}.weight" not in initializers  # no float copy left
        integers = initializers[f"{name}.weight_quantized"]
        assert integers.dtype == np.int8
        quantized = getattr(getattr(model, name), ATTRIBUTE)
        levels = code_values(quantized.codes, quantized.scheme).numpy()
        # BatchNorm folding may flip a channel's sign (a negative gamma), never its codes' magnitudes
        assert np.array_equal(np.abs(integers), np.abs(levels).astype(np.int8))
        scale = initializers[f"{name}.weight_scale"]
        assert scale.shape == (integers.shape[0],) and (scale > 0).all()
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert {n.input[0] for n in dequantize} >= {f"{name}.weight_quantized" for name in ("conv1", "conv2", "fc1", "fc2")}
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]


class Residual(nn.Module):
    """conv-bn-relu, max pool, a residual add then ReLU, a concatenation, average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.bn2(self.conv2(x)) + x)
        z = torch.cat([y, self.bn3(self.conv3(x))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def test_adds_concatenations_and_pools_compute_in_onnxruntime_what_renorm_simulates(tmp_path, images):
    """README: the simulation and ONNX Runtime agree within one quantization step on a net with an add, a
    concatenation and pools, every one of them quantized in both; the Add runs as an integer kernel."""
    torch.manual_seed(0)
    model = quantize_weights(perturbed(Residual()), WeightQuantConfig(bits=8, scheme="uniform", first_last_bits=8))
    model = calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=96), batch_size=32)
    path = tmp_path / "residual.onnx"
    summary = export_onnx(model, path, images[:1])
    # the image, ReLU and max pool (one quantizer), the add's conv input and ReLU output, the other concatenated
    # conv, the concatenation, the average pool and the flatten after it (one quantizer)
    assert summary["float_add_inputs"] == 0 and summary["quantized_tensors"] == 9
    _assert_within_one_step(model, path, images, "fc", 0.99)
    operators = integer_operators(path)
    assert operators.get("QLinearAdd") == 1 and operators.get("QLinearConv") == 3, operators
    assert not any(operators.get(op) for op in FLOAT_OPS), operators


def test_with_quantized_inputs_each_channel_is_stretched_by_a_whole_factor(tmp_path, images):
    """README: levels times the largest whole number that keeps them within int8; the int32 bias steps shrink."""
    model = _small_w8a8(images, bits=4, scheme="uniform")
    path = tmp_path / "w4a8.onnx"
    export_onnx(model, path, images[:1])
    initializers = _initializers(path)
    for name in ("conv2", "fc1"):
        integers = initializers[f"{name}.weight_quantized"].astype(np.int32).reshape(len(initializers[f"{name}.weight_scale"]), -1)
        quantized = getattr(getattr(model, name), ATTRIBUTE)
        levels = np.abs(code_values(quantized.codes, quantized.scheme).numpy().reshape(len(integers), -1)).astype(np.int32)
        peak = levels.max(1)
        factor = np.where(peak > 0, 127 // np.maximum(peak, 1), 1)
        assert (factor > 1).any()  # 4-bit levels (|level| <= 7) are stretched 18x
        assert np.array_equal(np.abs(integers), levels * factor[:, None])
        assert np.abs(integers).max() <= 127
        assert initializers[f"{name}.bias_quantized"].dtype == np.int32


class Branchy(SmallNet):
    """Does not trace with torch.fx (control flow on a tensor's value): BatchNorm is paired by hooks."""

    def forward(self, x):
        if float(x.mean()) > 1e9:
            x = x * 2
        return super().forward(x)


def test_batchnorm_is_folded_in_a_model_that_does_not_trace(tmp_path, images):
    torch.manual_seed(0)
    model = perturbed(Branchy())
    summary = export_onnx(model, tmp_path / "b.onnx", images[:1])
    assert summary["folded_batchnorms"] == 3
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(OnnxModule(tmp_path / "b.onnx")(images), expected, atol=1e-4)


def test_a_model_that_does_not_trace_keeps_its_own_activation_scales(tmp_path, images):
    """Its input hooks are what renorm calibrated (here with `mse`): export, even given images, writes those."""
    torch.manual_seed(0)
    model = quantize_weights(perturbed(Branchy()), WeightQuantConfig(bits=8, scheme="uniform", first_last_bits=8))
    model = calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=96, method="mse"),
                                  batch_size=32)
    scales = {name: input_quantizer(model, name).scale for name, _ in quantizable_layers(model)}
    minmax = calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=96), batch_size=32)
    assert any(input_quantizer(minmax, name).scale != scale for name, scale in scales.items())  # the test can fail
    summary = export_onnx(model, tmp_path / "b.onnx", images[:1], calib=images)
    assert not summary["recalibrated"]
    written = {float(v) for k, v in _initializers(tmp_path / "b.onnx").items() if v.size == 1 and v.dtype == np.float32}
    assert all(any(abs(scale - w) <= 1e-6 * scale for w in written) for scale in scales.values()), (scales, written)
    _assert_within_one_step(model, tmp_path / "b.onnx", images, "fc2", 0.9)


def test_export_leaves_the_model_alone(tmp_path, images):
    model = _small_w8a8(images)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        outputs = model(images)
    export_onnx(model, tmp_path / "m.onnx", images[:1], calib=images)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.bn1.__class__.__name__ == "BatchNorm2d" and input_quantizer(model, "conv1") is not None
    with torch.no_grad():
        assert torch.equal(model(images), outputs)


def test_six_bit_pow2_weights_are_refused(tmp_path, images):
    model = _small_w8a8(images, bits=6, scheme="pow2", abits=False)
    with pytest.raises(RenormError, match="beyond int8"):
        export_onnx(model, tmp_path / "m.onnx", images[:1])
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- the reference models
@pytest.fixture(scope="module")
def fashion():
    loaded = load_model("fmnist-resnet18")
    calib = sample(open_images("fashion-mnist-mini:train", loaded.preset, labeled=False), 300)
    test = open_images("fashion-mnist-mini:test", loaded.preset)
    return calib, test


@pytest.fixture(scope="module")
def resnet_w4a8(fashion, tmp_path_factory):
    """fmnist-resnet18 at W4A8 pow2 (300 calibration images), exported."""
    calib, _ = fashion
    loaded = load_model("fmnist-resnet18")
    model = compress(loaded, calib, Config(wbits=4, scheme="pow2", abits=8, num_images=300, act_images=200)).model
    folder = tmp_path_factory.mktemp("resnet")
    summaries = {"calib": export_onnx(model, folder / "calib.onnx", calib.load(0)[0][None], spec=loaded.spec,
                                      preset=loaded.preset, num_classes=10)}
    return loaded, model, folder, summaries


def _parity(model, path, test) -> float:
    torch_logits, labels = predict(model, test, 500)
    onnx_logits, _ = predict(OnnxModule(path), test, 500)
    assert len(labels) == 3000
    return agreement(onnx_logits, torch_logits)["agreement_top1"]


def test_resnet18_w4a8_agrees_with_its_onnx_file(fashion, resnet_w4a8):
    """The bundled subset (3000 test images): ONNX Runtime's top-1 agrees with renorm's model on >= 99.5%."""
    _, model, folder, _ = resnet_w4a8
    assert _parity(model, folder / "calib.onnx", fashion[1]) >= 99.5


def test_mobilenet_v2_w4a8_agrees_with_its_onnx_file(tmp_path, fashion):
    calib, test = fashion
    loaded = load_model("fmnist-mobilenet_v2")
    model = compress(loaded, calib, Config(wbits=4, scheme="uniform", abits=8, num_images=300, act_images=200)).model
    path = tmp_path / "mobilenet.onnx"
    export_onnx(model, path, calib.load(0)[0][None], calib=calib)
    assert _parity(model, path, test) >= 99.5
    operators = integer_operators(path)
    assert operators["QLinearConv"] == 52 and operators["QLinearAdd"] == 10 and operators["QGemm"] == 1
    assert sum(operators.get(op, 0) for op in FLOAT_OPS) == 0


def test_resnet18_runs_every_conv_as_an_integer_kernel(resnet_w4a8):
    _, _, folder, summaries = resnet_w4a8
    # renorm's own points: conv inputs, the 8 residual Adds' inputs and outputs, both pools' inputs and outputs
    assert summaries["calib"]["float_add_inputs"] == 0
    fused = integer_operators(folder / "calib.onnx")
    assert fused["QLinearConv"] == 20 and fused["QLinearAdd"] == 8 and fused["QGemm"] == 1
    assert fused["QLinearGlobalAveragePool"] == 1
    assert sum(fused.get(op, 0) for op in FLOAT_OPS) == 0


# --------------------------------------------------------------------------- the command line
def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_export_and_evaluate_an_onnx_file(tmp_path, capsys, resnet_w4a8):
    from renorm.export import save_compressed

    loaded, model, _, _ = resnet_w4a8
    out = tmp_path / "m.pt"
    save_compressed(out, model, loaded)
    digest = _digest(out)
    path = tmp_path / "m.onnx"
    assert cli.main(["export", str(out), "--onnx", str(path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "QLinearAdd 8, QLinearConv 20, QLinearGlobalAveragePool 1; float conv/gemm 0" in captured.out
    assert not captured.err  # renorm's own quantizers: nothing to calibrate at export
    assert _digest(out) == digest  # the input is never modified
    assert cli.main(["evaluate", str(path), "--data", "fashion-mnist-mini:test", "--reference", str(out),
                     "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["evaluation"]["images"] == 3000 and report["model"]["preset"]["name"] == "fashion-mnist"
    assert report["accuracy"]["model"]["agreement_top1"] >= 99.5 and report["accuracy"]["model"]["top1"] > 85
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt", "r.json"]


def _older_file(tmp_path, model, loaded):
    """A file as renorm wrote it before graph points: signed/unsigned input quantizers on conv/linear layers."""
    from renorm.export import save_compressed

    save_compressed(tmp_path / "new.pt", model, loaded)
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    payload.pop("activation_points")
    payload["activations"] = {name: {"scale": q.scale, "signed": q.signed, "bits": 8, "relative_error": 0.0}
                              for name, _ in quantizable_layers(model) if (q := input_quantizer(model, name)) is not None}
    torch.save(payload, tmp_path / "old.pt")
    return tmp_path / "old.pt"


def test_a_file_from_an_older_renorm_exports_float_adds_or_recalibrates(tmp_path, capsys, resnet_w4a8):
    loaded, model, _, _ = resnet_w4a8
    old = _older_file(tmp_path, model, loaded)
    reloaded = load_model(str(old)).model
    assert reloaded.conv1._renorm_act.zero_point == 128  # signed levels -127..127 -> uint8 around 128
    assert cli.main(["export", str(old), "--onnx", str(tmp_path / "float-adds.onnx"), "--quiet"]) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["renorm: warning: 12 residual Add or pool inputs stay float and the convs before them run in "
                       "float: the model's quantizers sit on conv/linear inputs only (an older renorm file); add "
                       "--calib IMAGES"]
    assert integer_operators(tmp_path / "float-adds.onnx")["QLinearConv"] == 9
    assert cli.main(["export", str(old), "--onnx", str(tmp_path / "again.onnx"), "--calib",
                     "fashion-mnist-mini:train", "--num-images", "64", "--quiet", "--report",
                     str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["onnx"]["recalibrated"]
    assert "QLinearAdd 8, QLinearConv 20" in capsys.readouterr().out


def test_cli_compress_writes_the_onnx_file_too(tmp_path, capsys):
    torch.save(perturbed(SmallNet()), tmp_path / "net.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        write_image(photos / f"{i}.png", size=(20, 20), seed=i)
    assert cli.main(["compress", str(tmp_path / "net.pt"), "--trust-pickle", "--resize", "16", "--crop", "16",
                     "--calib", str(photos), "--wbits", "8", "--scheme", "uniform", "--abits", "8",
                     "--onnx", str(tmp_path / "net.onnx"), "--quiet"]) == 0
    # conv2 feeds a mean (a pooling): renorm quantizes its input, so conv2 ends in a QuantizeLinear and fuses
    assert "ONNX Runtime runs QGemm 2, QLinearConv 2; float conv/gemm 0" in capsys.readouterr().out
    assert OnnxModule(tmp_path / "net.onnx")(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_onnx_missing_gives_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code = cli.main(["compress", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--onnx",
                     str(tmp_path / "m.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'renorm[deploy]'" in err[0]
    assert not list(tmp_path.iterdir())


def test_an_onnx_file_is_refused_for_compression_and_export(tmp_path, images, capsys):
    path = tmp_path / "m.onnx"
    export_onnx(_small_w8a8(images), path, images[:1])
    for argv in (["compress", str(path), "--calib", "fashion-mnist-mini:train", "--quiet"],
                 ["export", str(path), "--onnx", str(tmp_path / "again.onnx"), "--quiet"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("not compressed" in err[0] or "already an ONNX file" in err[0]), err
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


class PaddedNet(nn.Module):
    """conv -> ReLU6 -> zero F.pad -> depthwise conv: TensorFlow-style "same" padding (EfficientNet-Lite)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu6(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.conv2(F.pad(x, (0, 1, 0, 1)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_a_conv_before_a_zero_pad_runs_as_an_integer_kernel(tmp_path, images):
    """The pad's input is quantized with the pad's own quantizer (exact: zero is a level), so the conv
    before it ends in a QuantizeLinear; before, EfficientNet-Lite0 kept 17 such convs in float."""
    torch.manual_seed(0)
    model = quantize_weights(perturbed(PaddedNet()), WeightQuantConfig(bits=8, scheme="uniform", first_last_bits=8))
    model = calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=96), batch_size=32)
    path = tmp_path / "padded.onnx"
    export_onnx(model, path, images[:1], calib=images)
    operators = integer_operators(path)
    assert operators.get("QLinearConv", 0) == 2 and not any(operators.get(op) for op in FLOAT_OPS), operators
    with torch.no_grad():
        expected = model(images)
    assert float((OnnxModule(path)(images).argmax(1) == expected.argmax(1)).float().mean()) >= 0.95
