"""The bad-input matrix: every case exits 2 (or raises RenormError from the API) with exactly one
line and no traceback, leaves no output behind, and leaves every input byte-identical.

The CLI cases run in process (renorm.cli.main); tests/test_cli.py runs a few end to end.
conftest.py prints the count of cases at the end of every run that includes this file.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision
from torch import nn

from conftest import SmallNet, write_image
from renorm import cli
from renorm.errors import RenormError

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- models with awkward outputs
class PairNet(SmallNet):
    def forward(self, x):
        y = super().forward(x)
        return y, y.softmax(1)


class DictNet(SmallNet):
    def forward(self, x):
        y = super().forward(x)
        return {"scores": y, "probabilities": y.softmax(1)}


class TwoInputs(SmallNet):
    def forward(self, x, mask):
        return super().forward(x * mask)


class CumMax(SmallNet):
    """Runs, but uses an op (cummax) that ONNX opset 17 lacks."""

    def forward(self, x):
        return super().forward(torch.cummax(x, 1)[0])


class FixedSize(nn.Module):
    """Takes 30x30 images only (a flatten into a linear layer)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def bomb_png(path: Path, width: int = 40000, height: int = 40000) -> None:
    """A tiny PNG whose header claims width x height pixels: PIL refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The inputs every case reads, and an empty out/ for the outputs no case may leave."""
    root = tmp_path_factory.mktemp("bad-inputs")
    for folder in ("photos", "labeled/cat", "labeled/dog", "empty", "junk", "huge", "out"):
        (root / folder).mkdir(parents=True)
    for i in range(6):
        write_image(root / "photos" / f"{i}.jpg", size=(48, 40), seed=i)
    for i in range(2):
        write_image(root / "labeled" / "cat" / f"{i}.png", seed=i)
        write_image(root / "labeled" / "dog" / f"{i}.png", seed=10 + i)
    (root / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    (root / "junk" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bomb_png(root / "huge" / "giant.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "w3.pt")
    torch.save(torchvision.models.mobilenet_v2(num_classes=3).state_dict(), root / "mobilenet.pt")
    write_image(root / "photo.jpg", size=(32, 32))
    (root / "notes.txt").write_text("epoch 3, loss 0.21\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "cut.pt").write_bytes((root / "w3.pt").read_bytes()[:5000])
    (root / "random.pt").write_bytes(bytes(range(256)) * 8)
    for name, model in (("pickled.pt", SmallNet()), ("half.pt", SmallNet().half()), ("pair.pt", PairNet()),
                        ("dictout.pt", DictNet()), ("fixed.pt", FixedSize()), ("two.pt", TwoInputs()),
                        ("cummax.pt", CumMax())):
        torch.save(model.eval(), root / name)
    traced = torch.jit.trace(SmallNet().eval(), torch.randn(1, 3, 16, 16))
    torch.jit.save(traced, str(root / "ts.pt"))
    from renorm.checkpoint import LoadedModel
    from renorm.export import save_compressed
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights

    quantized = quantize_weights(SmallNet().eval(), WeightQuantConfig(bits=4, first_last_bits=0))
    save_compressed(root / "program.pt", quantized, LoadedModel(quantized, "SmallNet", None),
                    example=torch.zeros(2, 3, 16, 16))  # a model no spec names: a torch.export program
    return root


def small(ws: Path) -> list[str]:
    """torchvision:resnet18 with 3-class weights, on 32x32 crops: loads in a blink."""
    return ["torchvision:resnet18", "--num-classes", "3", "--weights", str(ws / "w3.pt"), "--resize", "32",
            "--crop", "32", "--quiet"]


def pickled(ws: Path, name: str) -> list[str]:
    return [str(ws / name), "--trust-pickle", "--resize", "16", "--crop", "16", "--quiet"]


# Each case: (command line or API call, a fragment the one line must contain).
CLI: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # compress: models and weights
    "missing model file": (lambda w: ["compress", str(w / "nope.pt"), "--calib", str(w / "photos")], "unknown model"),
    "unknown torchvision name": (lambda w: ["compress", "torchvision:resnet19", "--calib", str(w / "photos")],
                                 "torchvision has no classification model 'resnet19'"),
    "unknown timm name": (lambda w: ["compress", "timm:resnet19", "--calib", str(w / "photos")],
                          "timm has no model 'resnet19' (did you mean resnet18"),
    "timm weights of another architecture": (lambda w: ["compress", "timm:resnet18", "--num-classes", "3", "--weights",
                                                        str(w / "mobilenet.pt"), "--calib", str(w / "photos")],
                                             "do not fit timm:resnet18"),
    "compress a renorm program file": (lambda w: ["compress", str(w / "program.pt"), "--calib", str(w / "photos"),
                                                  "--resize", "16", "--crop", "16"], "holds a traced program"),
    "JPEG as the model": (lambda w: ["compress", str(w / "photo.jpg"), "--calib", str(w / "photos")],
                          "is a JPEG image, not a model"),
    "JPEG as the model, trusted": (lambda w: ["compress", str(w / "photo.jpg"), "--trust-pickle", "--calib",
                                              str(w / "photos")], "is a JPEG image, not a model"),
    "truncated model file": (lambda w: ["compress", str(w / "cut.pt"), "--calib", str(w / "photos")],
                             "damaged or truncated zip archive"),
    "random bytes as the model": (lambda w: ["compress", str(w / "random.pt"), "--calib", str(w / "photos")],
                                  "neither a zip archive nor a pickle"),
    "empty model file": (lambda w: ["compress", str(w / "empty.pt"), "--calib", str(w / "photos")],
                         "is an empty file"),
    "text file as --weights": (lambda w: ["compress", "torchvision:resnet18", "--weights", str(w / "notes.txt"),
                                          "--calib", str(w / "photos")], "is a text file"),
    "weights of another architecture": (lambda w: ["compress", "torchvision:resnet18", "--num-classes", "3",
                                                   "--weights", str(w / "mobilenet.pt"), "--calib", str(w / "photos")],
                                        "do not fit torchvision:resnet18"),
    "weights with other classes": (lambda w: ["compress", "torchvision:resnet18", "--weights", str(w / "w3.pt"),
                                              "--calib", str(w / "photos")], "--num-classes"),
    "a state_dict as the model": (lambda w: ["compress", str(w / "w3.pt"), "--calib", str(w / "photos")],
                                  "holds only weights"),
    "pickled module, not trusted": (lambda w: ["compress", str(w / "pickled.pt"), "--calib", str(w / "photos")],
                                    "--trust-pickle"),
    "TorchScript to compress": (lambda w: ["compress", str(w / "ts.pt"), "--calib", str(w / "photos"),
                                           "--resize", "16", "--crop", "16"], "TorchScript"),
    "half-precision model": (lambda w: ["compress", *pickled(w, "half.pt"), "--calib", str(w / "photos")],
                             "weights are float16 but the images are float32"),
    "model returning a tuple": (lambda w: ["compress", *pickled(w, "pair.pt"), "--calib", str(w / "photos"),
                                           "--eval", str(w / "labeled")], "returns a tuple of 2"),
    "model returning a dict": (lambda w: ["compress", *pickled(w, "dictout.pt"), "--calib", str(w / "photos"),
                                          "--eval", str(w / "labeled")], "returns a dict with keys 'scores'"),
    "model whose forward takes two inputs": (lambda w: ["compress", *pickled(w, "two.pt"), "--calib",
                                                        str(w / "photos")], "the model failed on images of shape "
                                                                            "(3, 16, 16): TypeError"),
    "images of the wrong size": (lambda w: ["compress", *pickled(w, "fixed.pt"), "--calib", str(w / "photos")],
                                 "do not fit the model"),
    # compress: nonsense flags and values
    "unknown flag": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbitz", "4"],
                     "unrecognized arguments: --wbitz"),
    "missing --calib": (lambda w: ["compress", *small(w)], "--calib"),
    "--wbits four": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbits", "four"], "four"),
    "--wbits 9": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbits", "9", "--scheme",
                             "uniform"], "--wbits 9 is out of range"),
    "--wbits 1": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbits", "1"],
                  "--wbits 1 is out of range for pow2: choose 2..6"),
    "--wbits 8 with pow2": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbits", "8"],
                            "use --scheme uniform"),
    "--first-last-bits 1": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--first-last-bits",
                                       "1"], "--first-last-bits 1 is out of range"),
    "--abits 1": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--abits", "1"], "--abits 1"),
    "--layer-bits foo=9": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--layer-bits",
                                      "foo=9"], "bits must be 2..8"),
    "--layer-bits matching nothing": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"),
                                                 "--layer-bits", "_blocks.*=3"], "matches no conv/linear layer"),
    "--layer-bits without =": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--layer-bits",
                                          "depthwise"], "is not PATTERN=BITS"),
    "--avg-bits 1": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--avg-bits", "1"],
                     "--avg-bits"),
    "--reconstruct-method magic": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"),
                                              "--reconstruct-method", "magic"], "invalid choice: 'magic'"),
    "--reconstruct-images 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--reconstruct",
                                          "--reconstruct-images", "0"], "--reconstruct-images must be at least 1"),
    "--scheme float8": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--scheme", "float8"],
                        "invalid choice: 'float8'"),
    "--renorm magic": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--renorm", "magic"],
                       "invalid choice: 'magic'"),
    "--chunk 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--chunk", "0"],
                  "--chunk must be at least 1"),
    "--num-images 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--num-images", "0"],
                       "--num-images must be at least 1"),
    "--act-images 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--abits", "8",
                                  "--act-images", "0"], "--act-images must be at least 1, got 0"),
    "--act-method median": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--abits", "8",
                                       "--act-method", "median"], "invalid choice: 'median'"),
    "--batch-size 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--batch-size", "0"],
                       "--batch-size must be at least 1"),
    "--exclude typo": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--exclude", "layer1.0.conv"],
                       "did you mean layer1.0.conv"),
    "--prune-exclude typo": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--prune", "0.3",
                                        "--prune-exclude", "fc1"], "--prune-exclude names no conv/linear layer 'fc1'"),
    "--prune 1.5": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--prune", "1.5"], "[0, 1)"),
    "--prune-budget macs, unstructured": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--prune",
                                                     "0.3", "--prune-budget", "macs"],
                                          "--prune-budget macs needs --prune-type filter"),
    "--mean with two numbers": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--mean", "0.1",
                                           "0.2"], "1 or 3 numbers"),
    "--std 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--std", "0"], "must be positive"),
    "--preset cifar": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--preset", "cifar"],
                       "invalid choice: 'cifar'"),
    # compress: image folders
    "missing --calib folder": (lambda w: ["compress", *small(w), "--calib", str(w / "gone")], "does not exist"),
    "empty --calib folder": (lambda w: ["compress", *small(w), "--calib", str(w / "empty")], "no images"),
    "junk --calib folder": (lambda w: ["compress", *small(w), "--calib", str(w / "junk")],
                            "all 2 files were unreadable and skipped"),
    "huge-image --calib folder": (lambda w: ["compress", *small(w), "--calib", str(w / "huge")],
                                  "all 1 files were unreadable and skipped (first: "),
    "--calib is a file": (lambda w: ["compress", *small(w), "--calib", str(w / "photo.jpg")], "is a file"),
    # compress: outputs
    "--out in a missing folder": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--out",
                                             str(w / "out" / "no" / "m.pt")], "does not exist; create it first"),
    "--out in a folder that takes no files": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--out",
                                                         str(_locked_folder(w) / "m.pt")], "cannot write in"),
    "--out equal to the input": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--out",
                                            str(w / "w3.pt")], "is an input of this run"),
    "--out is a folder": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--out", str(w / "out")],
                          "is a folder"),
    "--out and --report one file": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--out",
                                               str(w / "out" / "x"), "--report", str(w / "out" / "x")],
                                    "name the same file"),
    # evaluate
    "evaluate unlabeled without a reference": (lambda w: ["evaluate", *small(w), "--data", str(w / "photos")],
                                               "have no labels"),
    "evaluate --reference-weights alone": (lambda w: ["evaluate", *small(w), "--data", str(w / "labeled"),
                                                      "--reference-weights", str(w / "w3.pt")], "need --reference"),
    "evaluate --reference-num-classes 0": (lambda w: ["evaluate", *small(w), "--data", str(w / "photos"),
                                                      "--reference", "torchvision:resnet18",
                                                      "--reference-num-classes", "0"],
                                           "--reference-num-classes must be at least 1, got 0"),
    "evaluate a JPEG": (lambda w: ["evaluate", str(w / "photo.jpg"), "--data", str(w / "labeled")], "JPEG image"),
    "evaluate --report over the model": (lambda w: ["evaluate", *small(w), "--data", str(w / "labeled"), "--report",
                                                    str(w / "w3.pt")], "is an input of this run"),
    # sensitivity
    "sensitivity --sparsities 1.5": (lambda w: ["sensitivity", *small(w), "--calib", str(w / "photos"),
                                                "--sparsities", "0.5", "1.5"], "[0, 1)"),
    "sensitivity --renorm magic": (lambda w: ["sensitivity", *small(w), "--calib", str(w / "photos"), "--renorm",
                                              "magic"], "invalid choice"),
    "sensitivity of a renorm program file": (lambda w: ["sensitivity", str(w / "program.pt"), "--calib",
                                                        str(w / "photos"), "--resize", "16", "--crop", "16"],
                                             "no conv/linear layer to prune"),
    "sensitivity --plot in a missing folder": (lambda w: ["sensitivity", *small(w), "--calib", str(w / "photos"),
                                                          "--plot", str(w / "out" / "no" / "s.png")],
                                               "does not exist"),
    # export (ONNX) and compress --onnx
    "export --onnx in a missing folder": (lambda w: ["export", *small(w), "--onnx", str(w / "out" / "no" / "m.onnx")],
                                          "does not exist; create it first"),
    "export --onnx over the weights": (lambda w: ["export", *small(w), "--onnx", str(w / "w3.pt")],
                                       "is an input of this run"),
    "export --onnx and --report one file": (lambda w: ["export", *small(w), "--onnx", str(w / "out" / "x"),
                                                       "--report", str(w / "out" / "x")], "name the same file"),
    "export without --onnx": (lambda w: ["export", *small(w)], "--onnx"),
    "export TorchScript": (lambda w: ["export", str(w / "ts.pt"), "--onnx", str(w / "out" / "m.onnx"), "--resize",
                                      "16", "--crop", "16"], "TorchScript"),
    "export a renorm program file": (lambda w: ["export", str(w / "program.pt"), "--onnx", str(w / "out" / "m.onnx"),
                                                "--resize", "16", "--crop", "16"], "torch.export program"),
    "export a model with an op ONNX lacks": (lambda w: ["export", *pickled(w, "cummax.pt"), "--onnx",
                                                        str(w / "out" / "m.onnx")], "aten::cummax"),
    "compress --onnx with 5-bit pow2": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--wbits", "5",
                                                   "--onnx", str(w / "out" / "m.onnx")], "pow2 weights up to 4 bits"),
    "compress --onnx with 6-bit pow2 --layer-bits": (
        lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--layer-bits", "layer4.*=6",
                   "--onnx", str(w / "out" / "m.onnx"), "--out", str(w / "out" / "m.pt")], "pow2 weights up to 4 bits"),
    "compress --onnx with --abits 4": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--abits", "4",
                                                  "--onnx", str(w / "out" / "m.onnx")], "8-bit activations"),
    # demo
    "demo --report is a folder": (lambda w: ["demo", "--report", str(w / "out")], "is a folder"),
    "demo --report in a missing folder": (lambda w: ["demo", "--report", str(w / "no" / "r.json")], "does not exist"),
    "demo with a stray flag": (lambda w: ["demo", "--wbits", "2"], "unrecognized arguments"),
    # where it runs
    "--device that is not one": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--device", "tpu"],
                                 "is not a device"),
    "--device cuda:99": (lambda w: ["evaluate", *small(w), "--data", str(w / "photos"), "--device", "cuda:99"],
                         "--device cuda:99"),  # no GPU: none seen; with GPUs: not that many
    "--threads 0": (lambda w: ["compress", *small(w), "--calib", str(w / "photos"), "--threads", "0"],
                    "--threads must be at least 1"),
    "--workers -1": (lambda w: ["evaluate", *small(w), "--data", str(w / "photos"), "--workers", "-1"],
                     "--workers must be 0 or more"),
}


