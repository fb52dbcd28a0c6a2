"""Where the work runs: threads, image-decoding workers, devices, dtypes, and state that moves with .to()."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import SmallNet, perturbed, write_image
from renorm import device as runtime
from renorm.data import Batches, iter_batches, make_preset, open_images, sample
from renorm.errors import RenormError
from renorm.evaluate import evaluate
from renorm.renormalize import renormalize

SMALL = make_preset("imagenet", resize=12, crop=12)


@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of 23 images each, and one unreadable file among them."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(23):
            write_image(tmp_path / label / f"{index:02d}.png", size=(20 + index % 5, 16), seed=index + 100 * (label == "b"))
    (tmp_path / "a" / "07x.png").write_text("not an image")
    return tmp_path


def test_workers_give_the_same_batches_in_the_same_order_and_skip_the_same_files(photo_folder):
    serial = sample(open_images(str(photo_folder), SMALL, workers=0), 40, seed=3)
    parallel = sample(open_images(str(photo_folder), SMALL, workers=2), 40, seed=3)
    assert parallel.workers == 2 and serial.workers == 0
    one = list(iter_batches(serial, 7))
    two = list(iter_batches(parallel, 7))
    assert [len(x) for x, _ in one] == [len(x) for x, _ in two] == [7] * 5 + [4]  # 39 readable of 40
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert serial.skipped == parallel.skipped and len(serial.skipped) == 1


def test_workers_give_identical_statistics_and_accuracy(photo_folder):
    torch.manual_seed(0)
    model = perturbed(SmallNet(classes=2))
    results = []
    for workers in (0, 2):
        calib = sample(open_images(str(photo_folder), SMALL, labeled=False, workers=workers), 30, seed=1)
        renormalized = renormalize(model, calib, batch_size=8, chunk=16)
        labeled = open_images(str(photo_folder), SMALL, labeled=True, workers=workers)
        results.append((renormalized.state_dict(), evaluate(renormalized, labeled, batch_size=8)))
    (state0, metrics0), (state2, metrics2) = results
    for key in state0:
        assert torch.equal(state0[key], state2[key]), key
    assert {k: v for k, v in metrics0.items() if k != "seconds"} == {k: v for k, v in metrics2.items() if k != "seconds"}


def test_default_workers_none_for_images_in_memory_some_for_files(photo_folder):
    assert open_images("fashion-mnist-mini:test", make_preset("fashion-mnist"), workers=None).workers == 0
    assert open_images(str(photo_folder), SMALL, workers=None).workers == runtime.default_workers(False)
    assert runtime.default_workers(False, threads_used=1) == 0
    assert runtime.default_workers(False, threads_used=3) == 2
    assert runtime.default_workers(False, threads_used=64) == 4
    with pytest.raises(RenormError, match="--workers"):
        open_images(str(photo_folder), SMALL, workers=-1)
