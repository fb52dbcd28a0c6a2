"""Files for models no spec names: a torch.export program with packed codes, never a pickle (renorm.export.program)."""
from __future__ import annotations

import io
import json
import lzma
import zipfile

import pytest
import torch
from torch import nn

from conftest import SmallNet, perturbed
from renorm import cli
from renorm.api import Config, compress
from renorm.checkpoint import LoadedModel
from renorm.errors import RenormError
from renorm.export import pack_codes, save_compressed
from renorm.export.program import load_program
from renorm.models import load_model
from renorm.prune import PruneConfig, prune
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights


def user_network() -> nn.Module:
    """A user's own CNN, its class local to this function: it cannot be pickled, so a file that
    rebuilds it cannot hold a pickle of it."""

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(32, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
                                      nn.Conv2d(128, 256, 3, 2, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())
            self.skip = nn.Conv2d(32, 256, 1, 2, bias=False)
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            x = self.stem(x)
            return self.head((self.body(x) + self.skip(x)).mean((2, 3)))

    torch.manual_seed(0)
    return perturbed(Network())


def compressed(model: nn.Module, images: torch.Tensor, filter_prune: bool = False) -> nn.Module:
    if filter_prune:
        model, _ = prune(model, PruneConfig(0.3, "filter"), example=images[:1], latency_repeats=1)
    else:
        model, _ = prune(model, PruneConfig(0.5), example=images[:1])
    model = quantize_weights(model, WeightQuantConfig(bits=4, scheme="pow2"))
    return calibrate_activations(model, images, ActivationQuantConfig(bits=8, num_images=16), batch_size=8)


def archive(path) -> zipfile.ZipFile:
    payload = torch.load(path, weights_only=True)
    return zipfile.ZipFile(io.BytesIO(lzma.decompress(payload["program"].numpy().tobytes())))


@pytest.mark.parametrize("filter_prune", [False, True])
def test_a_user_module_is_saved_as_a_program_and_reloads_exactly_without_trust(tmp_path, filter_prune):
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = compressed(user_network(), images, filter_prune)
    path = tmp_path / "user.pt"
    save_compressed(path, model, LoadedModel(model, "Network", None), example=images[:1])  # batch 1 too
    payload = torch.load(path, weights_only=True)  # nothing pickled: a plain dict of tensors and strings
    assert "module" not in payload and payload["source"]["kind"] == "program"
    assert payload["source"]["class"].endswith("user_network.<locals>.Network")
    # the program's own tensors are stripped: the float weights are nowhere in the file
    weights = [info for info in archive(path).infolist() if "/data/weights/weight_" in info.filename]
    assert weights and max(info.file_size for info in weights) <= 8
    assert all(f"{name}.weight" not in payload["state_dict"] for name in payload["quantized"])
    reloaded = load_model(str(path))
    assert reloaded.source["kind"] == "program" and not reloaded.model.training
    with torch.no_grad():
        assert torch.equal(reloaded.model(images), model(images))
        other = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))  # other batch and size
        assert torch.equal(reloaded.model(other), model(other))
    layer = dict(reloaded.model.named_modules())["body.0"]
    assert layer._renorm_quantized.bits == 4 and torch.equal(
        layer._renorm_quantized.codes, model.body[0]._renorm_quantized.codes)


def test_a_w4_program_file_is_at_most_a_sixth_of_the_fp32_state_dict(tmp_path):
    model = user_network()
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    quantized = quantize_weights(model, WeightQuantConfig(bits=4, scheme="pow2"))
    size = save_compressed(tmp_path / "w4.pt", quantized)  # no `loaded`: traced on 224 px zeros
    assert torch.load(tmp_path / "w4.pt", weights_only=True)["source"]["kind"] == "program"
    assert size <= (tmp_path / "fp32.pt").stat().st_size / 6


class DataDependent(SmallNet):
    """Branches on the values of its input: torch.export cannot trace it."""

    def forward(self, x):
        return super().forward(x if float(x.mean()) > 0 else -x)


def test_where_torch_export_fails_the_module_is_pickled_with_a_one_line_warning(tmp_path):
    torch.manual_seed(0)
    model = quantize_weights(perturbed(DataDependent()), WeightQuantConfig(bits=4, first_last_bits=0))
    with pytest.warns(UserWarning) as warned:
        save_compressed(tmp_path / "p.pt", model, LoadedModel(model, "DataDependent", None),
                        example=torch.randn(2, 3, 16, 16))
    messages = [str(w.message) for w in warned if "torch.export" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "cannot trace DataDependent" in messages[0] and "--trust-pickle" in messages[0]
    with pytest.raises(RenormError, match="--trust-pickle"):
        load_model(str(tmp_path / "p.pt"))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "p.pt"), trust_pickle=True).model(x), model.eval()(x))


