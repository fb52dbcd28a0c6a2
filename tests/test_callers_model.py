"""The caller's model is never modified, nor switched to eval mode, unless inplace=True."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import SmallNet, perturbed
from renorm.api import Config, compress
from renorm.prune import PruneConfig, prune
from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.sensitivity import sensitivity

pytestmark = pytest.mark.filterwarnings("ignore")


def callers_model() -> nn.Module:
    torch.manual_seed(0)
    model = perturbed(SmallNet()).train()  # a caller in the middle of fine-tuning
    model.bn2.eval()
    return model


def snapshot(model: nn.Module) -> tuple[dict, list[bool], set]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            {(n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_renorm")})


def assert_untouched(model: nn.Module, before: tuple) -> None:
    state, flags, attributes = snapshot(model)
    assert state.keys() == before[0].keys()
    for key in state:
        assert torch.equal(state[key], before[0][key]), f"caller's {key} changed"
    assert flags == before[1], "caller's training flags changed"
    assert attributes == before[2], "renorm attributes were attached to the caller's model"


STAGES = {
    "quantize_weights": lambda m, x: quantize_weights(m, WeightQuantConfig(bits=3, scheme="uniform")),
    "calibrate_activations": lambda m, x: calibrate_activations(m, x, ActivationQuantConfig(bits=8, num_images=32)),
    "prune unstructured": lambda m, x: prune(m, PruneConfig(0.5), example=x[:4])[0],
    "prune filter": lambda m, x: prune(m, PruneConfig(0.5, "filter", prune_first_last=True), example=x[:4],
                                       latency_repeats=1)[0],
    "compress": lambda m, x: compress(m, x, Config(wbits=4, abits=8, prune=0.3, batch_size=16), eval_data=x).model,
    "sensitivity": lambda m, x: sensitivity(m, x, sparsities=(0.5,), renorm="shift", batch_size=32),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_public_stages_leave_the_callers_model_alone(stage, images):
    """Before: quantize_weights, calibrate_activations and prune changed the model passed in;
    compress and sensitivity switched a train-mode model to eval mode."""
    model = callers_model()
    before = snapshot(model)
    out = STAGES[stage](model, images)
    assert_untouched(model, before)
    assert out is not model


@pytest.mark.parametrize("stage", ["quantize_weights", "calibrate_activations", "prune unstructured"])
def test_inplace_changes_and_returns_the_callers_model(stage, images):
    model = callers_model()
    inplace = {
        "quantize_weights": lambda: quantize_weights(model, WeightQuantConfig(bits=3, scheme="uniform"), inplace=True),
        "calibrate_activations": lambda: calibrate_activations(model, images, ActivationQuantConfig(num_images=32),
                                                               inplace=True),
        "prune unstructured": lambda: prune(model, PruneConfig(0.5), example=images[:4], inplace=True)[0],
    }[stage]
    before = copy.deepcopy(model)
    assert inplace() is model
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    attached = [n for n, m in model.named_modules() if any(k.startswith("_renorm") for k in [*vars(m), *m._modules])]
    assert changed or attached
