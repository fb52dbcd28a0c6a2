"""BatchNorm re-estimation: exact statistics, batch-size independence, shift, guarantees."""
from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import SmallNet, perturbed
from renorm.errors import RenormError
from renorm.evaluate import agreement, predict
from renorm.renormalize import MODES, Moments, _batch_moments, batchnorm_layers, renormalize, renormalize_with_summary


@torch.no_grad()
def direct_fixed_point(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The statistics by definition: BatchNorm by BatchNorm in order, each one's input computed
    over all images at once (float64) with every earlier BatchNorm already set."""
    model = copy.deepcopy(model).double().eval()
    x = images.double()
    result = {}
    for name, bn in batchnorm_layers(model):
        captured = {}
        handle = bn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
        model(x)
        handle.remove()
        inp = captured["x"]
        dims = [d for d in range(inp.dim()) if d != 1]
        mean, var = inp.mean(dims), inp.var(dims, unbiased=True)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        result[name] = (mean, var)
    return result


def stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (bn.running_mean.double(), bn.running_var.double()) for name, bn in batchnorm_layers(model)}


def assert_stats_close(a, b, rtol, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], rtol=rtol, atol=atol, msg=f"mean of {name}")
        torch.testing.assert_close(a[name][1], b[name][1], rtol=rtol, atol=atol, msg=f"var of {name}")


@torch.no_grad()
def direct_progressive(model: nn.Module, images: torch.Tensor, chunk: int) -> dict:
    """The progressive estimate by definition: chunk by chunk, BatchNorm by BatchNorm, each set
    from all its inputs so far (float64), the chunk's input computed with earlier layers set."""
    model = copy.deepcopy(model).double().eval()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in batchnorm_layers(model)}
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].double()
        for name, bn in batchnorm_layers(model):
            captured = {}
            handle = bn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
            model(x)
            handle.remove()
            seen[name].append(captured["x"])
            inp = torch.cat(seen[name])
            dims = [d for d in range(inp.dim()) if d != 1]
            bn.running_mean.copy_(inp.mean(dims))
            bn.running_var.copy_(inp.var(dims, unbiased=True))
    return stats(model)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 96])
def test_exact_equals_the_fixed_point_when_the_images_fit_one_chunk(small_net, images, batch_size):
    expected = direct_fixed_point(small_net, images)
    got = stats(renormalize(small_net, images, "exact", batch_size=batch_size, chunk=len(images)))
    assert_stats_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 10, 40])
def test_exact_equals_a_direct_progressive_computation(small_net, images, chunk):
    expected = direct_progressive(small_net, images, chunk)
    got = stats(renormalize(small_net, images, "exact", batch_size=7, chunk=chunk))
    assert_stats_close(got, expected, rtol=1e-4)


def test_result_does_not_depend_on_batch_size(small_net, images):
    results = [stats(renormalize(small_net, images, "exact", batch_size=b, chunk=16)) for b in (1, 3, 16, 50, 96)]
    for other in results[1:]:
        assert_stats_close(other, results[0], rtol=1e-5)