def test_files_written_before_programs_still_load(tmp_path):
    """The layout ef575ba wrote for a pickled module (the whole module beside the packed codes) and for a spec."""
    torch.manual_seed(0)
    model = quantize_weights(perturbed(SmallNet()), WeightQuantConfig(bits=4, first_last_bits=0))
    quantized = {name: m._renorm_quantized for name, m in model.named_modules() if hasattr(m, "_renorm_quantized")}
    payload = {"renorm_format": 1, "renorm_version": "0.1.0", "spec": "old.pt", "num_classes": None, "preset": None,
               "source": {"kind": "pickle", "path": "old.pt"}, "pickled_module": True,
               "state_dict": {k: v for k, v in model.state_dict().items()
                              if k.removesuffix(".weight") not in quantized},
               "quantized": {name: {"codes": pack_codes(q.codes, q.bits), "shape": list(q.codes.shape), "scale": q.scale,
                                    "scheme": q.scheme, "bits": q.bits, "axis": q.axis, "relative_error": 0.0}
                             for name, q in quantized.items()},
               "activations": {}, "masks": {}, "pruned_channels": None}
    torch.save({**payload, "module": model}, tmp_path / "old.pt")
    with pytest.raises(RenormError, match="--trust-pickle"):
        load_model(str(tmp_path / "old.pt"))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "old.pt"), trust_pickle=True).model(x), model(x))


def test_a_program_holding_pickled_entries_is_refused_before_torch_reads_it(tmp_path):
    model = quantize_weights(perturbed(SmallNet()), WeightQuantConfig(bits=4, first_last_bits=0))
    save_compressed(tmp_path / "m.pt", model, LoadedModel(model, "SmallNet", None), example=torch.zeros(2, 3, 16, 16))
    source = archive(tmp_path / "m.pt")
    tampered = io.BytesIO()
    with zipfile.ZipFile(tampered, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            out.writestr(name, data)
    with pytest.raises(RenormError, match="holds pickled objects"):
        load_program(lzma.compress(tampered.getvalue()), "m.pt")
    with pytest.raises(RenormError, match="is damaged"):
        load_program(b"not xz at all", "m.pt")


def test_torch_export_load_runs_with_the_weights_only_unpickler_forced(tmp_path):
    """torch.export.load itself asks torch.load for weights_only=False on some entries: renorm overrides it."""
    from renorm.export.program import _weights_only

    torch.save(SmallNet(), tmp_path / "whole.pt")
    with _weights_only(), pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(tmp_path / "whole.pt", weights_only=False)
    assert isinstance(torch.load(tmp_path / "whole.pt", weights_only=False), SmallNet)  # and only inside


def test_a_program_model_is_evaluated_not_compressed_or_exported_to_onnx(tmp_path):
    model = quantize_weights(perturbed(SmallNet()), WeightQuantConfig(bits=4, first_last_bits=0))
    save_compressed(tmp_path / "m.pt", model, LoadedModel(model, "SmallNet", None), example=torch.zeros(2, 3, 16, 16))
    loaded = load_model(str(tmp_path / "m.pt"))
    with pytest.raises(RenormError, match="traced program"):
        compress(loaded, torch.randn(8, 3, 16, 16), Config(wbits=32))
    pytest.importorskip("onnx")
    from renorm.export.onnx_qdq import export_onnx

    with pytest.raises(RenormError, match="torch.export program"):
        export_onnx(loaded.model, tmp_path / "m.onnx", torch.zeros(1, 3, 16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.filterwarnings("ignore")
def test_compress_out_of_a_pickled_module_writes_a_file_that_evaluate_opens_without_trust(tmp_path, capsys):
    from conftest import write_image

    for i in range(4):
        (tmp_path / "labeled" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / "labeled" / f"class{i % 2}" / f"{i}.jpg", size=(24, 24), seed=i)
    torch.manual_seed(0)
    torch.save(perturbed(SmallNet()), tmp_path / "whole.pt")
    common = ["--resize", "16", "--crop", "16", "--quiet"]
    assert cli.main(["compress", str(tmp_path / "whole.pt"), "--trust-pickle", "--calib", str(tmp_path / "labeled"),
                     "--first-last-bits", "0", "--out", str(tmp_path / "q.pt"), *common]) == 0
    assert torch.load(tmp_path / "q.pt", weights_only=True)["source"]["kind"] == "program"
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "q.pt"), "--data", str(tmp_path / "labeled"), *common]) == 0
    assert "top-1" in capsys.readouterr().out


class WithConstant(SmallNet):
    """A tensor made in forward: torch.export lifts it into a constant of the program."""

    def forward(self, x):
        return super().forward(x) * torch.tensor(0.5)


def test_a_programs_constants_move_with_the_model(tmp_path):
    torch.manual_seed(0)
    model = quantize_weights(perturbed(WithConstant()), WeightQuantConfig(bits=4, first_last_bits=0))
    save_compressed(tmp_path / "c.pt", model, example=torch.zeros(2, 3, 16, 16))
    reloaded = load_model(str(tmp_path / "c.pt")).model
    constants = [name for name, b in reloaded.named_buffers() if name.startswith("lifted_tensor")]
    assert constants and set(reloaded.state_dict()) == set(model.state_dict())  # buffers, not persistent
    doubled = reloaded.to(torch.float64)  # .to() reaches the constants (as it would a GPU)
    assert all(b.dtype == torch.float64 for b in doubled.buffers() if b.is_floating_point())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(doubled(x.double()).float(), model(x), atol=1e-5)
