"""Bits per layer: --layer-bits patterns, the first/last rule, and the --avg-bits allocation."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from renorm.errors import RenormError
from renorm.quantize.allocation import allocate, allocate_bits, plot_frontier
from renorm.quantize.plan import parse_layer_bits
from renorm.quantize.weights import ATTRIBUTE, WeightQuantConfig, quantize_weights
from test_reconstruct import DepthwiseNet


def _bits(model) -> dict[str, int | None]:
    return {name: (getattr(m, ATTRIBUTE).bits if getattr(m, ATTRIBUTE, None) is not None else None)
            for name, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1}


def test_patterns_keywords_and_precedence():
    model = DepthwiseNet()
    config = WeightQuantConfig(bits=4, scheme="pow2",
                               layer_bits=parse_layer_bits(["depthwise=8", "pro*=3", "grouped=32", "last=6"]))
    bits = _bits(quantize_weights(copy.deepcopy(model), config))
    assert bits == {"stem": 8, "expand": 4, "depthwise": 8, "project": 3, "grouped": None, "fc": 6}
    depthwise = quantize_weights(copy.deepcopy(model), config).depthwise
    assert getattr(depthwise, ATTRIBUTE).scheme == "uniform"  # pow2 has no 8-bit grid
    assert getattr(quantize_weights(copy.deepcopy(model), config).project, ATTRIBUTE).scheme == "pow2"


@pytest.mark.parametrize("items,message", [
    (["depthwise"], "PATTERN=BITS"),
    (["foo=9"], "bits must be 2..8"),
    (["foo=x"], "not a number"),
    (["=4"], "PATTERN=BITS"),
])
def test_bad_layer_bits_are_named(items, message):
    with pytest.raises(RenormError, match=message):
        parse_layer_bits(items)


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(RenormError, match="matches no conv/linear layer"):
        quantize_weights(DepthwiseNet(), WeightQuantConfig(layer_bits=(("layer9.*", 3),)))


def test_greedy_allocation_is_optimal_on_a_convex_case():
    sizes = {"a": 100, "b": 100, "c": 200}
    costs = {"a": {2: 8.0, 3: 2.0, 4: 1.0, 8: 0.0}, "b": {2: 1.0, 3: 0.5, 4: 0.2, 8: 0.0},
             "c": {2: 4.0, 3: 1.5, 4: 0.5, 8: 0.0}}
    chosen = allocate(sizes, costs, 3.0)
    average = sum(sizes[n] * b for n, b in chosen.items()) / 400
    assert average <= 3.0
    # brute force over every assignment within the budget
    import itertools

    best = min((sum(costs[n][b] for n, b in zip(sizes, combo)), combo)
               for combo in itertools.product((2, 3, 4, 8), repeat=3)
               if sum(sizes[n] * b for n, b in zip(sizes, combo)) <= 3.0 * 400)
    assert sum(costs[n][chosen[n]] for n in sizes) == pytest.approx(best[0])
    with pytest.raises(RenormError, match="below what these layers can reach"):
        allocate(sizes, costs, 1.5)


def test_allocate_bits_meets_the_budget_and_plots(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    images = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    state = copy.deepcopy(model.state_dict())
    config = WeightQuantConfig(bits=4, scheme="uniform")
    entries, report = allocate_bits(model, images, config, 4.5, points=4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is left as it was
    assert report["average_bits"] <= 4.5 + 1e-9
    assert {name for name, _ in entries} == {"expand", "depthwise", "project", "grouped"}  # first/last are pinned
    assert report["allocation"]["stem"] == 8 and report["allocation"]["fc"] == 8
    quantized = quantize_weights(copy.deepcopy(model), WeightQuantConfig(bits=4, scheme="uniform", layer_bits=entries))
    assert _bits(quantized) == report["allocation"]
    assert len(report["frontier"]) >= 3 and all(0 <= p["agreement_top1"] <= 100 for p in report["frontier"])
    plot_frontier(report, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags,fragment", [
    (["--layer-bits", "foo=9"], "bits must be 2..8"),
    (["--layer-bits", "layer9.*=3"], "matches no conv/linear layer"),
    (["--avg-bits", "1"], "--avg-bits 1 is outside 2..8"),
    (["--frontier", "f.png"], "add --avg-bits"),
    (["--reconstruct-method", "magic"], "invalid choice"),
    (["--reconstruct", "--reconstruct-images", "0"], "at least 1"),
    (["--reconstruct", "--reconstruct-damping", "-1"], "--reconstruct-damping '-1': give a number >= 0"),
    (["--reconstruct", "--reconstruct-damping", "lots"], "or auto"),
    (["--reconstruct", "--reconstruct-sweeps", "-1"], "--reconstruct-sweeps -1: give a whole number >= 0"),
    (["--reconstruct", "--reconstruct-refined", "-1"], "--reconstruct-refined -1: give a whole number >= 0"),
])
def test_bad_bit_and_reconstruction_options_exit_2_before_any_pass(flags, fragment, capsys, tmp_path, monkeypatch):
    from renorm import cli

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over data ran before the options were checked")

    monkeypatch.setattr(sys.modules["renorm.api"]._Evaluator, "__call__", no_pass)  # the FP32 evaluation pass
    code = cli.main(["compress", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--eval",
                     "fashion-mnist-mini:test", "--quiet", "--out", str(tmp_path / "out.pt"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not list(tmp_path.iterdir())


class _Captured(Exception):
    pass


def _config_compress_gets(monkeypatch, *flags: str):
    """The Config that `renorm compress ... FLAGS` hands to renorm.api.compress (which then stops)."""
    from renorm import api, cli

    seen = {}

    def spy(loaded, calib, config, *args, **kwargs):
        seen["config"] = config
        raise _Captured

    monkeypatch.setattr(api, "compress", spy)
    with pytest.raises(_Captured):
        cli.main(["compress", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--quiet", *flags])
    return seen["config"]


@pytest.mark.parametrize("text,damping", [("auto", "auto"), ("AUTO", "auto"), ("0.3", 0.3), ("0", 0.0)])
def test_reconstruct_damping_reaches_the_reconstruction(text, damping, monkeypatch):
    config = _config_compress_gets(monkeypatch, "--reconstruct", "--reconstruct-damping", text)
    assert config.reconstruct_config().damping == damping


def test_reconstruct_sweeps_and_images_reach_the_reconstruction(monkeypatch):
    config = _config_compress_gets(monkeypatch, "--reconstruct", "--reconstruct-sweeps", "3",
                                   "--reconstruct-images", "100")
    assert config.reconstruct_config().sweeps == 3 and config.reconstruct_config().num_images == 100
    default = _config_compress_gets(monkeypatch, "--reconstruct").reconstruct_config()
    assert default.sweeps == 0 and default.method == "gptq" and default.num_images == 256 and default.refined == 0
    config = _config_compress_gets(monkeypatch, "--reconstruct", "--reconstruct-refined", "64")
    assert config.reconstruct_config().refined == 64