def test_progressive_estimate_is_near_the_fixed_point_and_uses_every_image(small_net, images):
    fixed_point = direct_fixed_point(small_net, images)
    progressive = stats(renormalize(small_net, images, "exact", chunk=16))
    assert_stats_close(progressive, fixed_point, rtol=0.15, atol=0.05)
    # the first layer sees no earlier BatchNorm: its statistics are exact over all 96 images
    torch.testing.assert_close(progressive["bn1"][0], fixed_point["bn1"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(progressive["bn1"][1], fixed_point["bn1"][1], rtol=1e-5, atol=1e-6)


def test_pytorch_train_mode_one_batch_is_close_to_the_fixed_point(small_net, images):
    """The paper's method (one train-mode batch of all images) approximates the same thing."""
    model = copy.deepcopy(small_net)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
    with torch.no_grad():
        model(images)
    assert_stats_close(stats(model), direct_fixed_point(small_net, images), rtol=5e-3, atol=1e-4)


def test_moments_merge_matches_direct():
    x = torch.randn(103, 5, 4, 3, dtype=torch.float64) * 3 + 2
    moments = Moments()
    for chunk in x.split(17):
        moments.add(chunk.float())
    torch.testing.assert_close(moments.mean, x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments.variance, x.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert moments.count == 103 * 4 * 3


@pytest.mark.parametrize("case", ["plain", "large mean", "constant channel", "channels_last", "2d", "float16"])
def test_batch_moments_match_float64(case):
    """The fast sums path and its Welford fallback both give float64-grade moments."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, 28, 28, generator=g, dtype=torch.float64) * 3 + 2
    if case == "large mean":  # mean^2 / var ~ 1e5: the sums would lose ~1% of the variance; Welford must take over
        x = x + 900
    if case == "constant channel":
        x[:, 2] = 5.0
    if case == "2d":
        x = x[:, :, 0, 0]
    dims = [d for d in range(x.dim()) if d != 1]
    low = x.to(torch.float16 if case == "float16" else torch.float32)
    if case == "channels_last":
        low = low.contiguous(memory_format=torch.channels_last)
    got_mean, got_var = _batch_moments(low)
    assert got_mean.dtype == got_var.dtype == torch.float64
    rtol = 2e-3 if case == "float16" else 1e-5
    exact = low.double()  # the numbers the model really produced, measured in float64
    torch.testing.assert_close(got_mean, exact.mean(dims), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(got_var, exact.var(dims, correction=0), rtol=rtol, atol=1e-6)


def test_only_batchnorm_statistics_change_and_callers_model_is_untouched(small_net, images):
    small_net.train()  # the caller's mode must be kept too
    before = copy.deepcopy(small_net.state_dict())
    momentum, eps = small_net.bn1.momentum, small_net.bn1.eps
    out = renormalize(small_net, images, "exact", batch_size=16)
    assert small_net.training and all(m.training for m in small_net.modules())
    for key, value in small_net.state_dict().items():
        assert torch.equal(value, before[key]), f"caller's {key} changed"
    assert not out.training and not any(m.training for m in out.modules())
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{bn}.{s}" for bn in ("bn1", "bn2", "bn3") for s in ("running_mean", "running_var")}
    assert out.bn1.momentum == momentum and out.bn1.eps == eps


def test_dropout_stays_in_eval_mode_so_statistics_are_deterministic(images):
    torch.manual_seed(0)
    net = perturbed(nn.Sequential(nn.Conv2d(3, 6, 3), nn.Dropout(0.5), nn.BatchNorm2d(6), nn.ReLU()))
    net.train()  # a caller's model in train mode: dropout must still not act during re-estimation
    a = renormalize(net, images, "exact", batch_size=16, chunk=16)
    b = renormalize(net, images, "exact", batch_size=16, chunk=16)
    assert_stats_close(stats(a), stats(b), rtol=0, atol=0)
    with torch.no_grad():
        clean = net[0](images)
    dims = (0, 2, 3)
    torch.testing.assert_close(a[2].running_mean.double(), clean.double().mean(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[2].running_var.double(), clean.double().var(dims), rtol=1e-5, atol=1e-6)


def test_shift_keeps_the_reference_model_mode(small_net, images):
    reference = copy.deepcopy(small_net).train()
    renormalize(small_net, images, "shift", reference=reference, batch_size=32)
    assert all(m.training for m in reference.modules())


def test_inplace_modifies_and_returns_the_same_model(small_net, images):
    expected = renormalize(copy.deepcopy(small_net), images, "exact")
    before = copy.deepcopy(small_net.state_dict())
    out = renormalize(small_net, images, "exact", inplace=True)
    assert out is small_net
    assert not torch.equal(small_net.bn1.running_mean, before["bn1.running_mean"])  # modified...
    for key, value in expected.state_dict().items():  # ...exactly as a copy is
        assert torch.equal(small_net.state_dict()[key], value), key


def test_model_without_batchnorm_is_returned_unchanged_with_a_warning(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    model(images[:1])
    with pytest.warns(UserWarning, match="no BatchNorm"):
        out = renormalize(model, images)
    with torch.no_grad():
        assert torch.equal(out(images[:5]), model(images[:5]))


def test_batchnorm_without_affine_and_3d():
    torch.manual_seed(0)
    net = perturbed(SmallNet(affine=False))
    x = torch.randn(40, 3, 8, 8)
    assert_stats_close(stats(renormalize(net, x, "exact", batch_size=9, chunk=40)),
                       direct_fixed_point(net, x), rtol=1e-4)
    net3d = perturbed(nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1),
                                    nn.BatchNorm3d(3)))
    v = torch.randn(12, 2, 5, 5, 5)
    assert_stats_close(stats(renormalize(net3d, v, "exact", batch_size=5, chunk=12)),
                       direct_fixed_point(net3d, v), rtol=1e-4)


def test_shift_of_an_uncompressed_model_changes_nothing(small_net, images):
    out = renormalize(small_net, images, "shift", reference=small_net, batch_size=16)
    assert_stats_close(stats(out), stats(small_net), rtol=1e-5)


def test_shift_applies_the_formula_on_a_single_layer():
    torch.manual_seed(0)
    fp32 = perturbed(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)))
    compressed = copy.deepcopy(fp32)
    compressed[0].weight.data.mul_(1.3).add_(0.05)
    x = torch.randn(30, 3, 9, 9)
    with torch.no_grad():
        a, b = fp32[0](x).double(), compressed[0](x).double()
    dims = (0, 2, 3)
    expected_mean = fp32[1].running_mean.double() + b.mean(dims) - a.mean(dims)
    expected_var = fp32[1].running_var.double() * b.var(dims) / a.var(dims)
    out = renormalize(compressed, x, "shift", reference=fp32, batch_size=7)
    torch.testing.assert_close(out[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1].running_var.double(), expected_var, rtol=1e-5, atol=1e-6)


def test_shift_handles_channels_that_compression_killed(small_net, images):
    compressed = copy.deepcopy(small_net)
    compressed.conv1.weight.data[2] = 0  # channel 2 of bn1's input becomes the constant bias
    out = renormalize(compressed, images, "shift", reference=small_net, batch_size=16)
    for name, bn in batchnorm_layers(out):
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all(), name
    with torch.no_grad():
        pre = out.conv1(images)
        y = out.bn1(pre)
    # the dead channel is centred: it outputs beta, not (bias - old mean) / sqrt(eps)
    torch.testing.assert_close(y[:, 2], torch.full_like(y[:, 2], float(out.bn1.bias[2].detach())), rtol=1e-4, atol=1e-4)


def test_shift_needs_a_reference(small_net, images):
    with pytest.raises(RenormError, match="reference"):
        renormalize(small_net, images, "shift")


def test_accepts_a_dataloader_and_rejects_a_generator(small_net, images):
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=20)
    from_loader = stats(renormalize(small_net, loader, "exact", chunk=16))
    from_tensor = stats(renormalize(small_net, images, "exact", batch_size=20, chunk=16))
    assert_stats_close(from_loader, from_tensor, rtol=1e-6)
    with pytest.raises(RenormError, match="re-iterable"):
        renormalize(small_net, (b for b in images.split(10)), "exact")


def test_none_mode_and_bad_mode(small_net, images):
    assert_stats_close(stats(renormalize(small_net, images, "none")), stats(small_net), rtol=0, atol=0)
    with pytest.raises(RenormError, match="mode"):
        renormalize(small_net, images, "magic")


def kl_to(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    return agreement(predict(model, images)[0], predict(reference, images)[0])["kl"]


def test_auto_keeps_the_statistics_of_the_mode_closest_to_the_reference_on_the_last_images(small_net, images,
                                                                                           monkeypatch):
    monkeypatch.setattr(sys.modules["renorm.renormalize"], "AUTO_IMAGES", 40)
    compressed = copy.deepcopy(small_net)
    compressed.conv1.weight.data.mul_(1.4)
    compressed.fc1.weight.data.add_(0.1)
    tail = images[-40:]
    each = {mode: renormalize(compressed, images, mode, reference=small_net, chunk=32) for mode in MODES}
    kl = {mode: kl_to(model, small_net, tail) for mode, model in each.items()}
    assert len(set(kl.values())) == 3  # a real choice
    expected = min(MODES, key=lambda mode: kl[mode])
    before = stats(compressed)
    out, summary = renormalize_with_summary(compressed, images, "auto", reference=small_net, chunk=32)
    assert summary["chosen"] == expected and summary["scored_images"] == 40
    assert summary["kl"] == pytest.approx(kl, rel=1e-5)
    assert_stats_close(stats(out), stats(each[expected]), rtol=0, atol=0)  # each mode started from the originals
    assert_stats_close(stats(compressed), before, rtol=0, atol=0)  # the caller's model is untouched
    # scored on the first 40 images instead, the KLs differ: the tail is what counts
    assert kl_to(out, small_net, images[:40]) != pytest.approx(summary["kl"][expected], rel=1e-3)


def test_auto_recovers_statistics_that_only_re_estimation_can_restore(small_net, images):
    reference = renormalize(small_net, images, "exact", chunk=128)  # statistics at these images' fixed point
    corrupted = perturbed(copy.deepcopy(reference), seed=7)  # same weights, wrong statistics (and affine)
    corrupted.load_state_dict({k: v for k, v in reference.state_dict().items() if "running" not in k}, strict=False)
    out, summary = renormalize_with_summary(corrupted, images, "auto", reference=reference, chunk=128)
    assert summary["chosen"] == "exact" and summary["kl"]["exact"] < 1e-9 < summary["kl"]["none"]
    assert_stats_close(stats(out), stats(reference), rtol=1e-5)


def test_auto_leaves_an_uncompressed_model_as_it_is(small_net, images):
    out, summary = renormalize_with_summary(small_net, images, "auto", reference=small_net)
    assert summary["chosen"] in ("shift", "none") and summary["kl"]["exact"] > 1e-4
    assert_stats_close(stats(out), stats(small_net), rtol=1e-5)


def test_auto_breaks_ties_towards_exact_then_shift(small_net, images, monkeypatch):
    """The README: ties keep the earlier of exact, shift, none."""
    evaluate = sys.modules["renorm.evaluate"]
    monkeypatch.setattr(evaluate, "agreement", lambda *args, **kwargs: {"kl": 0.5})
    compressed = copy.deepcopy(small_net)
    compressed.conv1.weight.data.mul_(1.4)
    out, summary = renormalize_with_summary(compressed, images, "auto", reference=small_net)
    assert summary["chosen"] == "exact"
    assert_stats_close(stats(out), stats(renormalize(compressed, images, "exact")), rtol=0, atol=0)


def test_auto_needs_a_reference(small_net, images):
    with pytest.raises(RenormError, match="reference"):
        renormalize(small_net, images, "auto")


def test_wrong_image_size_is_a_clear_error(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RenormError, match="do not fit the model"):
            renormalize(model, torch.randn(8, 3, 20, 20))


# --------------------------------------------------------------------------- shift after pruning, idempotence
class TwoConvs(nn.Module):
    """Fresh BatchNorms: every channel stores the same numbers (mean 0, var 1, weight 1, bias 0)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.conv1.weight[:8] *= 0.01  # the L1 criterion removes channels 0..7 of conv1 first
            self.conv1.bias[:8] = 0

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_shift_after_filter_pruning_uses_the_recorded_channels_when_rows_tie(images):
    """The old code matched tied rows to the first candidates ([0..7] for [8..15]) and shifted
    bn1 by other channels' FP32 statistics; the record of removed channels was unused."""
    pytest.importorskip("torch_pruning")
    from renorm.prune import PruneConfig, kept_channels, prune

    torch.manual_seed(0)
    fp32 = TwoConvs().eval()
    pruned, _ = prune(fp32, PruneConfig(0.5, "filter", prune_first_last=True), example=images[:4], latency_repeats=1)
    assert kept_channels(fp32, pruned._renorm_pruned_channels)["bn1"].tolist() == list(range(8, 16))
    out = renormalize(pruned, images, "shift", reference=fp32, batch_size=32)
    # bn1's kept inputs are exactly FP32's channels 8..15: shift must leave FP32's stored statistics
    torch.testing.assert_close(out.bn1.running_mean, torch.zeros(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.bn1.running_var, torch.ones(8), rtol=1e-5, atol=1e-6)


def test_shift_after_pruning_an_already_pruned_model_replays_only_the_new_step(images):
    """compress --prune filter --renorm shift on a model renorm had filter-pruned before: the
    reference carries the first step of the record, the compressed model both."""
    pytest.importorskip("torch_pruning")
    from renorm.api import Config, compress
    from renorm.prune import PruneConfig, prune

    torch.manual_seed(0)
    once, _ = prune(TwoConvs(width=32).eval(), PruneConfig(0.25, "filter", prune_first_last=True),
                    example=images[:4], latency_repeats=1)
    assert once.conv1.out_channels == 24
    result = compress(once, images, Config(wbits=32, prune=0.34, prune_type="filter", prune_first_last=True,
                                           renorm="shift", batch_size=32))
    twice = result.model
    kept = twice.conv1.out_channels
    assert kept < 24 and [len(step["history"]) > 0 for step in twice._renorm_pruned_channels] == [True, True]
    torch.testing.assert_close(twice.bn1.running_mean, torch.zeros(kept), rtol=0, atol=1e-5)
    torch.testing.assert_close(twice.bn1.running_var, torch.ones(kept), rtol=1e-5, atol=1e-6)


def test_shift_refuses_to_guess_between_tied_channels_of_a_model_pruned_elsewhere(images):
    tp = pytest.importorskip("torch_pruning")
    fp32 = TwoConvs().eval()
    pruned = copy.deepcopy(fp32)
    graph = tp.DependencyGraph().build_dependency(pruned, images[:1])
    graph.get_pruning_group(pruned.conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2]).prune()
    with pytest.raises(RenormError, match=r"bn1.*16 channels .* share the same stored numbers.*--renorm exact"):
        renormalize(pruned, images, "shift", reference=fp32)
    renormalize(pruned, images, "exact")  # exact needs no matching


def test_shift_is_idempotent(small_net, images):
    """The old shift moved the model's current statistics: a second pass shifted twice."""
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights

    # a copy, so that the test needs no copy-on-quantize: it fails for the double shift alone
    compressed = quantize_weights(copy.deepcopy(small_net), WeightQuantConfig(bits=2, scheme="uniform",
                                                                              first_last_bits=0))
    once = renormalize(compressed, images, "shift", reference=small_net, batch_size=32)
    twice = renormalize(once, images, "shift", reference=small_net, batch_size=32)
    assert not torch.allclose(once.bn2.running_mean, small_net.bn2.running_mean)
    assert_stats_close(stats(twice), stats(once), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- BatchNorms that do not run once
class Unusual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)
        self.twice = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.twice(torch.relu(self.twice(x)))


def test_batchnorms_that_never_run_or_run_twice_are_named_and_not_counted(images):
    """The old code counted an unused BatchNorm in layers_updated and merged two call sites silently."""
    from renorm.api import Config, compress
    from renorm.renormalize import renormalize_with_summary

    model = perturbed(Unusual())
    with pytest.warns(UserWarning) as caught:
        out, summary = renormalize_with_summary(model, images, "exact", batch_size=32, chunk=32)
    messages = " | ".join(str(w.message) for w in caught)
    assert "1 BatchNorm layers never ran on the images and keep their old statistics" in messages and "unused" in messages
    assert "BatchNorm twice runs 2 times per forward pass" in messages
    assert summary == {"mode": "exact", "images": 96, "layers_updated": 2, "not_run": ["unused"],
                       "shared": {"twice": 2}}
    assert torch.equal(out.unused.running_mean, model.unused.running_mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress(model, images, Config(wbits=32, batch_size=32)).report
    assert report["batchnorm"]["layers_updated"] == 2 and report["batchnorm"]["not_run"] == ["unused"]
