"""Pruning: masks that survive, filters that really go, equivalence, sensitivity."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from conftest import SmallNet, perturbed
from renorm.errors import RenormError
from renorm.evaluate import agreement, predict
from renorm.prune import (PruneConfig, apply_pruned_channels, filter_prune, latency_ms, magnitude_prune, prune,
                          sparsity_by_layer)
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import matched_channels, renormalize
from renorm.sensitivity import plot_sensitivity, sensitivity, sensitivity_table


def test_layer_and_global_magnitude_pruning_hit_the_fraction():
    model = torchvision.models.resnet18(num_classes=10)
    magnitude_prune(model, PruneConfig(0.7))
    rows = {r["layer"]: r for r in sparsity_by_layer(model)}
    assert rows["conv1"]["sparsity"] == 0 and rows["fc"]["sparsity"] == 0  # first/last spared by default
    assert all(abs(r["sparsity"] - 0.7) < 1e-3 for name, r in rows.items() if name not in ("conv1", "fc"))
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.layer4[1].conv2.weight.mul_(10)  # one layer of larger weights keeps more under a global threshold
    magnitude_prune(model, PruneConfig(0.7, scope="global"))
    rows = {r["layer"]: r for r in sparsity_by_layer(model)}
    inner = [r for name, r in rows.items() if name not in ("conv1", "fc")]
    total = sum(r["zeros"] for r in inner) / sum(r["weights"] for r in inner)
    assert abs(total - 0.7) < 1e-3
    assert rows["layer4.1.conv2"]["sparsity"] < 0.2


def test_depthwise_convs_are_spared_unless_asked():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    magnitude_prune(model, PruneConfig(0.5))
    depthwise = model.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels and float((depthwise.weight == 0).float().mean()) == 0
    magnitude_prune(model, PruneConfig(0.5, prune_depthwise=True))
    assert abs(float((depthwise.weight == 0).float().mean()) - 0.5) < 0.01


def test_masks_hold_through_quantization_and_renormalization(images):
    torch.manual_seed(0)
    model = perturbed(SmallNet())
    magnitude_prune(model, PruneConfig(0.6, prune_first_last=True))
    masks = {n: m._renorm_mask.clone() for n, m in model.named_modules() if hasattr(m, "_renorm_mask")}
    model = quantize_weights(model, WeightQuantConfig(bits=3, scheme="uniform"))
    model = renormalize(model, images, "exact", batch_size=16)
    for name, module in model.named_modules():
        if name in masks:
            assert bool((module.weight[~masks[name]] == 0).all()), name
            assert bool((module._renorm_quantized.codes[~masks[name]] == 0).all()), name
            assert float((module.weight != 0).float().mean()) <= 0.41


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_filter_pruning_gives_a_smaller_model_that_runs_saves_and_reloads(arch, tmp_path):
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    pruned, report = prune(copy.deepcopy(model), PruneConfig(0.5, "filter"), example=x)
    assert pruned(x).shape == (2, 10)
    assert report["params_after"] < 0.45 * report["params_before"]
    assert report["macs_after"] < 0.45 * report["macs_before"]
    assert report["bytes_after"] < 0.5 * report["bytes_before"]
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)  # kept channel counts are multiples of 8
    torch.save(pruned.state_dict(), tmp_path / "p.pt")
    fresh = torchvision.models.get_model(arch, num_classes=10)
    apply_pruned_channels(fresh, pruned._renorm_pruned_channels)
    fresh.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))


def test_removing_all_zero_channels_leaves_outputs_unchanged():
    """Real equivalence: a conv filter of zeros followed by a BN that maps it to 0 contributes
    nothing downstream, so physically removing it must not change the network's output."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dead = [3, 17, 40]
    with torch.no_grad():
        model.layer1[0].conv1.weight[dead] = 0
        model.layer1[0].bn1.weight[dead] = 0  # 0 * normalized + 0 = 0 after BN
        model.layer1[0].bn1.bias[dead] = 0
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, x[:1])
    graph.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=dead).prune()
    assert model.layer1[0].conv1.out_channels == 61 and model.layer1[0].conv2.in_channels == 61
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_filter_pruned_channels_are_found_by_their_stored_numbers():
    torch.manual_seed(0)
    model = perturbed(torchvision.models.resnet18(num_classes=10))
    fp32 = copy.deepcopy(model)
    x = torch.randn(16, 3, 32, 32)
    pruned = filter_prune(model, PruneConfig(0.3, "filter"), x)
    kept = matched_channels(fp32.layer1[0].bn1, pruned.layer1[0].bn1)
    assert len(kept) == pruned.layer1[0].bn1.num_features < fp32.layer1[0].bn1.num_features
    assert len(set(kept)) == len(kept)
    torch.testing.assert_close(pruned.layer1[0].bn1.running_mean, fp32.layer1[0].bn1.running_mean[kept])
    torch.testing.assert_close(pruned.layer1[0].bn1.weight, fp32.layer1[0].bn1.weight[kept])
    with pytest.raises(RenormError, match="not a pruned copy"):
        matched_channels(fp32.layer2[0].bn1, pruned.layer1[0].bn1)
    out = renormalize(pruned, x, "shift", reference=fp32, batch_size=8)
    assert all(torch.isfinite(m.running_var).all() for m in out.modules() if isinstance(m, nn.BatchNorm2d))


