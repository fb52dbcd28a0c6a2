"""Images in: folders, built-in data sets, sampling, and batching.

Everything that feeds images to a model goes through an `ImageSource` (indexable,
knows whether it has labels; defined in renorm.images with the preprocessing presets)
and `iter_batches`. The API also accepts plain tensors, lists of batches and
DataLoaders through `Batches`.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from renorm import photos  # built-in natural photos (optional extra)
from renorm.device import default_workers
from renorm.errors import RenormError
from renorm.images import PRESETS, ImageSource, Preset, make_preset  # noqa: F401 (also the public names here)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = Path(os.environ.get("RENORM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MINI = Path(__file__).parent / "assets" / "fashion_mnist_mini.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Errors PIL raises for unreadable, truncated or not-an-image files.
_UNREADABLE = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- sources
@dataclass
class FileImages(ImageSource):
    """Image files; labels come from an ImageFolder layout when `labels` is given."""

    files: list[Path] = field(default_factory=list)
    labels: list[int] | None = None
    transform: Callable[[Image.Image], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as img:
            img.load()
            tensor = self.transform(img)
        return tensor, (self.labels[index] if self.labels is not None else -1)

    def describe_item(self, index: int) -> str:
        return str(self.files[index])


@dataclass
class ArrayImages(ImageSource):
    """In-memory uint8 images (N, H, W) or (N, H, W, C); preprocessed once, on first use."""

    arrays: np.ndarray | None = None
    labels: np.ndarray | None = None
    transform: Callable[[Image.Image], torch.Tensor] | None = None
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        tensor = self._cache.get(index)
        if tensor is None:
            tensor = self.transform(Image.fromarray(self.arrays[index]))
            self._cache[index] = tensor
        return tensor, (int(self.labels[index]) if self.labels is not None else -1)


@dataclass
class SubsetImages(ImageSource):
    """A subset of another source, in the given order."""

    base: ImageSource | None = None
    indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = self.base.classes
        self.skipped = self.base.skipped
        self.workers = self.base.workers

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base.load(self.indices[index])

    def describe_item(self, index: int) -> str:
        return self.base.describe_item(self.indices[index])


def sample(source: ImageSource, num_images: int | None, seed: int = 0) -> ImageSource:
    """Return a seeded random sample of `num_images` images (all of them, shuffled, if fewer)."""
    if num_images is not None and num_images < 1:
        raise RenormError(f"--num-images must be at least 1, got {num_images}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source), generator=generator).tolist()
    if num_images is not None:
        order = order[:num_images]
    return SubsetImages(name=source.name, base=source, indices=order)


# --------------------------------------------------------------------------- built-ins
def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the MNIST container format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise RenormError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_available() -> bool:
    """Whether the full data set (Debian package dataset-fashion-mnist) is installed."""
    return (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists()


def fashion_mnist_arrays(split: str, mini: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (images uint8 N x 28 x 28, labels int64, source name) for 'train' or 'test'."""
    if split not in ("train", "test"):
        raise RenormError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    if not mini and fashion_mnist_available():
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        return images, labels.astype(np.int64), f"fashion-mnist:{split}"
    with np.load(FASHION_MNIST_MINI) as bundle:
        return bundle[f"{split}_images"], bundle[f"{split}_labels"].astype(np.int64), f"fashion-mnist-mini:{split}"


def builtin_names() -> list[str]:
    return ["fashion-mnist:train", "fashion-mnist:test", "fashion-mnist-mini:train", "fashion-mnist-mini:test"]


# --------------------------------------------------------------------------- opening specs
def open_images(spec: str, preset: Preset, labeled: bool | None = None, workers: int | None = 0) -> ImageSource:
    """Open a data spec: a built-in name or a directory of images.

    labeled=True requires an ImageFolder layout (one subfolder per class); False reads
    every image under the directory; None picks labeled when the layout is ImageFolder.
    workers: image-decoding processes (see ImageSource); None picks them for the
    machine (renorm.device.default_workers: none for images already in memory).
    """
    if workers is not None and workers < 0:
        raise RenormError(f"--workers must be 0 or more, got {workers}")
    source = _open(spec, preset, labeled)
    source.workers = default_workers(isinstance(source, ArrayImages)) if workers is None else workers
    return source


