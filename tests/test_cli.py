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
    """End to end in a fresh process; tests/test_bad_inputs.py runs the whole bad-input matrix in process."""
    assert_clean_error(run("compress", "/nonexistent/model.pt", "--calib", str(folder)), "unknown model")


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
                    "--reference-num-classes", "4", "--reference-weights", str(tmp_path / "w.pt"),
                    "--report", str(tmp_path / "e.json"), *common)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "e.json").read_text())["accuracy"]["model"]
    assert again["agreement_top1"] == pytest.approx(report["accuracy"]["final"]["agreement_top1"])
    assert again["kl"] == pytest.approx(report["accuracy"]["final"]["kl"], rel=1e-4)


def test_renorm_auto_names_its_choice_and_the_scores_behind_it(tmp_path):
    result = run("compress", "fmnist-mobilenet_v2", "--calib", "fashion-mnist-mini:train", "--num-images", "300",
                 "--renorm", "auto", "--quiet", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    batchnorm = json.loads((tmp_path / "r.json").read_text())["batchnorm"]
    assert batchnorm["mode"] == "auto" and batchnorm["scored_images"] == 256 and set(batchnorm["kl"]) == {
        "exact", "shift", "none"}
    assert batchnorm["chosen"] == min(batchnorm["kl"], key=batchnorm["kl"].get)
    assert batchnorm["layers_updated"] == (0 if batchnorm["chosen"] == "none" else 52)
    assert f"re-normalization: auto chose {batchnorm['chosen']} (KL to FP32 on 256 calibration images" in result.stdout


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


# --------------------------------------------------------------------------- in-process: the contracts of each command
def main(capsys, *args: str) -> tuple[int, str, str]:
    from renorm import cli

    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_loads_the_reference_with_its_own_weights(tmp_path, folder, capsys):
    """The old evaluate loaded --reference with the model's --weights: two sets of weights of one
    architecture agreed 100%."""
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / name)
    common = ["--resize", "32", "--crop", "32", "--quiet", "--batch-size", "6"]
    code, out, err = main(capsys, "evaluate", "torchvision:resnet18", "--num-classes", "3", "--weights",
                          str(tmp_path / "a.pt"), "--data", str(folder), "--reference", "torchvision:resnet18",
                          "--reference-weights", str(tmp_path / "b.pt"), "--reference-num-classes", "3",
                          "--report", str(tmp_path / "r.json"), *common)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"]["model"]["kl"] > 0.001
    assert report["reference"] == {"spec": "torchvision:resnet18", "weights": str(tmp_path / "b.pt"),
                                   "num_classes": 3}
    code, out, err = main(capsys, "evaluate", "torchvision:resnet18", "--num-classes", "3", "--weights",
                          str(tmp_path / "a.pt"), "--data", str(folder), "--reference", "torchvision:resnet18",
                          "--reference-weights", str(tmp_path / "a.pt"), "--reference-num-classes", "3", *common)
    assert code == 0 and "| model | 100.00 | 100.00 | 0.0000 |" in out, out


def test_sensitivity_readme_example_prints_its_table_and_writes_the_report(tmp_path, capsys, monkeypatch):
    """The README's example died with KeyError: 'skipped' after writing the plot (exit 1, a traceback)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = main(capsys, "sensitivity", "fmnist-resnet18", "--calib", "fashion-mnist:train",
                          "--plot", "s.png", "--num-images", "24", "--sparsities", "0.9", "--quiet",
                          "--report", "r.json")
    assert code == 0, err
    assert "calibration: 24 images from fashion-mnist" in out and "| layer | 90% pruned |" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["sensitivity"]) == 21 and report["calibration"]["skipped"] == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_every_option_has_help_and_choices_show_in_usage(capsys):
    """--seed, --batch-size and --sparsities had no help; choices were not in the usage."""
    from renorm.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"renorm {name} {action.option_strings[0]} has no help"
    usage = commands["compress"].format_help()
    for choices in ("{pow2,uniform,minmax}", "{exact,shift,none,auto}", "{unstructured,filter}", "{l1,l2,bn}"):
        assert choices in usage, choices


def test_first_last_bits_are_named_as_such(capsys, folder):
    """--first-last-bits 1 was reported as '--wbits 1'."""
    code, out, err = main(capsys, "compress", "torchvision:resnet18", "--calib", str(folder), "--first-last-bits", "1")
    assert code == 2 and err.startswith("renorm: error: --first-last-bits 1 is out of range")


def test_layer_name_typos_and_chunk_are_checked_before_any_pass_over_data(capsys, monkeypatch, folder):
    """A typo in --exclude/--prune-exclude or --chunk 0 was reported after the whole FP32 evaluation."""
    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the data ran before the options were checked")

    monkeypatch.setattr("renorm.api.predict", no_pass)  # the FP32 evaluation, the first pass
    base = ["compress", "torchvision:resnet18", "--num-classes", "3", "--calib", str(folder), "--eval", str(folder),
            "--resize", "32", "--crop", "32", "--quiet"]
    for extra, fragment in ((["--exclude", "layer1.0.conv9"], "--exclude names no conv/linear layer 'layer1.0.conv9'"),
                            (["--prune", "0.3", "--prune-exclude", "fc2"], "--prune-exclude names no conv/linear"),
                            (["--chunk", "0"], "--chunk must be at least 1"),
                            (["--out", str(folder / "missing" / "m.pt")], "does not exist; create it first")):
        code, out, err = main(capsys, *base, *extra)
        assert code == 2 and fragment in err, err


def test_random_torchvision_weights_are_said_once(capsys, folder):
    code, out, err = main(capsys, "compress", "torchvision:resnet18", "--num-classes", "3", "--calib", str(folder),
                          "--wbits", "32", "--resize", "32", "--crop", "32", "--quiet")
    assert code == 0
    assert [line for line in err.splitlines() if "random weights" in line] == [
        "renorm: warning: torchvision:resnet18 has random weights: no --weights given (a state_dict file, or a "
        "torchvision weights name such as DEFAULT)"]
    assert "evaluation: none (add --eval DATA to measure each stage)" in out


@pytest.mark.parametrize("hidden,argv,extra", [
    ("matplotlib", ["sensitivity", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--plot", "s.png"],
     "renorm[plot]"),
    ("matplotlib", ["compress", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--avg-bits", "4",
                    "--frontier", "f.png", "--out", "m.pt"], "renorm[plot]"),
    ("torch_pruning", ["compress", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--prune", "0.3",
                       "--prune-type", "filter", "--out", "m.pt"], "renorm[prune]"),
])
def test_a_missing_extra_is_named_before_any_work(hidden, argv, extra, tmp_path, monkeypatch, capsys):
    """Plots need matplotlib and filter pruning Torch-Pruning: without them the run stops before loading the model."""
    from renorm import cli

    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # import raises ImportError

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the extras were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    monkeypatch.chdir(tmp_path)
    code = cli.main([*argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and extra in err[0], err
    assert not list(tmp_path.iterdir())
