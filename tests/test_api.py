"""compress() as a Python API: what it reads, what it reports, and its errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import SmallNet, perturbed
from renorm.api import Config, compress
from renorm.errors import RenormError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def net():
    torch.manual_seed(0)
    return perturbed(SmallNet())


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_num_images_limits_tensor_and_dataloader_calibration(net, images, kind):
    """num_images was ignored for tensor/DataLoader calibration data: all 96 images were used."""
    calib = images if kind == "tensor" else DataLoader(TensorDataset(images, torch.zeros(96)), batch_size=7)
    report = compress(net, calib, Config(wbits=32, abits=8, act_images=10, num_images=20, batch_size=8)).report
    assert report["batchnorm"]["images"] == 20
    assert report["calibration"]["images_requested"] == 20


def test_without_eval_data_the_report_says_nothing_was_evaluated(net, images):
    """The old report held an empty accuracy and "evaluation": null, with nothing saying why."""
    report = compress(net, images, Config(wbits=4, batch_size=32)).report
    assert report["accuracy"] == {}
    assert report["evaluation"]["source"] is None and "no stage was evaluated" in report["evaluation"]["note"]
    labeled = [(images[:32], torch.randint(0, 10, (32,)))]
    evaluated = compress(net, images, Config(wbits=4, batch_size=32), eval_data=labeled).report
    assert set(evaluated["accuracy"]) == {"fp32", "compressed", "renormalized"}


def test_a_data_spec_without_a_preset_names_the_preset_argument(net):
    with pytest.raises(RenormError, match=r"pass preset= \(e\.g\. renorm\.PRESETS\['imagenet'\]"):
        compress(net, "fashion-mnist-mini:train", Config(wbits=32))


def test_outputs_that_are_not_class_scores_fail_before_any_pass(images, monkeypatch):
    import sys

    class Pair(SmallNet):
        def forward(self, x):
            y = super().forward(x)
            return y, y

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the evaluation images ran before the output was checked")

    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["renorm.api"]._Evaluator, "__call__", no_pass)
        with pytest.raises(RenormError, match="returns a tuple of 2"):
            compress(Pair().eval(), images, Config(wbits=4),
                     eval_data=[(images[:8], torch.zeros(8, dtype=torch.long))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(Pair().eval(), images, Config(wbits=4, batch_size=32))  # nothing evaluated: fine