def _open(spec: str, preset: Preset, labeled: bool | None) -> ImageSource:
    transform = preset.transform()
    name, _, split = spec.partition(":")
    if name in ("fashion-mnist", "fashion-mnist-mini") and split:
        images, labels, source_name = fashion_mnist_arrays(split, mini=name == "fashion-mnist-mini")
        return ArrayImages(name=source_name, classes=FASHION_MNIST_CLASSES if labeled is not False else None,
                           arrays=images, labels=labels if labeled is not False else None, transform=transform)
    if photos.is_photo_spec(spec):
        if labeled:
            raise RenormError(f"{spec} has no labels; evaluate against a reference model instead")
        return photos.open_photo_crops(spec, preset)
    root = Path(spec).expanduser()
    if not root.exists():
        raise RenormError(f"image folder {spec!r} does not exist; give a directory of images "
                          f"or one of: {', '.join(builtin_names())}")
    if not root.is_dir():
        raise RenormError(f"{spec!r} is a file, not a folder of images; give its directory")
    if labeled is None:
        labeled = _looks_like_image_folder(root)
    if labeled:
        return _image_folder(root, transform)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise RenormError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; "
                          "point --calib/--data at a folder that holds images")
    return FileImages(name=str(root), files=files, transform=transform)


def _looks_like_image_folder(root: Path) -> bool:
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    top_images = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return bool(subdirs) and not top_images


def _image_folder(root: Path, transform: Callable) -> FileImages:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [index] * len(found)
    if not files:
        raise RenormError(f"no images found in the class folders of {root}; a labeled set needs "
                          "one subfolder per class holding its images")
    return FileImages(name=str(root), classes=tuple(classes), files=files, labels=labels, transform=transform)


# --------------------------------------------------------------------------- batching
def iter_batches(source: ImageSource, batch_size: int, progress: bool = False,
                 desc: str = "images") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; unreadable files are skipped and named in source.skipped.

    Every batch but the last holds batch_size readable images, in the source's order,
    whether source.workers processes decode them or this one does.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise RenormError(f"--batch-size must be at least 1, got {batch_size}")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for image, label, unreadable in _decoded(source, batch_size):
            if unreadable is not None:
                if unreadable not in source.skipped:
                    source.skipped.append(unreadable)
                bar.update(1)
                continue
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                bar.update(len(images))
                yield _stack(images, source), torch.tensor(labels)
                images, labels = [], []
        if images:
            bar.update(len(images))
            yield _stack(images, source), torch.tensor(labels)


class _Decoded(torch.utils.data.Dataset):
    """source[i] as (image, label, None), or (None, None, the item's name) when it cannot be read."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, Any, str | None]:
        try:
            image, label = self.source.load(index)
        except _UNREADABLE:
            return None, None, self.source.describe_item(index)
        return image, label, None


def _as_list(items: list) -> list:
    return items


def _decoded(source: ImageSource, batch_size: int) -> Iterator[tuple[Any, Any, str | None]]:
    """_Decoded(source) item by item, in order: here, or through a DataLoader with source.workers processes."""
    dataset = _Decoded(source)
    if source.workers <= 0 or len(source) == 0:
        for index in range(len(source)):
            yield dataset[index]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_as_list,
                                         num_workers=min(source.workers, len(source)))
    for items in loader:
        yield from items


def chunk_shares(source: ImageSource, chunk: int, share: Callable[[int], slice], batch_size: int = 50,
                 progress: bool = False, desc: str = "images") -> Iterator[torch.Tensor | None]:
    """For each run of `chunk` consecutive images of `source` (by position): the readable images of the
    part that share(run length) selects, as one tensor, or None when that part holds none.

    Only those parts are decoded (by source.workers processes, as iter_batches does); unreadable
    files are skipped and named in source.skipped.
    """
    from tqdm.auto import tqdm

    runs = [range(start, min(start + chunk, len(source))) for start in range(0, len(source), chunk)]
    parts = [run[share(len(run))] for run in runs]
    mine = SubsetImages(name=source.name, base=source, indices=[index for part in parts for index in part])
    items = _decoded(mine, batch_size)
    with tqdm(total=len(mine), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for part in parts:
            images = []
            for _ in part:
                image, _label, unreadable = next(items)
                if unreadable is None:
                    images.append(image)
                elif unreadable not in source.skipped:
                    source.skipped.append(unreadable)
            bar.update(len(part))
            yield _stack(images, source) if images else None


def _stack(images: list[torch.Tensor], source: ImageSource) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise RenormError(f"images in {source.name} have different sizes after preprocessing {sorted(shapes)}; "
                          "set --crop so that every image is cropped to one size")
    return torch.stack(images)


class Batches:
    """A re-iterable stream of image batches (and labels, when known) over any input.

    Accepts an ImageSource, a tensor (N, C, H, W), or any re-iterable of tensors or
    (images, labels, ...) tuples such as a DataLoader.
    """

    def __init__(self, data: Any, batch_size: int = 50, progress: bool = False, desc: str = "images"):
        if isinstance(data, Batches):
            data = data.data
        if isinstance(data, Iterator):
            raise RenormError("images must be re-iterable (a DataLoader, list, tensor or ImageSource), "
                              "not a one-shot iterator or generator: renormalize reads them more than once")
        if batch_size < 1:
            raise RenormError(f"--batch-size must be at least 1, got {batch_size}")
        self.data, self.batch_size, self.progress, self.desc = data, batch_size, progress, desc

    @property
    def source(self) -> ImageSource | None:
        return self.data if isinstance(self.data, ImageSource) else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        data = self.data
        if isinstance(data, ImageSource):
            yield from iter_batches(data, self.batch_size, self.progress, self.desc)
        elif isinstance(data, torch.Tensor):
            if data.dim() < 2:
                raise RenormError(f"an image tensor needs a batch dimension, got shape {tuple(data.shape)}")
            for start in range(0, len(data), self.batch_size):
                yield data[start:start + self.batch_size], None
        elif isinstance(data, Iterable):
            for item in data:
                if isinstance(item, torch.Tensor):
                    yield item, None
                elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                    labels = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
                    yield item[0], labels
                else:
                    raise RenormError(f"a batch must be a tensor or an (images, labels) pair, got {type(item).__name__}")
        else:
            raise RenormError(f"cannot read images from a {type(data).__name__}; pass an ImageSource, "
                              "a tensor or a DataLoader")

    def images(self) -> Iterator[torch.Tensor]:
        for images, _ in self:
            yield images

    def first(self, num_images: int) -> torch.Tensor:
        """Return the first `num_images` images as one tensor (fewer if the stream is shorter)."""
        taken: list[torch.Tensor] = []
        count = 0
        for images in Batches(self.data, max(1, min(self.batch_size, num_images))).images():
            taken.append(images[: num_images - count])
            count += len(taken[-1])
            if count >= num_images:
                break
        if not taken:
            raise no_readable_images(self.data)
        return torch.cat(taken)


def first_images(data: Any, count: int) -> Any:
    """The first `count` images of a tensor, or of a re-iterable of batches (a DataLoader), still re-iterable."""
    if isinstance(data, torch.Tensor):
        return data[:count]
    return FirstImages(data, count)


@dataclass
class FirstImages:
    """The first `count` images of a re-iterable of batches, as batches (with their labels, if any)."""

    data: Any
    count: int

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for images, labels in Batches(self.data):
            images = images[: self.count - seen]
            yield images if labels is None else (images, labels[: len(images)])
            seen += len(images)
            if seen >= self.count:
                return


def no_readable_images(data: Any, purpose: str = "") -> RenormError:
    """The error for images that yielded nothing: names the set and how many files were skipped as unreadable."""
    data = data.data if isinstance(data, Batches) else data
    purpose = f" {purpose}" if purpose else ""
    if isinstance(data, ImageSource):
        skipped = data.skipped
        detail = (f"all {len(skipped)} files were unreadable and skipped (first: {skipped[0]})" if skipped
                  else "the set is empty")
        return RenormError(f"no readable images{purpose} in {data.name}: {detail}")
    return RenormError(f"no images{purpose}: the {type(data).__name__} yielded none")
