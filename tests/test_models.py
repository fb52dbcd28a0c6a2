"""Model specs -> modules: torchvision, reference models, EfficientNet-Lite, files."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torchvision

from conftest import SmallNet
from renorm.errors import RenormError
from renorm.models import REFERENCE_MODELS, load_model


def test_torchvision_spec_with_weights_file_and_checkpoint_dict(tmp_path):
    source = torchvision.models.resnet18(num_classes=7)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
        for name in ("plain.pt", "ckpt.pth"):
            loaded = load_model("torchvision:resnet18", weights=str(tmp_path / name), num_classes=7)
            assert not loaded.model.training and loaded.preset.name == "imagenet"
            torch.testing.assert_close(loaded.model(x), expected)


def test_weights_that_do_not_fit_name_the_mismatch(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "w.pt")
    with pytest.raises(RenormError, match=r"shape mismatch.*fc\.weight.*--num-classes"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "w.pt"))
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "m.pt")
    with pytest.raises(RenormError, match="missing"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "m.pt"))
    with pytest.raises(RenormError, match="does not exist"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "none.pt"))


def test_unknown_specs():
    with pytest.raises(RenormError, match="torchvision has no classification model"):
        load_model("torchvision:resnet19")
    with pytest.raises(RenormError, match="unknown model"):
        load_model("not-a-model")


def test_pickled_module_needs_trust(tmp_path):
    torch.save(SmallNet(), tmp_path / "whole.pt")
    with pytest.raises(RenormError, match="--trust-pickle"):
        load_model(str(tmp_path / "whole.pt"))
    assert isinstance(load_model(str(tmp_path / "whole.pt"), trust_pickle=True).model, SmallNet)


def test_state_dict_file_alone_asks_for_the_architecture(tmp_path):
    torch.save(SmallNet().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(RenormError, match="torchvision:NAME --weights"):
        load_model(str(tmp_path / "sd.pt"))


def test_torchscript_archive(tmp_path):
    model = torchvision.models.resnet18(num_classes=3).eval()
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(tmp_path / "ts.pt"))
    loaded = load_model(str(tmp_path / "ts.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_models_load_with_their_preset(name):
    loaded = load_model(name)
    assert loaded.preset.name == "fashion-mnist" and loaded.num_classes == 10
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    with torch.no_grad():
        assert loaded.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_efficientnet_lite0_real_weights():
    loaded = load_model("efficientnet-lite0")
    assert loaded.preset.name == "tf" and loaded.preset.crop == 224 and loaded.preset.resize == 256
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 4.5e6 < params < 4.8e6
    with pytest.raises(RenormError, match="own weights"):
        load_model("efficientnet-lite0", num_classes=10)


def test_files_that_are_not_torch_files_are_named_before_torch_reads_them(tmp_path):
    """A JPEG given as the model was called 'a pickled Python object ... pass --trust-pickle';
    with --trust-pickle it died with a traceback."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.pt").write_text("epoch 3: loss 0.2\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(SmallNet().state_dict(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    for name, what in (("photo.jpg", "a JPEG image"), ("notes.pt", "a text file"), ("empty.pt", "an empty file"),
                       ("cut.pt", r"a damaged or truncated zip archive \(a torch file cut short\?\)")):
        for trust in (False, True):
            with pytest.raises(RenormError, match=f"is {what}, not a model"):
                load_model(str(tmp_path / name), trust_pickle=trust)
    with pytest.raises(RenormError, match="weights file .*photo.jpg is a JPEG image"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "photo.jpg"))


def test_torchvision_without_weights_says_the_weights_are_random():
    with pytest.warns(UserWarning, match="torchvision:resnet18 has random weights: no --weights given"):
        load_model("torchvision:resnet18", num_classes=3)


def _timm_weights(tmp_path, name: str = "resnet18", classes: int = 3):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=classes).eval()
    torch.save(source.state_dict(), tmp_path / "timm.pt")
    return source, tmp_path / "timm.pt"


def test_timm_spec_builds_offline_and_takes_the_weights_file(tmp_path):
    source, weights = _timm_weights(tmp_path)
    loaded = load_model("timm:resnet18", weights=str(weights), num_classes=3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), source(x))
    cfg = source.pretrained_cfg  # the preset comes from timm's pretrained_cfg
    assert loaded.preset.crop == cfg["input_size"][-1] == 224 and loaded.preset.interpolation == "bicubic"
    assert loaded.preset.resize == int(224 / cfg["crop_pct"]) and loaded.preset.mean == tuple(cfg["mean"])
    assert loaded.source == {"kind": "timm", "name": "resnet18", "num_classes": 3}


def test_timm_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    _, weights = _timm_weights(tmp_path)
    with pytest.raises(RenormError, match=r"timm has no model 'resnet19' \(did you mean resnet18"):
        load_model("timm:resnet19")
    with pytest.raises(RenormError, match=r"do not fit timm:resnet18: shape mismatch.*--num-classes"):
        load_model("timm:resnet18", weights=str(weights))
    with pytest.raises(RenormError, match="does not exist"):
        load_model("timm:resnet18", weights=str(tmp_path / "none.pt"))
    with pytest.warns(UserWarning, match="timm:resnet18 has random weights"):
        load_model("timm:resnet18", num_classes=3)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(RenormError, match=r"timm:resnet18 needs timm: pip install 'renorm\[timm\]'"):
        load_model("timm:resnet18", weights=str(weights), num_classes=3)


def test_a_timm_file_rebuilds_by_spec(tmp_path):
    from renorm.export import save_compressed
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights

    _, weights = _timm_weights(tmp_path)
    loaded = load_model("timm:resnet18", weights=str(weights), num_classes=3)
    model = quantize_weights(loaded.model, WeightQuantConfig(bits=4))
    save_compressed(tmp_path / "q.pt", model, loaded)
    payload = torch.load(tmp_path / "q.pt", weights_only=True)
    assert payload["source"]["kind"] == "timm" and "program" not in payload and "module" not in payload
    reloaded = load_model(str(tmp_path / "q.pt"))
    assert reloaded.preset == loaded.preset
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), model(x))


def test_timm_preset_from_pretrained_cfg_and_its_interpolation():
    from PIL import Image
    from torchvision import transforms as T

    from renorm.models import timm_preset

    preset = timm_preset({"input_size": (3, 240, 240), "crop_pct": 0.9, "interpolation": "bicubic",
                          "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert (preset.resize, preset.crop, preset.mean, preset.std) == (266, 240, (0.5,) * 3, (0.25,) * 3)
    assert timm_preset({}).crop == 224 and timm_preset({}).resize == 256  # timm's defaults: crop_pct 0.875
    # files with a bilinear preset say nothing of it: renorm versions before interpolation read them
    assert preset.describe()["interpolation"] == "bicubic" and "interpolation" not in timm_preset({}).describe()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    expected = T.Normalize(preset.mean, preset.std)(T.ToTensor()(T.CenterCrop(240)(
        T.Resize(266, interpolation=T.InterpolationMode.BICUBIC)(image))))
    assert torch.equal(preset.transform()(image), expected)
    bilinear = T.Resize(266)(image)
    assert not torch.equal(T.ToTensor()(bilinear), T.ToTensor()(T.Resize(266, T.InterpolationMode.BICUBIC)(image)))
