"""Reconstruction: the rounding problem, its solvers, and the stage on whole models."""
from __future__ import annotations

import copy
import sys
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SmallNet, perturbed
from renorm.errors import RenormError
from renorm.quantize.weights import (ATTRIBUTE, MASK_ATTRIBUTE, WeightQuantConfig, fit_channels, level_magnitudes,
                                     quantize_weights)
from renorm.reconstruct import Problem, ReconstructConfig, reconstruct, solve_adaround, solve_gptq, solve_nearest
from renorm.reconstruct.solvers import _cholesky, descend
from renorm.reconstruct.inputs import _conv_site, _rows


def _layer_problem(scheme: str, bits: int, seed: int = 0, rows: int = 16, size: int = 24,
                   mask: bool = False) -> tuple[Problem, torch.Tensor]:
    """A linear layer's problem on fixed, strongly correlated inputs; returns (problem, inputs)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(size, size, generator=generator, dtype=torch.float64)
    inputs = torch.randn(512, size, generator=generator, dtype=torch.float64) @ basis  # correlated columns
    weight = torch.randn(rows, size, generator=generator, dtype=torch.float64) * 0.1
    hessian = (inputs.T @ inputs / len(inputs))[None]
    scale, _ = fit_channels(weight.float(), scheme, bits)
    keep = (torch.rand(rows, size, generator=generator) > 0.3).double()[None] if mask else None
    target = weight[None] * keep if keep is not None else weight[None]
    return Problem(target, target, hessian, scale.double()[None], scheme, bits, keep), inputs


def _output_error(problem: Problem, values: torch.Tensor, scale: torch.Tensor, inputs: torch.Tensor) -> float:
    """||X W^T - X Wq^T||^2, on the inputs themselves."""
    quantized = (values * scale[..., None])[0]
    return float(((inputs @ problem.weight[0].T - inputs @ quantized.T) ** 2).sum())


@pytest.mark.parametrize("scheme,bits", [("uniform", 4), ("pow2", 4), ("uniform", 3), ("uniform", 2)])
def test_methods_beat_nearest_on_a_fixed_layer(scheme, bits):
    problem, inputs = _layer_problem(scheme, bits)
    nearest = _output_error(problem, *solve_nearest(problem), inputs)
    gptq = _output_error(problem, *solve_gptq(problem), inputs)
    adaround = _output_error(problem, *solve_adaround(problem, steps=400), inputs)
    assert gptq < 0.8 * nearest, (gptq, nearest)
    assert adaround < 0.8 * nearest, (adaround, nearest)


@pytest.mark.parametrize("solver", ["gptq", "adaround"])
@pytest.mark.parametrize("scheme", ["pow2", "uniform"])
def test_codes_stay_on_the_grid_and_masks_stay_zero(solver, scheme):
    problem, _ = _layer_problem(scheme, 4, seed=3, mask=True)
    values, scale = solve_gptq(problem) if solver == "gptq" else solve_adaround(problem, steps=200)
    nearest, nearest_scale = solve_nearest(problem)
    per_row = problem.error(values * scale[..., None])
    assert bool((per_row <= problem.error(nearest * nearest_scale[..., None]) * (1 + 1e-9)).all())
    assert bool((scale > 0).all())
    assert bool((values[problem.mask == 0] == 0).all())
    magnitudes = values.abs()
    if scheme == "pow2":  # 0 or 2^k, k = 0..6 at 4 bits
        exponent = torch.log2(magnitudes[magnitudes > 0])
        assert bool((exponent == exponent.round()).all()) and float(exponent.max()) <= 6
    else:
        assert bool((magnitudes == magnitudes.round()).all()) and float(magnitudes.max()) <= 7


@pytest.mark.parametrize("scheme,bits", [("uniform", 2), ("uniform", 3), ("uniform", 4), ("pow2", 4)])
def test_descent_after_gptq_ends_in_a_local_minimum_below_gptq(scheme, bits):
    """Coordinate descent never raises a row's objective, lowers the total on correlated inputs, and stops
    where no single weight can move to the level below or above and lower the objective."""
    problem, _ = _layer_problem(scheme, bits, seed=7, mask=True)
    values, scale = solve_gptq(problem)
    before = problem.error(values * scale[..., None])
    descended = descend(problem, values, scale, sweeps=100)
    after = problem.error(descended * scale[..., None])
    assert bool((after <= before * (1 + 1e-9)).all())
    assert float(after.sum()) < 0.97 * float(before.sum()), (float(after.sum()), float(before.sum()))
    assert bool((descended[problem.mask == 0] == 0).all())
    grid = sorted({*level_magnitudes(scheme, bits).tolist(), *(-level_magnitudes(scheme, bits)).tolist()})
    assert set(descended.unique().tolist()) <= set(grid)
    for row in range(descended.shape[1]):
        for k in range(descended.shape[2]):
            if problem.mask[0, row, k] == 0:
                continue
            index = grid.index(float(descended[0, row, k]))
            for other in grid[max(index - 1, 0):index + 2]:
                moved = descended.clone()
                moved[0, row, k] = other
                assert float(problem.error(moved * scale[..., None])[0, row]) >= float(after[0, row]) * (1 - 1e-9)


def test_gptq_with_sweeps_is_gptq_then_descent_then_scale_refit():
    problem, _ = _layer_problem("uniform", 3, seed=9)
    plain_values, plain_scale = solve_gptq(problem)
    values, scale = solve_gptq(problem, sweeps=2)
    assert torch.equal(values, descend(problem, plain_values, plain_scale, sweeps=2))
    assert torch.allclose(scale, problem.refit_scale(values, plain_scale))
    assert float(problem.error(values * scale[..., None]).sum()) < float(problem.error(plain_values * plain_scale[..., None]).sum())


def test_diagonal_curvature_makes_nearest_rounding_optimal():
    """Uncorrelated inputs: no error can be fed forward, so GPTQ's answer is nearest rounding."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 8, 30, generator=generator, dtype=torch.float64)
    hessian = torch.diag_embed(torch.rand(1, 30, generator=generator, dtype=torch.float64) + 0.5)
    scale = torch.full((1, 8), 0.3, dtype=torch.float64)
    problem = Problem(weight, weight, hessian, scale, "uniform", 3)
    nearest, _ = solve_nearest(problem)
    gptq, _ = solve_gptq(problem, rounds=1)
    assert torch.equal(gptq, nearest)


