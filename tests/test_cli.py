"""The `renorm` command line: bad input exits 2 with one line; real runs write reports and models."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import write_image

pytestmark = pytest.mark.filterwarnings("ignore")


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "renorm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("renorm: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(6):
        write_image(root / f"{i}.jpg", size=(48, 40), seed=i)
    return root


def test_missing_model_file(folder):
    assert_clean_error(run("compress", "/nonexistent/model.pt", "--calib", str(folder)), "unknown model")


def test_unknown_spec(folder):
    assert_clean_error(run("compress", "torchvision:resnet19", "--calib", str(folder)), "resnet19")


def test_weights_that_do_not_fit(tmp_path, folder):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "w.pt")
    assert_clean_error(run("compress", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt"),
                           "--calib", str(folder)), "do not fit", "--num-classes")


@pytest.mark.parametrize("bits", ["1", "9"])
def test_weight_bits_out_of_range(bits, folder):
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(folder), "--wbits", bits,
                           "--scheme", "uniform"), f"--wbits {bits}")


def test_empty_and_missing_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(tmp_path / "empty")), "no images")
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(tmp_path / "gone")), "does not exist")


def test_images_of_the_wrong_size_for_the_model(tmp_path, folder):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 3))
    torch.save(model, tmp_path / "fixed.pt")
    assert_clean_error(run("compress", str(tmp_path / "fixed.pt"), "--trust-pickle", "--calib", str(folder),
                           "--resize", "40", "--crop", "40", "--wbits", "8", "--scheme", "uniform", "--quiet"),
                       "do not fit the model", "--crop")


def test_pickle_without_trust(tmp_path, folder):
    torch.save(torchvision.models.resnet18(num_classes=2), tmp_path / "m.pt")
    assert_clean_error(run("compress", str(tmp_path / "m.pt"), "--calib", str(folder)), "--trust-pickle")


def test_bad_flags_and_pruning_values(folder):
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(folder), "--renorm", "magic"), "magic")
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(folder), "--prune", "1.5"), "[0, 1)")
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(folder), "--prune", "0.5",
                           "--prune-exclude", "layer9"), "layer9")
    assert_clean_error(run("compress", "torchvision:resnet18", "--calib", str(folder), "--wbits", "four"), "four")
    assert_clean_error(run("compress", "torchvision:resnet18"), "--calib")


def test_out_never_overwrites_the_input(tmp_path, folder):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    before = (tmp_path / "w.pt").read_bytes()
    result = run("compress", "torchvision:resnet18", "--num-classes", "3", "--weights", str(tmp_path / "w.pt"),
                 "--calib", str(folder), "--resize", "32", "--crop", "32", "--out", str(tmp_path / "w.pt"), "--quiet")
    assert_clean_error(result, "input of this run")
    assert (tmp_path / "w.pt").read_bytes() == before


def test_compress_then_evaluate_the_saved_model(tmp_path, folder):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "w.pt")
    common = ["--resize", "32", "--crop", "32", "--quiet"]
    result = run("compress", "torchvision:resnet18", "--num-classes", "4", "--weights", str(tmp_path / "w.pt"),
                 "--calib", str(folder), "--eval", str(folder), "--wbits", "4", "--abits", "8", "--batch-size", "4",
                 "--out", str(tmp_path / "q.pt"), "--report", str(tmp_path / "r.json"), *common)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["accuracy"]) == {"fp32", "compressed", "renormalized", "final"}
    assert set(report["accuracy"]["final"]) == {"agreement_top1", "agreement_top5", "kl"}
    assert report["accuracy"]["fp32"]["agreement_top1"] == 100.0
    assert report["calibration"]["images_used"] == 6
    assert report["batchnorm"]["layers_updated"] == 20
    assert len(report["weights"]) == 21 and report["stages"]["renormalize"]["seconds"] > 0
    assert "| stage |" in result.stdout
    evaluated = run("evaluate", str(tmp_path / "q.pt"), "--data", str(folder), "--reference", "torchvision:resnet18",
                    "--num-classes", "4", "--weights", str(tmp_path / "w.pt"), "--report", str(tmp_path / "e.json"),
                    *common)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "e.json").read_text())["accuracy"]["model"]
    assert again["agreement_top1"] == pytest.approx(report["accuracy"]["final"]["agreement_top1"])
    assert again["kl"] == pytest.approx(report["accuracy"]["final"]["kl"], rel=1e-4)


def test_unreadable_calibration_files_are_counted_and_named(tmp_path, folder):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    result = run("compress", "torchvision:resnet18", "--num-classes", "3", "--calib", str(tmp_path), "--wbits", "32",
                 "--resize", "32", "--crop", "32", "--quiet", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    calibration = json.loads((tmp_path / "r.json").read_text())["calibration"]
    assert calibration["skipped"] == 1 and calibration["skipped_files"][0].endswith("broken.png")
    assert calibration["images_used"] == 3
    assert "1 unreadable" in result.stdout


def test_torchscript_can_be_evaluated_but_not_compressed(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(tmp_path / "ts.pt"))
    assert_clean_error(run("compress", str(tmp_path / "ts.pt"), "--calib", "fashion-mnist-mini:train",
                           "--preset", "fashion-mnist", "--quiet"), "TorchScript")
    result = run("evaluate", str(tmp_path / "ts.pt"), "--data", "fashion-mnist-mini:test", "--preset",
                 "fashion-mnist", "--quiet", "--batch-size", "500")
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout
