"""Images in: folders, built-ins, presets, sampling, unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from renorm.data import (FASHION_MNIST_CLASSES, PRESETS, Batches, fashion_mnist_arrays, iter_batches, make_preset,
                         open_images, read_idx, sample)
from renorm.errors import RenormError

SMALL = make_preset("imagenet", resize=16, crop=16)


def test_unlabeled_folder_is_searched_recursively_and_skips_broken_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_image(tmp_path / "one.jpg")
    write_image(tmp_path / "a" / "two.png", mode="L")  # grey -> RGB
    write_image(tmp_path / "a" / "b" / "three.PNG", mode="RGBA")  # alpha -> RGB
    write_image(tmp_path / "a" / "b" / "four.webp")
    write_image(tmp_path / "full.png", size=(64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    source = open_images(str(tmp_path), SMALL, labeled=False)
    assert len(source) == 7 and not source.labeled
    batches = list(iter_batches(source, batch_size=3))
    assert sum(len(x) for x, _ in batches) == 5
    assert all(x.shape[1:] == (3, 16, 16) for x, _ in batches)
    assert sorted(p.rsplit("/", 1)[-1] for p in source.skipped) == ["fake.jpg", "truncated.png"]


def test_image_folder_layout_gives_sorted_class_indices(tmp_path):
    for name, count in (("zebra", 2), ("ant", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            write_image(tmp_path / name / f"{i}.png", seed=i)
    source = open_images(str(tmp_path), SMALL)
    assert source.classes == ("ant", "zebra")
    labels = torch.cat([y for _, y in iter_batches(source, 10)])
    assert labels.tolist() == [0, 0, 0, 1, 1]


def test_missing_empty_and_file_paths_are_clear_errors(tmp_path):
    with pytest.raises(RenormError, match="does not exist"):
        open_images(str(tmp_path / "nope"), SMALL)
    with pytest.raises(RenormError, match="no images"):
        open_images(str(tmp_path), SMALL, labeled=False)
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(RenormError, match="is a file"):
        open_images(str(tmp_path / "x.png"), SMALL)


def test_a_folder_named_like_a_built_in_set_is_a_folder(tmp_path, monkeypatch):
    """`photos` and `fashion-mnist` without a split are folders; with one they are the built-in sets."""
    monkeypatch.chdir(tmp_path)
    for folder in ("photos", "fashion-mnist"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "0.jpg")
        write_image(tmp_path / folder / "1.jpg", seed=1)
        source = open_images(folder, SMALL, labeled=False)
        assert len(source) == 2 and source.name == folder
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    assert len(open_images("photos:eval:4", SMALL, labeled=False)) == 4


def test_bundled_fashion_mnist_subset():
    images, labels, name = fashion_mnist_arrays("test", mini=True)
    assert name == "fashion-mnist-mini:test"
    assert images.shape == (3000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    train, _, _ = fashion_mnist_arrays("train", mini=True)
    assert len(train) == 2000
    source = open_images("fashion-mnist-mini:test", PRESETS["fashion-mnist"])
    assert source.classes == FASHION_MNIST_CLASSES
    x, y = next(iter_batches(source, 4))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels[:4].tolist()


def test_fashion_mnist_preset_is_zero_padding_and_normalization():
    images, _, _ = fashion_mnist_arrays("test", mini=True)
    tensor = PRESETS["fashion-mnist"].transform()(Image.fromarray(images[0]))
    expected = (torch.from_numpy(images[0]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(tensor[0, 2:30, 2:30], expected)
    torch.testing.assert_close(tensor[1], tensor[0])  # grey replicated to RGB
    assert torch.allclose(tensor[:, :2], torch.tensor(-0.2860 / 0.3530))  # black border


@pytest.mark.skipif(not __import__("renorm.data").data.fashion_mnist_available(), reason="full data set not installed")
def test_full_fashion_mnist_from_the_debian_package():
    images, labels, name = fashion_mnist_arrays("train")
    assert images.shape == (60000, 28, 28) and name == "fashion-mnist:train"
    assert np.bincount(labels).tolist() == [6000] * 10


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x09\x01" + bytes(8))
    with pytest.raises(RenormError, match="IDX"):
        read_idx(tmp_path / "x")


def test_presets_and_overrides():
    tf = PRESETS["tf"]
    pixel = Image.new("RGB", (300, 260), (255, 127, 0))
    x = tf.transform()(pixel)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([128 / 128, 0.0, -127 / 128]), atol=1e-6, rtol=0)
    custom = make_preset("imagenet", resize=40, crop=32, mean=[0.5], std=[0.25, 0.5, 0.5])
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.25, 0.5, 0.5) and custom.input_size == 32
    with pytest.raises(RenormError, match="1 or 3 numbers"):
        make_preset(mean=[0.1, 0.2])
    with pytest.raises(RenormError, match="positive"):
        make_preset(std=[0.0])
    with pytest.raises(RenormError, match="unknown preset"):
        make_preset("cifar")


def test_sample_is_seeded_and_bounded():
    source = open_images("fashion-mnist-mini:train", PRESETS["fashion-mnist"], labeled=False)
    a, b = sample(source, 50, seed=3), sample(source, 50, seed=3)
    assert a.indices == b.indices and len(set(a.indices)) == 50
    assert sample(source, 50, seed=4).indices != a.indices
    assert len(sample(source, 10**6)) == len(source)
    with pytest.raises(RenormError, match="--num-images must be at least 1, got 0"):
        sample(source, 0)


def test_batches_of_tensors_loaders_and_first():
    x = torch.randn(10, 3, 4, 4)
    assert [len(b) for b in Batches(x, 4).images()] == [4, 4, 2]
    assert torch.equal(Batches([x[:3], x[3:]], 2).first(5), x[:5])
    assert torch.equal(Batches([(x, torch.zeros(10))]).first(20), x)
    with pytest.raises(RenormError, match="re-iterable"):
        Batches(iter([x]))


def test_no_readable_images_names_the_folder_and_the_skipped_count(tmp_path):
    """The old message named neither the folder nor how many files were skipped."""
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"not an image")
    source = open_images(str(tmp_path), SMALL, labeled=False)
    with pytest.raises(RenormError, match=rf"no readable images in {tmp_path}: all 2 files were unreadable and "
                                          r"skipped \(first: .*a\.jpg\)"):
        Batches(source, 4).first(1)