def _locked_folder(ws: Path) -> Path:
    if os.geteuid() != 0:
        locked = ws / "locked"
        locked.mkdir(exist_ok=True)
        locked.chmod(0o555)
        return locked
    return Path("/sys")  # read-only even for root


def api_cases() -> dict[str, tuple[Callable[[Path], object], str]]:
    from renorm.api import Config, compress
    from renorm.export import save_compressed
    from renorm.export.onnx_qdq import export_onnx
    from renorm.models import load_model
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights
    from renorm.reconstruct import reconstruct
    from renorm.renormalize import renormalize

    images = torch.randn(8, 3, 16, 16)
    return {
        "API: save_compressed into a folder": (
            lambda w: save_compressed(w / "out", SmallNet(), load_model("fmnist-resnet18")), "is a folder"),
        "API: save_compressed over its input": (
            lambda w: save_compressed(w / "w3.pt", SmallNet(), load_model("fmnist-resnet18"), protected=[w / "w3.pt"]),
            "is an input of this run"),
        "API: save_compressed of TorchScript": (
            lambda w: save_compressed(w / "out" / "t.pt", SmallNet(), load_model(str(w / "ts.pt"))), "TorchScript"),
        "API: compress a data spec with no preset": (
            lambda w: compress(SmallNet(), str(w / "photos"), Config(wbits=32)), "pass preset="),
        "API: compress a one-shot generator": (
            lambda w: compress(SmallNet(), (b for b in images.split(4)), Config(wbits=32)), "re-iterable"),
        "API: Config(wbits=7) with pow2": (lambda w: Config(wbits=7), "use --scheme uniform"),
        "API: Config(threads=0)": (lambda w: Config(threads=0), "--threads must be at least 1"),
        "API: WeightQuantConfig(scheme='float8')": (lambda w: WeightQuantConfig(scheme="float8"), "float8"),
        "API: shift without a reference": (lambda w: renormalize(SmallNet(), images, "shift"), "reference"),
        "API: load a JPEG": (lambda w: load_model(str(w / "photo.jpg")), "JPEG image"),
        "API: half-precision model": (lambda w: renormalize(SmallNet().half(), images), "float16"),
        "API: reconstruct an unquantized model": (
            lambda w: reconstruct(SmallNet(), SmallNet(), images), "no quantized layer"),
        "API: export_onnx into a folder": (
            lambda w: export_onnx(SmallNet().eval(), w / "out", images[:1]), "is a folder"),
        "API: export_onnx of 6-bit pow2 weights": (
            lambda w: export_onnx(quantize_weights(SmallNet(), WeightQuantConfig(bits=6, first_last_bits=0)),
                                  w / "out" / "m.onnx", images[:1]), "beyond int8"),
        "API: batch_size=0": (lambda w: renormalize(SmallNet(), images, batch_size=0), "--batch-size must be at "
                                                                                       "least 1"),
    }


API = api_cases()
CASES = [*CLI, *API]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, ws, capsys):
    before = snapshot(ws)
    if case in CLI:
        argv, fragment = CLI[case]
        code = cli.main(argv(ws))
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("renorm: error: ") and "Traceback" not in err
        assert fragment in lines[0], lines[0]
    else:
        call, fragment = API[case]
        with pytest.raises(RenormError) as info:
            call(ws)
        message = str(info.value)
        assert "\n" not in message and fragment in message, message
    assert snapshot(ws) == before, "an input changed or an output was left behind"


def test_the_matrix_has_at_least_30_cases():
    print(f"bad-input matrix: {len(CASES)} cases ({len(CLI)} command lines, {len(API)} API calls)")
    assert len(CASES) >= 30
