"""Which layers a stage touches: names checked in one place, first and last found by execution order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from renorm.api import Config, compress
from renorm.errors import RenormError
from renorm.layers import check_layer_names, first_and_last
from renorm.prune import PruneConfig, prune
from renorm.quantize.weights import WeightQuantConfig, quantize_weights, weight_quantization_stats


class HeadFirst(nn.Module):
    """Registers its classifier before its stem: registration order is not execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.body(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_first_and_last_follow_execution_and_fall_back_to_registration():
    model = HeadFirst().eval()
    assert first_and_last(model, torch.randn(2, 3, 8, 8)) == ("stem", "head")
    assert first_and_last(model) == ("head", "body")  # no example: registration order, as documented
    assert first_and_last(nn.Sequential(nn.ReLU())) == ()


def test_stem_and_classifier_get_the_first_last_bits_by_execution_order():
    """The old code took registration order: it kept 'body' at 8 bits and put the stem at 4."""
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    report = compress(HeadFirst().eval(), images, Config(wbits=4, renorm="none", batch_size=8))
    bits = {row["layer"]: (row["bits"], row["scheme"]) for row in report.report["weights"]}
    assert bits == {"stem": (8, "uniform"), "head": (8, "uniform"), "body": (4, "pow2")}
    q = quantize_weights(HeadFirst(), WeightQuantConfig(bits=4), example=images)
    assert {row["layer"]: row["bits"] for row in weight_quantization_stats(q)} == {"stem": 8, "head": 8, "body": 4}


def test_unstructured_pruning_spares_the_stem_and_classifier_that_run_first_and_last():
    images = torch.randn(4, 3, 8, 8)
    pruned, report = prune(HeadFirst().eval(), PruneConfig(0.5), example=images)
    sparsity = {row["layer"]: row["sparsity"] for row in report["layers"]}
    assert sparsity["stem"] == 0 and sparsity["head"] == 0 and sparsity["body"] == pytest.approx(0.5, abs=0.01)


def test_a_misspelt_layer_name_is_named_with_a_suggestion():
    model = HeadFirst()
    with pytest.raises(RenormError, match=r"--exclude names no conv/linear layer 'stme'; did you mean stem\?"):
        check_layer_names(model, ["stem", "stme"], "--exclude")
    with pytest.raises(RenormError, match=r"--prune-exclude 'bn' is a BatchNorm2d, not a conv/linear layer"):
        check_layer_names(model, ["bn"], "--prune-exclude")
    with pytest.raises(RenormError, match=r"--exclude names no conv/linear layer 'xyz'; layers are e.g. head, stem"):
        check_layer_names(model, ["xyz"], "--exclude")
    check_layer_names(model, ["head", "body"], "--exclude")
