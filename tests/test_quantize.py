"""Weight and activation quantizers: levels, nearest assignment, scale fit, idempotence."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import SmallNet
from renorm.errors import RenormError
from renorm.quantize import activations as A
from renorm.quantize import weights as W


def brute_force_fit(w: torch.Tensor, scheme: str, bits: int, iterations: int = 100, tolerance: float = 1e-6):
    """The algorithm as specified, element by element: levels <- nearest(W/alpha) by argmin over
    the level set; alpha <- <W,Q>/<Q,Q>; from each starting scale; keep the best per row."""
    magnitudes = W.level_magnitudes(scheme, bits).float()
    levels = torch.cat([-magnitudes.flip(0)[:-1], magnitudes])
    best = None
    for divisor in W._start_divisors(scheme, bits):
        alpha = w.abs().amax(1) / divisor
        for _ in range(iterations if scheme != "minmax" else 0):
            q = levels[(w[..., None] / alpha[:, None, None] - levels).abs().argmin(-1)]
            new = (w * q).sum(1) / (q * q).sum(1)
            done = bool(((new - alpha).abs() <= tolerance * alpha).all())
            alpha = new
            if done:
                break
        q = levels[(w[..., None] / alpha[:, None, None] - levels).abs().argmin(-1)]
        error = ((w - alpha[:, None] * q) ** 2).sum(1)
        if best is None:
            best = (alpha, error)
        else:
            better = error < best[1]
            best = (torch.where(better, alpha, best[0]), torch.where(better, error, best[1]))
    return best


def test_levels_of_each_scheme():
    assert W.level_magnitudes("pow2", 4).tolist() == [0, 1, 2, 4, 8, 16, 32, 64]  # 15 levels with signs
    assert W.level_magnitudes("pow2", 2).tolist() == [0, 1]
    assert W.level_magnitudes("uniform", 3).tolist() == [0, 1, 2, 3]
    assert W.level_magnitudes("uniform", 8).tolist() == list(range(128))


@pytest.mark.parametrize("scheme,bits", [("pow2", 4), ("pow2", 3), ("uniform", 4), ("uniform", 2)])
def test_nearest_level_is_the_argmin(scheme, bits):
    magnitudes = W.level_magnitudes(scheme, bits).float()
    levels = torch.cat([-magnitudes.flip(0)[:-1], magnitudes])
    x = torch.randn(20000, generator=torch.Generator().manual_seed(bits)) * float(magnitudes[-1]) * 0.6
    boundaries = (magnitudes[1:] + magnitudes[:-1]) / 2
    x = x[((x.abs()[:, None] - boundaries).abs() > 1e-4).all(1)]  # exact ties may go either way
    expected = levels[(x[:, None] - levels).abs().argmin(1)]
    assert torch.equal(W.nearest_levels(x, scheme, bits), expected)
    codes = W.nearest_codes(x, scheme, bits)
    assert torch.equal(W.code_values(codes, scheme), expected)


@pytest.mark.parametrize("scheme,bits", [("pow2", 4), ("pow2", 2), ("uniform", 4), ("uniform", 2),
                                         ("uniform", 8), ("minmax", 3)])
def test_fast_fit_equals_the_specified_alternation(scheme, bits):
    w = torch.randn(24, 75, generator=torch.Generator().manual_seed(3)) * 0.1
    w[3] *= 20  # channels of very different scales
    alpha, codes = W.fit_channels(w, scheme, bits)
    expected_alpha, expected_error = brute_force_fit(w, scheme, bits)
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-5, atol=0)
    error = ((w - alpha[:, None] * W.code_values(codes, scheme)) ** 2).sum(1)
    torch.testing.assert_close(error, expected_error, rtol=1e-4, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 60), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 10**6),
       scheme=st.sampled_from(["pow2", "uniform"]), bits=st.integers(2, 6))
def test_fitted_scale_is_never_worse_than_minmax(rows, cols, scale, seed, scheme, bits):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    fitted = W.quantize_tensor(w, scheme, bits)
    minmax = W.quantize_tensor(w, "minmax", bits) if scheme == "uniform" else None
    errors = ((w - fitted.dequantize()) ** 2).sum(1)
    slack = 1e-9 * (w ** 2).sum(1)  # float error
    if minmax is not None:
        assert bool((errors <= ((w - minmax.dequantize()) ** 2).sum(1) * (1 + 1e-5) + slack).all())
    # and never worse than its own min-max start (max |w| on the top level)
    top = float(W.level_magnitudes(scheme, bits)[-1])
    start = w.abs().amax(1, keepdim=True) / top
    start_error = ((w - start * W.nearest_levels(w / start, scheme, bits)) ** 2).sum(1)
    assert bool((errors <= start_error * (1 + 1e-5) + slack).all())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 80), scale=st.floats(1e-3, 1e2), seed=st.integers(0, 10**6),
       scheme=st.sampled_from(["pow2", "uniform"]), bits=st.integers(2, 6))
def test_quantizing_a_quantized_tensor_changes_nothing(rows, cols, scale, seed, scheme, bits):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    once = W.quantize_tensor(w, scheme, bits)
    twice = W.quantize_tensor(once.dequantize(), scheme, bits)
    # Values are unchanged; codes may differ only where a row has several exact
    # representations (e.g. a single weight: code 5 at alpha or code 7 at 5/7 alpha).
    torch.testing.assert_close(twice.dequantize(), once.dequantize(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme,bits", [("pow2", 4), ("pow2", 2), ("uniform", 4), ("uniform", 8)])
def test_requantizing_real_weights_keeps_codes_and_scales(scheme, bits):
    w = torchvision.models.resnet18().layer2[0].conv1.weight.detach()
    once = W.quantize_tensor(w, scheme, bits)
    twice = W.quantize_tensor(once.dequantize(), scheme, bits)
    assert torch.equal(twice.codes, once.codes)
    torch.testing.assert_close(twice.scale, once.scale, rtol=1e-6, atol=0)


def test_codes_use_at_most_the_levels_of_the_bit_width():
    w = torch.randn(32, 3, 3, 3)
    for scheme, bits, count in [("pow2", 4, 15), ("pow2", 2, 3), ("uniform", 3, 7), ("uniform", 8, 255)]:
        q = W.quantize_tensor(w, scheme, bits)
        assert q.levels_used <= count
        assert int(q.codes.abs().max()) <= W.top_code(scheme, bits)
        for c in range(32):  # each channel is alpha_c times an allowed level
            levels = torch.unique(q.dequantize()[c] / q.scale[c])
            allowed = W.code_values(torch.arange(-W.top_code(scheme, bits), W.top_code(scheme, bits) + 1), scheme)
            assert all(torch.isclose(levels, v, rtol=1e-5).any() for v in levels)
            assert all(bool(torch.isclose(allowed, v, rtol=1e-5, atol=1e-6).any()) for v in levels)


def test_masked_weights_stay_zero_and_zero_channels_are_safe():
    w = torch.randn(8, 20)
    mask = torch.rand(8, 20) > 0.5
    mask[5] = False  # a whole pruned channel
    q = W.quantize_tensor(w, "pow2", 4, mask=mask)
    assert bool((q.dequantize()[~mask] == 0).all())
    assert torch.isfinite(q.scale).all()


def test_bit_width_checks():
    with pytest.raises(RenormError, match="uniform"):
        W.WeightQuantConfig(bits=8, scheme="pow2")
    for bits in (1, 9):
        with pytest.raises(RenormError, match=f"--wbits {bits}"):
            W.WeightQuantConfig(bits=bits, scheme="uniform")
    with pytest.raises(RenormError, match="scheme"):
        W.WeightQuantConfig(scheme="float8")


def test_quantize_resnet18_first_last_8_bit_and_the_rest_pow2():
    model = torchvision.models.resnet18(num_classes=10).eval()
    original = copy.deepcopy(model)
    model = W.quantize_weights(model, W.WeightQuantConfig(bits=4, scheme="pow2"))
    rows = {r["layer"]: r for r in W.weight_quantization_stats(model)}
    assert len(rows) == 21  # 20 convs + fc
    assert rows["conv1"]["bits"] == 8 and rows["conv1"]["scheme"] == "uniform"
    assert rows["fc"]["bits"] == 8 and rows["fc"]["scheme"] == "uniform"
    inner = [r for name, r in rows.items() if name not in ("conv1", "fc")]
    assert all(r["bits"] == 4 and r["scheme"] == "pow2" and r["levels_used"] <= 15 for r in inner)
    # Kaiming-uniform weights: 4-bit pow2 keeps ~96-97% of the energy; 8-bit nearly all.
    assert all(r["relative_mse"] < 0.06 for r in inner)
    assert rows["conv1"]["relative_mse"] < 1e-4
    # the stored codes reproduce the weights the model now runs with
    torch.testing.assert_close(model.layer1[0].conv1._renorm_quantized.dequantize(), model.layer1[0].conv1.weight)
    assert torch.equal(model.bn1.running_mean, original.bn1.running_mean)  # nothing else touched


def test_depthwise_and_transposed_convs_are_per_output_channel():
    dw = nn.Conv2d(16, 16, 3, groups=16)
    q = W.quantize_tensor(dw.weight, "pow2", 4, axis=W.output_axis(dw))
    assert q.scale.shape == (16,) and q.codes.shape == (16, 1, 3, 3)
    tr = nn.ConvTranspose2d(4, 6, 3)
    assert W.output_axis(tr) == 1
    q = W.quantize_tensor(tr.weight, "uniform", 4, axis=1)
    assert q.scale.shape == (6,)
    torch.testing.assert_close(q.dequantize(), tr.weight.detach(), rtol=0, atol=float(q.scale.max()))


def test_exclusions_and_float_first_last():
    model = SmallNet()
    model = W.quantize_weights(model, W.WeightQuantConfig(bits=3, scheme="uniform", first_last_bits=0, exclude=("fc1",)))
    names = {r["layer"] for r in W.weight_quantization_stats(model)}
    assert names == {"conv2"}
    with pytest.raises(RenormError, match="--exclude names no conv/linear layer 'nope'"):
        W.quantize_weights(SmallNet(), W.WeightQuantConfig(exclude=("nope",)))


# --------------------------------------------------------------------------- activations
def test_activation_scale_fit_beats_its_max_start_and_is_unsigned_after_relu():
    x = torch.relu(torch.randn(100000)) ** 2  # heavy right tail: max/levels wastes range
    q = A.fit_activation_scale(x, float(x.max()), signed=False, bits=4)
    start = A.ActivationQuantizer(float(x.max()) / 15, False, 4)
    assert ((x - q(x)) ** 2).mean() < ((x - start(x)) ** 2).mean()
    assert q.limits == (0, 15)
    assert torch.unique(q(x)).numel() <= 16
    assert torch.equal(q(q(x)), q(x))  # idempotent


def test_calibration_puts_signed_quantizers_on_signed_inputs(small_net, images):
    model = A.calibrate_activations(copy.deepcopy(small_net), images, A.ActivationQuantConfig(bits=8, num_images=64),
                                    batch_size=16)
    rows = {r["layer"]: r for r in A.activation_quantization_stats(model)}
    assert set(rows) == {"conv1", "conv2", "fc1", "fc2"}
    assert rows["conv1"]["signed"]  # the image
    assert not rows["conv2"]["signed"] and not rows["fc2"]["signed"]  # after ReLU
    assert all(r["relative_mse"] < 1e-3 for r in rows.values())
    with torch.no_grad():
        quantized, float_out = model(images), small_net(images)
        assert not torch.equal(quantized, float_out)
        torch.testing.assert_close(quantized, float_out, rtol=0.05, atol=0.05)
        copied = copy.deepcopy(model)
        assert torch.equal(copied(images), quantized)  # survives deepcopy
        A.detach(copied)
        assert torch.equal(copied(images), float_out)


def test_activation_sample_budget_follows_the_real_batches(small_net, images, monkeypatch):
    """The old budget assumed `batch_size` images per batch: a DataLoader of batch 1 kept 50x
    max_samples values per layer (many GB at 224 px)."""
    from torch.utils.data import DataLoader, TensorDataset

    kept = []
    fit = A.fit_activation_scale

    def spy(values, *args, **kwargs):
        kept.append(len(values))
        return fit(values, *args, **kwargs)

    monkeypatch.setattr(A, "fit_activation_scale", spy)
    loader = DataLoader(TensorDataset(images[:40]), batch_size=1)
    A.calibrate_activations(small_net, loader, A.ActivationQuantConfig(bits=8, num_images=40, max_samples=400))
    assert len(kept) == 4 and max(kept) <= 400  # the old code kept all 432 x 40 values of conv1's input


def test_excluded_layers_stay_in_float_depthwise_included():
    """--exclude leaves a layer's weights exactly as they were (the README said '8 bits with --exclude')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1), nn.Flatten(),
                          nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    q = W.quantize_weights(model, W.WeightQuantConfig(bits=4, exclude=("1",)))
    assert torch.equal(q[1].weight, model[1].weight) and not hasattr(q[1], "_renorm_quantized")
    assert {r["layer"]: r["bits"] for r in W.weight_quantization_stats(q)} == {"0": 8, "2": 4, "4": 8}