def test_a_known_best_rounding_is_recovered():
    """W* = q + p, p a pattern of +-0.6 and +-0.3, and inputs that hardly vary along p.

    With H = I - (1 - eps) u u^T (u = p / |p|), q costs almost nothing (eps |p|^2) and is
    the unique best rounding; nearest rounding moves the 0.6s a level the wrong way and
    keeps the 0.3s, a step off the flat direction that costs about 1. Both methods must
    find q exactly.
    """
    generator = torch.Generator().manual_seed(11)
    rows, size = 6, 12
    best = torch.randint(-5, 6, (1, rows, size), generator=generator).double()  # 4-bit uniform levels
    sign = torch.where(torch.rand(rows, size, generator=generator) < 0.5, -1.0, 1.0).double()
    pattern = sign * torch.where(torch.rand(rows, size, generator=generator) < 0.5, 0.6, 0.3).double()
    for row in range(rows):  # one row at a time: each row has its own flat direction
        u = pattern[row] / pattern[row].norm()
        hessian = (torch.eye(size, dtype=torch.float64) - (1 - 1e-4) * torch.outer(u, u))[None]
        target = best[:, row:row + 1] + pattern[row]
        problem = Problem(target, target, hessian, torch.ones(1, 1, dtype=torch.float64), "uniform", 4)
        nearest, _ = solve_nearest(problem)
        assert float(problem.error(nearest)) > 1000 * float(problem.error(best[:, row:row + 1]))
        for values, _ in (solve_gptq(problem, rounds=1), solve_adaround(problem, steps=500)):
            assert torch.equal(values, best[:, row:row + 1]), row


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6),  # depthwise
    nn.Conv2d(6, 4, 1),
])
def test_sampled_rows_are_the_convolution_patches(conv):
    x = torch.randn(3, 6, 11, 9, generator=torch.Generator().manual_seed(0))
    site = _conv_site(conv.weight, (x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups), {})
    rows = _rows(x, site, 10 ** 9, torch.Generator().manual_seed(0))  # every position
    output = conv(x) - conv.bias[None, :, None, None]
    groups, per_group = conv.groups, conv.out_channels // conv.groups
    weight = conv.weight.detach().reshape(groups, per_group, -1)
    from_rows = torch.einsum("gnk,grk->gnr", rows, weight)  # (groups, positions, out per group)
    expected = output.detach().reshape(3, groups, per_group, -1).permute(1, 0, 3, 2).reshape(groups, -1, per_group)
    assert torch.allclose(from_rows, expected, atol=1e-5)


