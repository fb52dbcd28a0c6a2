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
# W4 uniform 88.13 -> 91.20 after re-normalization, +A8 91.23.
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
}
