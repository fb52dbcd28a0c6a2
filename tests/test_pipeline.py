"""End to end on real data: the reference models on the bundled Fashion-MNIST subset.

Floors measured with this code on fashion-mnist-mini (3000 test images, calibration on
1000 of the 2000 bundled training images); see the numbers in the comments.
"""
from __future__ import annotations

import json

import pytest

from renorm.api import Config, compress
from renorm.data import open_images
from renorm.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def data():
    preset = load_model("fmnist-resnet18").preset
    return (open_images("fashion-mnist-mini:train", preset, labeled=False),
            open_images("fashion-mnist-mini:test", preset, labeled=True))


def run(model: str, data, **config) -> dict:
    calib, test = data
    return compress(model, calib, Config(**config), test).report["accuracy"]


def test_resnet18_w4_pow2_recovers_with_renormalization(data):
    accuracy = run("fmnist-resnet18", data, wbits=4, scheme="pow2")
    fp32, before, after = (accuracy[k]["top1"] for k in ("fp32", "compressed", "renormalized"))
    assert fp32 >= FLOORS["resnet18_fp32"]
    assert after >= fp32 - FLOORS["resnet18_w4_gap"]
    assert after > before


def test_resnet18_w2_uniform_needs_renormalization(data):
    accuracy = run("fmnist-resnet18", data, wbits=2, scheme="uniform", abits=8)
    before, after, final = (accuracy[k]["top1"] for k in ("compressed", "renormalized", "final"))
    assert before <= FLOORS["resnet18_w2_before_max"]
    assert after >= FLOORS["resnet18_w2_after"]
    assert final >= after - 1.5


def test_mobilenet_v2_w4a8(data):
    accuracy = run("fmnist-mobilenet_v2", data, wbits=4, scheme="uniform", abits=8)
    assert accuracy["fp32"]["top1"] >= FLOORS["mobilenet_fp32"]
    assert accuracy["final"]["top1"] >= FLOORS["mobilenet_w4a8"]


@pytest.mark.parametrize("bits", [3, 2])
def test_mobilenet_v2_low_bits_with_reconstruction(data, bits):
    """--reconstruct (GPTQ) before re-normalization: far above round-to-nearest + re-normalization."""
    accuracy = run("fmnist-mobilenet_v2", data, wbits=bits, scheme="uniform", reconstruct="gptq")
    reconstructed, renormalized = accuracy["compressed"]["top1"], accuracy["renormalized"]["top1"]
    assert reconstructed >= FLOORS[f"mobilenet_w{bits}_reconstructed"]
    assert renormalized >= FLOORS[f"mobilenet_w{bits}_reconstructed_renormalized"]


def test_pruning_then_renormalization(data):
    accuracy = run("fmnist-resnet18", data, wbits=32, prune=0.7)
    assert accuracy["compressed"]["top1"] <= FLOORS["resnet18_p70_before_max"]
    assert accuracy["renormalized"]["top1"] >= FLOORS["resnet18_p70_after"]


def test_demo_writes_the_accuracy_contract(tmp_path, monkeypatch):
    from renorm import cli

    monkeypatch.setattr("renorm.data.FASHION_MNIST_DIR", tmp_path / "absent")  # force the bundled subset
    assert cli.main(["demo", "--quiet", "--report", str(tmp_path / "demo.json")]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert set(report["accuracy"]) == {"fp32", "compressed", "renormalized", "final"}
    assert report["evaluation"]["source"] == "fashion-mnist-mini:test"
    assert report["calibration"]["images_used"] == 1000
    final = report["accuracy"]["final"]
    assert final["top1"] >= report["accuracy"]["fp32"]["top1"] - FLOORS["demo_final_gap"]
    assert report["accuracy"]["renormalized"]["top1"] > report["accuracy"]["compressed"]["top1"]


# Measured on fashion-mnist-mini with this code (python /tmp/floors.py-style runs of the tests'
# own configurations; the CI machine printed the same numbers): resnet18 FP32 92.97;
# W4 pow2 92.43 -> 92.57 after exact re-normalization; W2 uniform 38.77 -> 91.80, +A8 91.93;
# 70% unstructured 83.70 -> 91.67; demo final (W4A8) 92.53. mobilenet_v2: FP32 91.40;
# W4 uniform 88.13 -> 91.20 after re-normalization, +A8 91.23. With --reconstruct gptq (Config(wbits=B,
# scheme="uniform", reconstruct="gptq"): this test's own configuration, commit 7a98f8a, damping 0.1): W3 90.97
# after reconstruction, 90.63 after exact re-normalization (round-to-nearest: 57.63 -> 90.57); W2 89.03 / 88.50
# (round-to-nearest: 9.63 -> 86.00). With damping 0.01 (commit 53dc4e1): W3 91.13 / 90.77, W2 88.97 / 88.70.
FLOORS = {
    "resnet18_fp32": 92.5,
    "resnet18_w4_gap": 0.8,
    "resnet18_w2_before_max": 50.0,
    "resnet18_w2_after": 90.5,
    "resnet18_p70_before_max": 88.0,
    "resnet18_p70_after": 90.5,
    "demo_final_gap": 1.0,
    "mobilenet_fp32": 90.5,
    "mobilenet_w4a8": 90.0,
    "mobilenet_w3_reconstructed": 90.7,
    "mobilenet_w3_reconstructed_renormalized": 90.3,
    "mobilenet_w2_reconstructed": 88.3,
    "mobilenet_w2_reconstructed_renormalized": 88.0,
}