class DepthwiseNet(nn.Module):
    """Stem, depthwise-separable block with a residual add, grouped conv, pooled linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=4)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.depthwise(y)))
        x = x + self.bn3(self.project(y))
        x = F.relu(self.grouped(x))
        return self.fc(x.mean((2, 3)))


def _output_gap(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(images) - reference(images)) ** 2).mean())


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_reconstruction_brings_a_depthwise_net_closer_to_fp32(method):
    torch.manual_seed(0)
    fp32 = perturbed(DepthwiseNet())
    images = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    state = copy.deepcopy(fp32.state_dict())
    quantized = quantize_weights(copy.deepcopy(fp32), WeightQuantConfig(bits=3, scheme="uniform"))
    quantized_state = copy.deepcopy(quantized.state_dict())
    config = ReconstructConfig(method=method, num_images=64, steps=300)
    result = reconstruct(quantized, fp32, images, config)
    assert _output_gap(result, fp32, images) < 0.7 * _output_gap(quantized, fp32, images)
    for key, value in fp32.state_dict().items():  # the callers' models are untouched
        assert torch.equal(value, state[key]), key
    for key, value in quantized.state_dict().items():
        assert torch.equal(value, quantized_state[key]), key
    for name, module in result.named_modules():
        record = getattr(module, ATTRIBUTE, None)
        if record is not None:
            assert torch.equal(module.weight, record.dequantize()), name  # weights are their codes
            expected_bits = 8 if name in ("stem", "fc") else 3  # first and last stay 8-bit
            assert record.bits == expected_bits and int(record.codes.abs().max()) <= 2 ** (expected_bits - 1) - 1


def test_reconstruction_keeps_pruning_masks():
    from renorm.prune import PruneConfig, magnitude_prune

    torch.manual_seed(0)
    fp32 = perturbed(SmallNet())
    images = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    pruned = magnitude_prune(copy.deepcopy(fp32), PruneConfig(0.5))
    quantized = quantize_weights(copy.deepcopy(pruned), WeightQuantConfig(bits=4, scheme="pow2"))
    result = reconstruct(quantized, pruned, images, ReconstructConfig(num_images=48))
    for name, module in result.named_modules():
        mask = getattr(module, MASK_ATTRIBUTE, None)
        if mask is not None:
            assert bool((module.weight[~mask] == 0).all()), name


def test_reconstruction_needs_quantized_layers_and_a_matching_reference(small_net, images):
    with pytest.raises(RenormError, match="quantize_weights first"):
        reconstruct(small_net, small_net, images)
    quantized = quantize_weights(copy.deepcopy(small_net), WeightQuantConfig(bits=4))
    with pytest.raises(RenormError, match="same shape"):
        reconstruct(quantized, DepthwiseNet(), images)
    with pytest.raises(RenormError, match="not a method"):
        ReconstructConfig(method="magic")


def test_one_traced_pass_equals_a_pass_per_layer():
    """The torch.fx executor (each node once per chunk) computes exactly what re-running the model does."""
    torch.manual_seed(0)
    fp32 = perturbed(DepthwiseNet())
    images = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    quantized = quantize_weights(copy.deepcopy(fp32), WeightQuantConfig(bits=3, scheme="pow2"))
    traced, rerun = (reconstruct(quantized, fp32, images, ReconstructConfig(num_images=40, executor=executor),
                                 chunk=16) for executor in ("traced", "rerun"))
    for (key, a), b in zip(traced.state_dict().items(), rerun.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_dead_and_constant_inputs_do_not_break_reconstruction(method):
    """Inputs that never vary (a dead channel, a constant image) make H singular; Hypothesis found a
    grouped-conv net whose centered float32 H failed Cholesky. The layer must still be solved."""
    torch.manual_seed(0)
    fp32 = perturbed(SmallNet())
    images = torch.randn(24, 3, 8, 8)
    images[:, 0] = 0.0  # channel 0 dead
    images[:, 1] = 0.7  # channel 1 constant
    quantized = quantize_weights(fp32, WeightQuantConfig(bits=3, scheme="uniform", first_last_bits=3))
    out = reconstruct(quantized, fp32, images, ReconstructConfig(method=method, num_images=24, steps=50))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        record = getattr(getattr(out, name), ATTRIBUTE)
        assert torch.isfinite(getattr(out, name).weight).all()
        # solved: below round-to-nearest (which both solvers fall back to row by row), well below past conv1
        bound = 1.0 if name == "conv1" else 0.9
        assert record.reconstruction["objective"] < bound * record.reconstruction["objective_nearest"], name


def test_a_numerically_singular_curvature_is_factored():
    """A rank-one H (plus float32 round-off) is not positive definite even after 1% damping of a tiny
    diagonal; the factor adds damping where needed instead of failing."""
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(1, 16, 1, generator=generator)
    hessian = (direction @ direction.transpose(1, 2)) - 1e-4 * torch.eye(16)  # slightly indefinite
    weight = torch.randn(1, 4, 16, generator=generator)
    scale = torch.full((1, 4), 0.5)
    problem = Problem(weight, weight, hessian, scale, "uniform", 4)
    values, new_scale = solve_gptq(problem)
    assert bool(torch.isfinite(values).all()) and bool((values == values.round()).all())
    assert bool(torch.isfinite(new_scale).all())
    # solved, not given up on: far below round-to-nearest's objective on the one direction that matters
    nearest, nearest_scale = solve_nearest(problem)
    solved = problem.error(values * new_scale[..., None]).sum()
    assert solved < 0.5 * problem.error(nearest * nearest_scale[..., None]).sum()
    factor = _cholesky(hessian)  # and the factor is of H, damped no more than needed
    assert bool(torch.isfinite(factor).all())
    assert float((factor @ factor.transpose(1, 2) - hessian).abs().max()) <= 1e-2 * float(hessian.diagonal(0, 1, 2).mean())


def test_auto_executor_keeps_a_cut_only_when_it_fits(monkeypatch):
    """The traced executor keeps one cut of activations for every image; past cache_mb, auto re-runs the
    model per layer instead (memory flat in the number of images)."""
    import importlib

    from renorm.reconstruct.inputs import Layer, cut_bytes, graph_of

    module = importlib.import_module("renorm.reconstruct")  # the attribute renorm.reconstruct is the function

    fp32 = perturbed(DepthwiseNet())
    images = torch.randn(20, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    quantized = quantize_weights(fp32, WeightQuantConfig(bits=4, scheme="uniform"))
    used = []
    original = module.layer_major
    monkeypatch.setattr(module, "layer_major", lambda *a: (used.append(True), original(*a))[1])
    reconstruct(quantized, fp32, images, ReconstructConfig(num_images=20))
    assert used == [True]
    reconstruct(quantized, fp32, images, ReconstructConfig(num_images=20, cache_mb=0.001))
    assert used == [True]  # the cut (20 images of 12x12 activations) is over 1 kB: re-run per layer
    layers = [Layer(n, m, m, None, None) for n, m in quantized.named_modules()
              if getattr(m, ATTRIBUTE, None) is not None]
    per_image = cut_bytes(graph_of(quantized, layers), layers, images[:1])
    widest = max(m.out_channels for m in quantized.modules() if isinstance(m, nn.Conv2d)) * 12 * 12 * 4
    assert widest <= per_image <= 4 * widest


def _fold_stats(rows: int, size: int = 48, seed: int = 0):
    """A linear layer (FP32 inputs, so W* is the FP32 weights) with `rows` input rows per fold."""
    from renorm.reconstruct.inputs import Layer, LayerStats
    from renorm.quantize.weights import quantize_tensor

    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(size, size, generator=generator)
    layer = nn.Linear(size, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, size, generator=generator) * 0.1)
    stats = LayerStats()
    for chunk_index in range(4):
        x = (torch.randn(rows // 2, size, generator=generator) @ basis)[None]
        stats.add(x, x, chunk_index)
    return Layer("fc", layer, layer), stats, quantize_tensor(layer.weight, "uniform", 3)


def test_cross_validation_damps_more_when_rows_are_few():
    """With few rows per fold GPTQ's error feedback fits their noise: the damping chosen by
    held-out error is larger than with many rows, and each choice has the lowest held-out error."""
    from renorm.reconstruct import _choose_damping

    config = ReconstructConfig(offset=False, min_rows_per_input=0, damping="auto")
    few = _choose_damping(*_fold_stats(rows=60), config)
    many = _choose_damping(*_fold_stats(rows=4000), config)
    assert few[0] > many[0], (few, many)
    for chosen, errors in (few, many):
        assert chosen in config.damping_grid and errors[chosen] == min(errors.values())


def test_a_fixed_damping_is_used_as_given_and_bad_ones_are_refused():
    from renorm.reconstruct import _choose_damping

    assert _choose_damping(*_fold_stats(rows=60), ReconstructConfig(damping=0.05))[0] == 0.05
    for bad in ("high", -1.0):
        with pytest.raises(RenormError, match="damping"):
            ReconstructConfig(damping=bad)
    with pytest.raises(RenormError, match="damping_grid"):
        ReconstructConfig(damping_grid=())


def test_each_layer_reports_the_damping_it_used():
    """damping="auto", two or more chunks of images: a damping of the grid per layer, in the report's
    layer rows; a single chunk has nothing to hold out and uses the fallback; the default is 0.1."""
    from renorm.quantize.weights import weight_quantization_stats
    from renorm.reconstruct import FALLBACK_DAMPING

    torch.manual_seed(0)
    fp32 = perturbed(DepthwiseNet())
    images = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    quantized = quantize_weights(copy.deepcopy(fp32), WeightQuantConfig(bits=3, scheme="uniform"))
    config = ReconstructConfig(num_images=40, damping="auto")
    rows = weight_quantization_stats(reconstruct(quantized, fp32, images, config, chunk=16))
    assert rows and all(row["reconstruction"]["damping"] in config.damping_grid for row in rows)
    single = weight_quantization_stats(reconstruct(quantized, fp32, images, config, chunk=64))
    assert all(row["reconstruction"]["damping"] == FALLBACK_DAMPING for row in single)
    default = weight_quantization_stats(reconstruct(quantized, fp32, images, ReconstructConfig(num_images=40)))
    assert all(row["reconstruction"]["damping"] == 0.1 for row in default)


def test_a_layer_with_fewer_rows_than_weight_columns_aims_at_its_fp32_weights():
    """The README's rule: below one input row per weight column a layer's target is its FP32 weights (under the
    quantized inputs); from one row per column on, the FP32 outputs. On 14 images of 8x8 the rows per column are
    conv1 896/27, conv2 224/72 = 3.1, fc1 14/16 = 0.88, fc2 14/12 = 1.17: the default threshold (1) sits between
    fc1 and fc2, so moving it to 1.2 changes fc2 alone and to 0.8 fc1 (and what follows it) alone."""
    torch.manual_seed(0)
    fp32 = perturbed(SmallNet())
    images = torch.randn(14, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    quantized = quantize_weights(fp32, WeightQuantConfig(bits=3, scheme="uniform", first_last_bits=3))

    def codes(**threshold):
        out = reconstruct(quantized, fp32, images, ReconstructConfig(num_images=14, **threshold))
        return {name: getattr(getattr(out, name), ATTRIBUTE).codes for name in ("conv1", "conv2", "fc1", "fc2")}

    default, above_fc2, below_fc1 = codes(), codes(min_rows_per_input=1.2), codes(min_rows_per_input=0.8)
    assert all(torch.equal(default[name], above_fc2[name]) for name in ("conv1", "conv2", "fc1"))
    assert not torch.equal(default["fc2"], above_fc2["fc2"])  # 1.17 rows per column: FP32 outputs by default
    assert all(torch.equal(default[name], below_fc1[name]) for name in ("conv1", "conv2"))
    assert not torch.equal(default["fc1"], below_fc1["fc1"])  # 0.88 rows per column: FP32 weights by default


# --------------------------------------------------------------------------- refined images
def _trained_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of `images` (as training would leave them), then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(images)
    return model.eval()


def _statistics_gap(model: nn.Module, images: torch.Tensor) -> float:
    """Sum over BatchNorms of the squared gap between the batch's and the running mean and std, over the variance."""
    gaps = []

    def hook(module, args):
        x = args[0]
        variance = module.running_var + module.eps
        gaps.append(float((((x.mean((0, 2, 3)) - module.running_mean) ** 2 + (x.std((0, 2, 3), unbiased=False)
                                                                              - variance.sqrt()) ** 2) / variance).mean()))
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return sum(gaps)


