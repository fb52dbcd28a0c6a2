"""Properties over random small networks (Hypothesis): conv/BN/linear stacks with grouped and
depthwise convs, residual adds, BatchNorm1d after Linear, and callers' mixed training flags.

1. Every public stage leaves the caller's model alone (state_dict, training flag of every
   module, no renorm attributes) unless inplace=True, which returns the caller's model.
2. `exact` statistics equal a direct float64 computation over one batch when N <= chunk.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import perturbed
from renorm.api import Config, compress
from renorm.errors import RenormError
from renorm.evaluate import evaluate
from renorm.prune import PruneConfig, prune
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.reconstruct import ReconstructConfig, reconstruct
from renorm.renormalize import batchnorm_layers, renormalize
from renorm.sensitivity import sensitivity
from test_renormalize import direct_fixed_point, stats

pytestmark = pytest.mark.filterwarnings("ignore")
BLOCKS = ("conv", "grouped", "depthwise", "residual")


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class Stack(nn.Module):
    """A stem conv, the given blocks, global pooling, Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, blocks: list[tuple[str, int]], hidden: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        channels = 8
        for kind, width in blocks:
            if kind == "residual":
                layers.append(Residual(channels))
                continue
            out = {"conv": width, "grouped": width, "depthwise": channels}[kind]
            groups = {"conv": 1, "grouped": 4, "depthwise": channels}[kind]
            layers += [nn.Conv2d(channels, out, 3, padding=1, groups=groups), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, classes))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


networks = st.builds(
    lambda blocks, hidden, classes, seed, flags: _build(blocks, hidden, classes, seed, flags),
    blocks=st.lists(st.tuples(st.sampled_from(BLOCKS), st.sampled_from([8, 16])), min_size=1, max_size=3),
    hidden=st.integers(3, 9), classes=st.integers(2, 5), seed=st.integers(0, 10**6),
    flags=st.integers(0, 2**20),
)


def _build(blocks, hidden, classes, seed, flags) -> nn.Module:
    torch.manual_seed(seed)
    model = perturbed(Stack(blocks, hidden, classes), seed)
    for index, module in enumerate(model.modules()):  # the caller's own mix of train and eval modes
        module.training = bool(flags >> (index % 20) & 1)
    return model


def snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            sorted((n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_renorm")))


def assert_same(model: nn.Module, before: tuple, stage: str) -> None:
    state, flags, attributes = snapshot(model)
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), f"{stage} changed the caller's {key}"
    assert flags == before[1], f"{stage} changed the caller's training flags"
    assert attributes == before[2], f"{stage} attached renorm attributes to the caller's model"


def stages(images: torch.Tensor, labels: torch.Tensor) -> dict:
    labeled = [(images, labels)]
    return {
        "quantize_weights": lambda m, inplace: quantize_weights(m, WeightQuantConfig(bits=3, scheme="uniform"),
                                                                inplace=inplace),
        "renormalize exact": lambda m, inplace: renormalize(m, images, "exact", batch_size=5, inplace=inplace),
        "renormalize shift": lambda m, inplace: renormalize(m, images, "shift", reference=copy.deepcopy(m),
                                                            batch_size=5, inplace=inplace),
        "calibrate_activations": lambda m, inplace: calibrate_activations(
            m, images, ActivationQuantConfig(bits=8, num_images=8), batch_size=5, inplace=inplace),
        "prune unstructured": lambda m, inplace: prune(m, PruneConfig(0.5), example=images, inplace=inplace)[0],
        "prune filter": lambda m, inplace: prune(m, PruneConfig(0.5, "filter", prune_first_last=True),
                                                 example=images, latency_repeats=1, inplace=inplace)[0],
        "evaluate": lambda m, inplace: evaluate(m, labeled, reference=m, batch_size=5),
        "compress": lambda m, inplace: compress(m, images, Config(wbits=4, abits=8, act_images=8, prune=0.3,
                                                                  batch_size=5), eval_data=labeled).model,
        "reconstruct": lambda m, inplace: reconstruct(
            quantize_weights(m, WeightQuantConfig(bits=3, scheme="uniform")), m, images,
            ReconstructConfig(num_images=12), batch_size=5, inplace=inplace),
        "compress with reconstruction": lambda m, inplace: compress(
            m, images, Config(wbits=3, scheme="uniform", reconstruct="gptq", reconstruct_images=12, batch_size=5),
            eval_data=labeled).model,
        "sensitivity": lambda m, inplace: sensitivity(m, images, sparsities=(0.5,), renorm="shift", batch_size=6),
    }


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=networks, seed=st.integers(0, 1000))
def test_public_stages_never_touch_the_callers_model(model, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(12, 3, 8, 8, generator=generator)
    labels = torch.randint(0, model.head[-1].out_features, (12,), generator=generator)
    before = snapshot(model)
    for name, stage in stages(images, labels).items():
        try:
            out = stage(model, False)
        except RenormError:  # e.g. Torch-Pruning refusing a grouped conv: still must not touch the model
            out = None
        assert_same(model, before, name)
        assert out is not model
    for name in ("quantize_weights", "renormalize exact", "calibrate_activations", "prune unstructured"):
        work = copy.deepcopy(model)
        assert stages(images, labels)[name](work, True) is work, f"{name}(inplace=True) returned another model"


@settings(max_examples=25, deadline=None)
@given(model=networks, count=st.integers(2, 24), chunk_extra=st.integers(0, 40), batch=st.integers(1, 24),
       seed=st.integers(0, 1000))
def test_exact_statistics_equal_a_direct_float64_computation_when_the_images_fit_one_chunk(
        model, count, chunk_extra, batch, seed):
    images = torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.3 + 0.2
    expected = direct_fixed_point(model, images)
    got = stats(renormalize(model, images, "exact", batch_size=batch, chunk=count + chunk_extra))
    assert got.keys() == expected.keys() == {name for name, _ in batchnorm_layers(model)}
    for name in got:
        for value, reference in zip(got[name], expected[name]):
            torch.testing.assert_close(value, reference, rtol=2e-4, atol=1e-5, msg=name)
