"""Running models: every module's training flag comes back; a failed forward pass says why in one line."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import SmallNet, perturbed
from renorm.errors import RenormError
from renorm.evaluate import evaluate, predict
from renorm.forward import as_logits, eval_mode, forward
from renorm.renormalize import renormalize


def mixed_flags(model: nn.Module) -> nn.Module:
    """Top module in train mode, some children in eval mode: a caller's fine-tuning setup."""
    model.train()
    model.bn1.eval()
    model.drop.eval()
    return model


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_every_modules_flag():
    model = mixed_flags(SmallNet())
    before = flags(model)
    with eval_mode(model, None):
        assert not any(flags(model))
    assert flags(model) == before


def test_evaluation_keeps_a_callers_mixed_flags(images):
    """The old predict() restored the top module's flag only, with model.train(flag): children came back changed."""
    torch.manual_seed(0)
    model = mixed_flags(perturbed(SmallNet()).train())
    model.bn1.eval()
    model.drop.eval()
    before = flags(model)
    labeled = [(images[:48], torch.randint(0, 10, (48,)))]
    evaluate(model, labeled, reference=copy.deepcopy(model), batch_size=16)
    assert flags(model) == before


class Returns(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"tuple1": lambda: (y,), "tuple2": lambda: (y, y.sum(1)), "logits": lambda: {"logits": y, "aux": 1},
                "dict": lambda: {"out": y, "aux": y}, "list": lambda: [y, "note"]}[self.kind]()


@pytest.mark.parametrize("kind", ["tuple1", "logits", "list"])
def test_unambiguous_logits_are_taken(kind):
    x = torch.randn(5, 4)
    model = Returns(kind)
    logits, _ = predict(model, x)
    torch.testing.assert_close(logits, model.fc(x).detach())


@pytest.mark.parametrize("kind,fragment", [("tuple2", "a tuple of 2 (Tensor)"), ("dict", "a dict with keys 'out', 'aux'")])
def test_ambiguous_outputs_are_a_clear_error(kind, fragment):
    with pytest.raises(RenormError, match="not one tensor of class scores") as info:
        predict(Returns(kind), torch.randn(5, 4))
    assert fragment in str(info.value)
    with pytest.raises(RenormError):
        as_logits(3.0)


def test_wrong_image_size_names_resize_and_crop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 2))
    with pytest.raises(RenormError, match=r"images of shape \(3, 20, 20\) do not fit the model.*--resize/--crop"):
        forward(model, torch.randn(2, 3, 20, 20))
    with pytest.raises(RenormError, match=r"do not fit the model.*--resize/--crop"):
        forward(model, torch.randn(2, 1, 12, 12))  # grey images into an RGB model


@pytest.mark.parametrize("stage", [predict, renormalize])
def test_a_half_precision_model_is_not_called_a_size_problem(stage):
    """The old evaluate and renormalize called every RuntimeError 'images ... do not fit the model'."""
    model = SmallNet().half().eval()
    with pytest.raises(RenormError) as info:
        stage(model, torch.randn(4, 3, 8, 8))
    message = str(info.value)
    assert "float16" in message and "float32" in message and "model.float()" in message
    assert "--resize" not in message


def test_images_follow_the_model_to_its_device_and_a_model_split_across_devices_is_named():
    model = nn.Linear(4, 2).to("meta")
    assert forward(model, torch.randn(2, 4)).device.type == "meta"  # the images were moved to the model
    split = nn.Sequential(nn.Linear(4, 3).to("meta"), nn.Linear(3, 2))
    with pytest.raises(RenormError) as info:
        forward(split, torch.randn(2, 4))
    assert "on cpu and meta" in str(info.value) and "model.to(device)" in str(info.value)


def test_other_runtime_errors_keep_their_own_words():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("the custom op is not built for this CPU\nsecond line")

    with pytest.raises(RenormError) as info:
        forward(Fails(), torch.randn(2, 3))
    message = str(info.value)
    assert message == "the model failed on images of shape (3,): the custom op is not built for this CPU second line"
