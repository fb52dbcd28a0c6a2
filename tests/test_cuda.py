"""On a CUDA GPU: every stage runs there, its state lives there, and it gives what the CPU gives.

Skipped where PyTorch sees no GPU (CI has none). On a GPU machine:
    python -m pytest -q -s tests/test_cuda.py
(-s prints the CPU/GPU differences each test measures.) GPU convolutions may use TF32, and
reductions run in another order, so the comparisons allow the small differences that makes.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import SmallNet, perturbed
from renorm.api import Config, compress
from renorm.data import open_images, sample
from renorm.evaluate import evaluate
from renorm.models import load_model
from renorm.prune import PruneConfig, prune
from renorm.quantize.weights import ATTRIBUTE, QuantizedWeight
from renorm.reconstruct import ReconstructConfig, reconstruct
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import batchnorm_layers

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore")]
GPU = torch.device("cuda")


@pytest.fixture(scope="module")
def data():
    preset = load_model("fmnist-mobilenet_v2").preset
    return (sample(open_images("fashion-mnist-mini:train", preset, labeled=False), 500, seed=0),
            open_images("fashion-mnist-mini:test", preset, labeled=True))


def quantized_layers(model):
    return {name: getattr(module, ATTRIBUTE) for name, module in model.named_modules()
            if isinstance(getattr(module, ATTRIBUTE, None), QuantizedWeight)}


def test_the_whole_pipeline_runs_on_the_gpu_and_matches_the_cpu(data):
    """Quantize, reconstruct, re-normalize, calibrate activations, evaluate: on cuda, as on the CPU."""
    calib, test = data
    config = Config(wbits=3, scheme="uniform", abits=8, reconstruct="gptq", num_images=500, act_images=200,
                    reconstruct_images=256)
    cpu = compress(load_model("fmnist-mobilenet_v2"), calib, config, test)
    loaded = load_model("fmnist-mobilenet_v2")
    loaded.model.to(GPU)
    gpu = compress(loaded, calib, config, test)
    assert all(t.device.type == "cuda" for t in gpu.model.state_dict().values())
    assert next(loaded.model.parameters()).device.type == "cuda"  # the caller's model stays where it was put
    for stage, numbers in cpu.report["accuracy"].items():
        print(f"{stage}: cpu {numbers['top1']:.2f} gpu {gpu.report['accuracy'][stage]['top1']:.2f}")
        assert abs(numbers["top1"] - gpu.report["accuracy"][stage]["top1"]) <= 0.5, stage
    codes_cpu, codes_gpu = quantized_layers(cpu.model), quantized_layers(gpu.model)
    assert codes_cpu.keys() == codes_gpu.keys() and codes_cpu
    same = sum(int((codes_cpu[n].codes == codes_gpu[n].codes.cpu()).sum()) for n in codes_cpu)
    total = sum(codes_cpu[n].codes.numel() for n in codes_cpu)
    print(f"reconstructed codes equal on cpu and gpu: {100 * same / total:.3f}%")
    # measured on an H200: 93.2% (cuDNN convolutions use TF32 by default, so the inputs differ by ~1e-3
    # relative; a near-tie rounded the other way moves the error feedback of the columns after it)
    assert same / total >= 0.90
    bn_cpu, bn_gpu = dict(batchnorm_layers(cpu.model)), dict(batchnorm_layers(gpu.model))
    worst = max(float(((bn_gpu[n].running_var.cpu() - bn.running_var).abs() / bn.running_var.abs().clamp_min(1e-6)).max())
                for n, bn in bn_cpu.items())
    print(f"largest relative difference of a re-normalized variance, gpu vs cpu: {worst:.2e}")


def test_weight_quantization_and_renormalization_alone_agree_closely(data):
    """Without reconstruction or activations the only differences are float rounding."""
    calib, _ = data
    config = Config(wbits=4, scheme="pow2", num_images=300)
    cpu = compress(load_model("fmnist-resnet18"), calib, config).model
    loaded = load_model("fmnist-resnet18")
    gpu = compress(loaded.model.to(GPU), calib, config).model
    for (name, a), (_, b) in zip(quantized_layers(cpu).items(), quantized_layers(gpu).items()):
        assert torch.equal(a.codes, b.codes.cpu()), name
        torch.testing.assert_close(a.scale, b.scale.cpu(), rtol=1e-5, atol=0)
    bn_gpu = dict(batchnorm_layers(gpu))
    worst = 0.0
    for name, bn in batchnorm_layers(cpu):
        other = bn_gpu[name]
        worst = max(worst, float(((other.running_mean.cpu() - bn.running_mean).abs()
                                  / bn.running_var.sqrt().clamp_min(1e-6)).max()))
        worst = max(worst, float(((other.running_var.cpu() - bn.running_var).abs() / bn.running_var.clamp_min(1e-6)).max()))
    print(f"re-normalized statistics, gpu vs cpu: largest relative difference {worst:.2e}")
    assert worst < 1e-2


def test_state_moves_to_the_gpu_and_back_with_its_codes():
    torch.manual_seed(0)
    model = quantize_weights(perturbed(SmallNet()), WeightQuantConfig(4, "pow2", first_last_bits=8))
    before = {n: (q.codes.clone(), q.scale.clone()) for n, q in quantized_layers(model).items()}
    model.to(GPU)
    for name, q in quantized_layers(model).items():
        assert q.codes.device.type == "cuda" and q.scale.device.type == "cuda"
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.weight, q.dequantize().to(layer.weight.dtype))
    model.cpu()
    for name, q in quantized_layers(model).items():
        assert torch.equal(q.codes, before[name][0]) and torch.equal(q.scale, before[name][1])


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_reconstruction_on_the_gpu_keeps_moments_in_float64_and_lowers_the_error(method, images):
    torch.manual_seed(0)
    reference = perturbed(SmallNet()).to(GPU)
    quantized = quantize_weights(copy.deepcopy(reference), WeightQuantConfig(3, "uniform", first_last_bits=8))
    x = images.to(GPU)
    error_before = float((quantized(x) - reference(x)).pow(2).mean())
    rebuilt = reconstruct(quantized, reference, images, ReconstructConfig(method=method, num_images=96, steps=200))
    error_after = float((rebuilt(x) - reference(x)).pow(2).mean())
    print(f"{method} on cuda: output error {error_before:.4g} -> {error_after:.4g}")
    assert error_after < error_before
    assert all(q.codes.device.type == "cuda" for q in quantized_layers(rebuilt).values())


def test_filter_pruning_measures_latency_on_the_gpu():
    model = torchvision.models.resnet18(num_classes=10).eval().to(GPU)
    example = torch.randn(8, 3, 64, 64)
    pruned, report = prune(copy.deepcopy(model), PruneConfig(0.5, "filter"), example=example, latency_repeats=3)
    assert next(pruned.parameters()).device.type == "cuda"
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    print(f"resnet18 at 64 px, batch 8, on the GPU: {report['latency_ms_before']:.2f} ms -> "
          f"{report['latency_ms_after']:.2f} ms after removing half the filters")


def test_evaluation_with_decoding_workers_on_the_gpu(data):
    _, test = data
    model = load_model("fmnist-resnet18").model
    on_cpu = evaluate(model, test, batch_size=100)
    on_gpu = evaluate(copy.deepcopy(model).to(GPU), test, batch_size=100)
    print(f"fmnist-resnet18 top-1 cpu {on_cpu['top1']:.2f} gpu {on_gpu['top1']:.2f}")
    assert abs(on_cpu["top1"] - on_gpu["top1"]) <= 0.1


def test_the_command_line_on_cuda(tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-c", "from renorm.cli import main; raise SystemExit(main())", "compress",
               "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--num-images", "300", "--wbits", "4",
               "--abits", "8", "--act-images", "100", "--eval", "fashion-mnist-mini:test", "--device", "cuda",
               "--report", str(report), "--out", str(tmp_path / "model.renorm"), "--onnx", str(tmp_path / "m.onnx"),
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    numbers = json.loads(report.read_text())
    print("command line on cuda:", {k: v["top1"] for k, v in numbers["accuracy"].items()},
          numbers.get("runtime", numbers.get("device")))
    assert numbers["accuracy"]["final"]["top1"] >= 90.0
    assert numbers["runtime"]["device"] == "cuda:0"
    print("peak GPU memory by stage (MiB):", {k: v.get("peak_gpu_mb") for k, v in numbers["stages"].items()})
    assert any("peak_gpu_mb" in record for record in numbers["stages"].values())
    loaded = load_model(str(tmp_path / "model.renorm"))  # a file written from the GPU loads on the CPU
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_bits_allocation_and_pruning_run_on_the_gpu(data):
    """--avg-bits (label-free sensitivity on the GPU) and filter pruning + re-normalization, on cuda."""
    calib, test = data
    results = {}
    for device in ("cpu", "cuda"):
        loaded = load_model("fmnist-mobilenet_v2")
        loaded.model.to(device)
        config = Config(wbits=4, scheme="uniform", avg_bits=3.5, sensitivity_images=16, num_images=200,
                        prune=0.2, prune_type="filter")
        result = compress(loaded, calib, config, test)
        results[device] = result
        assert next(result.model.parameters()).device.type == device
    bits = [{row["layer"]: row["bits"] for row in results[d].report["weights"]} for d in ("cpu", "cuda")]
    print("bits chosen on cpu and gpu equal:", bits[0] == bits[1],
          {d: results[d].report["accuracy"]["renormalized"]["top1"] for d in results})
    assert abs(results["cpu"].report["accuracy"]["renormalized"]["top1"]
               - results["cuda"].report["accuracy"]["renormalized"]["top1"]) <= 1.0