def test_refined_images_match_the_fp32_batchnorm_statistics_and_leave_the_model_alone():
    from renorm.reconstruct.refine import refine_images

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    fp32 = _trained_statistics(DepthwiseNet(), torch.randn(256, 3, 12, 12, generator=generator))
    unlike = 0.3 * torch.randn(32, 3, 12, 12, generator=generator) + 0.5  # photos unlike the training set
    state = copy.deepcopy(fp32.state_dict())
    refined = refine_images(fp32, unlike, steps=30, learning_rate=0.05)
    assert refined.shape == unlike.shape and refined.dtype == unlike.dtype and not refined.requires_grad
    assert _statistics_gap(fp32, refined) < 0.2 * _statistics_gap(fp32, unlike)
    assert all(torch.equal(value, state[key]) for key, value in fp32.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in fp32.parameters()) and not fp32.training
    with pytest.raises(RenormError, match="BatchNorm"):
        refine_images(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), unlike)
    with pytest.raises(RenormError, match="steps"):
        refine_images(fp32, unlike, steps=0)


def test_reconstruction_adds_refined_copies_of_the_images_after_its_own(monkeypatch):
    module = sys.modules["renorm.reconstruct"]
    extras = []

    def spy(reference, images, steps, progress=False):
        extras.append(images.clone())
        return images + 0.01

    monkeypatch.setattr(module, "refine_images", spy)
    torch.manual_seed(0)
    fp32 = perturbed(DepthwiseNet())
    images = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    quantized = quantize_weights(copy.deepcopy(fp32), WeightQuantConfig(bits=3, scheme="uniform"))
    result = reconstruct(quantized, fp32, images, ReconstructConfig(num_images=24, refined=8))
    assert torch.equal(extras[0], images[24:32])  # the 8 images after the 24 it reconstructs on
    assert _output_gap(result, fp32, images) < _output_gap(quantized, fp32, images)
    reconstruct(quantized, fp32, images[:20], ReconstructConfig(num_images=24, refined=8))
    assert torch.equal(extras[1], images[:8])  # fewer images than asked: its first ones again
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    reconstruct(quantize_weights(copy.deepcopy(plain), WeightQuantConfig(bits=4)), plain, images,
                ReconstructConfig(num_images=24, refined=8))
    assert len(extras) == 2  # no BatchNorm statistics to match: no refined images
    for wrong in (-1, 2.5):
        with pytest.raises(RenormError, match="refined"):
            ReconstructConfig(refined=wrong)