def test_bad_pruning_input():
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(RenormError, match=r"\[0, 1\)"):
            PruneConfig(fraction)
    with pytest.raises(RenormError, match="layer9"):
        magnitude_prune(SmallNet(), PruneConfig(0.5, exclude=("layer9",)))
    with pytest.raises(RenormError, match="--prune-type"):
        PruneConfig(0.5, kind="channels")


def test_latency_of_a_filter_pruned_model_is_measured():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    pruned, report = prune(copy.deepcopy(model), PruneConfig(0.5, "filter"), example=x, latency_repeats=3)
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    assert report["latency_batch"] == 8 and report["threads"] == torch.get_num_threads()
    assert latency_ms(pruned, x, repeats=3) > 0


def test_sensitivity_scan_and_plot(images, tmp_path):
    torch.manual_seed(0)
    model = perturbed(SmallNet())
    before = copy.deepcopy(model.state_dict())
    rows = sensitivity(model, images, sparsities=(0.5, 0.95), renorm="exact", batch_size=32)
    assert len(rows) == 4 * 2
    for key, value in model.state_dict().items():  # the model is restored
        assert torch.equal(value, before[key]), key
    assert not any(hasattr(m, "_renorm_mask") for m in model.modules())
    by = {(r["layer"], r["sparsity"]): r for r in rows}
    assert all(0 <= r["agreement_top1"] <= 100 for r in rows)
    assert sum(by[(layer, 0.95)]["agreement_top1"] for layer in ("conv1", "conv2", "fc1", "fc2")) < 4 * 100
    # each row is that layer alone pruned, then re-normalized (the other layers as they were, not left pruned)
    names = ("conv1", "conv2", "fc1", "fc2")
    reference, _ = predict(model, images, 32)
    for layer in ("conv2", "fc2"):
        alone = magnitude_prune(copy.deepcopy(model), PruneConfig(0.95, exclude=tuple(n for n in names if n != layer),
                                                                  prune_first_last=True, prune_depthwise=True))
        alone = renormalize(alone, images, "exact", reference=model, batch_size=32)
        expected = agreement(predict(alone, images, 32)[0], reference)
        assert by[(layer, 0.95)]["kl"] == pytest.approx(expected["kl"], rel=1e-5, abs=1e-7), layer
        assert by[(layer, 0.95)]["agreement_top1"] == expected["agreement_top1"], layer
    unrenormalized = sensitivity(model, images, sparsities=(0.95,), renorm="none", batch_size=32)
    assert any(r["kl"] != pytest.approx(by[(r["layer"], 0.95)]["kl"], rel=1e-3) for r in unrenormalized)
    assert "| conv1 |" in sensitivity_table(rows)
    plot_sensitivity(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_shift_matches_channels_of_a_model_pruned_elsewhere():
    """A model pruned by Torch-Pruning directly: shift finds each kept channel by its stored
    numbers. Removing output channels of layer1[0].conv1 leaves the kept channels' inputs to
    layer1[0].bn1 as they were, so shift must give them back their FP32 statistics."""
    tp = pytest.importorskip("torch_pruning")
    from renorm.renormalize import batchnorm_layers, renormalize

    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18(num_classes=10).eval()
    for _, bn in batchnorm_layers(fp32):  # distinct stored numbers per channel, as in a trained model
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    images = torch.randn(8, 3, 32, 32)
    pruned = copy.deepcopy(fp32)
    removed = [3, 10, 11, 40, 63]
    graph = tp.DependencyGraph().build_dependency(pruned, images[:1])
    graph.get_pruning_group(pruned.layer1[0].conv1, tp.prune_conv_out_channels, idxs=removed).prune()
    kept = [i for i in range(64) if i not in removed]
    assert matched_channels(fp32.layer1[0].bn1, pruned.layer1[0].bn1) == kept
    out = renormalize(pruned, images, "shift", reference=fp32)
    for name in ("bn1", "layer1.0.bn1"):
        got, want = out.get_submodule(name), fp32.get_submodule(name)
        index = kept if name == "layer1.0.bn1" else slice(None)
        torch.testing.assert_close(got.running_mean, want.running_mean[index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.running_var, want.running_var[index], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.layer1[0].bn2.running_mean, fp32.layer1[0].bn2.running_mean, atol=1e-3)


class FixedReshape(nn.Module):
    """Reshapes to a fixed channel count: filter pruning leaves a model that cannot run."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn(self.conv1(x)))).reshape(len(x), 16 * 4 * 4))


def test_errors_from_filter_pruning_are_one_clear_line():
    """The old code let Torch-Pruning's (or the broken model's) RuntimeError escape with a traceback."""
    model = FixedReshape().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RenormError, match=r"after filter pruning the model no longer runs .*--prune-exclude") as info:
        prune(model, PruneConfig(0.5, "filter", prune_first_last=True), example=torch.randn(2, 3, 8, 8))
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class PixelShuffleNet(nn.Module):
    """conv -> pixel_shuffle -> conv: Torch-Pruning itself fails on it (an IndexError inside its graph)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(4, 16, 3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.conv2(nn.functional.pixel_shuffle(self.conv1(x), 2)).mean((2, 3)))


def test_errors_raised_inside_torch_pruning_are_one_clear_line():
    """The old code let Torch-Pruning's own IndexError escape with a traceback."""
    pytest.importorskip("torch_pruning")
    model = PixelShuffleNet().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RenormError, match=r"^Torch-Pruning could not filter-prune this model \(.+\); use "
                                          r"--prune-type unstructured") as info:
        prune(model, PruneConfig(0.5, "filter", prune_first_last=True), example=torch.randn(2, 3, 8, 8))
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
