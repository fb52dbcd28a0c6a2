"""Built-in natural photos for ImageNet models offline: seeded random crops, no labels.

  photos:calib[:N]  N crops (default 4000) of 5 scikit-image photos: astronaut, chelsea,
                    coffee, rocket, stereo_motorcycle (left view)
  photos:eval[:N]   N crops (default 1000) of 4 other photos: scikit-learn's china and
                    flower, scikit-image's hubble_deep_field and retina

Crop i is drawn from its own seeded generator (random photo, 10-100% of its area,
aspect 3/4..4/3, random flip), then preprocessed with the model's preset. The two sets
share no photo, so agreement measured on photos:eval is out of sample. Needs the
optional extra: pip install 'renorm[photos]'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from renorm.images import ImageSource, Preset
from renorm.errors import RenormError

SPLITS = {"calib": (("skimage", "astronaut"), ("skimage", "chelsea"), ("skimage", "coffee"),
                    ("skimage", "rocket"), ("skimage", "stereo_motorcycle")),
          "eval": (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("skimage", "hubble_deep_field"),
                   ("skimage", "retina"))}
DEFAULT_COUNT = {"calib": 4000, "eval": 1000}
SEED = {"calib": 1_000_003, "eval": 2_000_003}


def is_photo_spec(spec: str) -> bool:
    """photos:SPLIT[:N]; a bare `photos` is a folder of that name, as `fashion-mnist` is."""
    name, sep, _ = spec.partition(":")
    return name == "photos" and bool(sep)


@lru_cache(maxsize=None)
def _photo(library: str, name: str) -> Image.Image:
    try:
        if library == "sklearn":
            from sklearn.datasets import load_sample_image

            array = load_sample_image(name)
        else:
            from skimage import data

            array = getattr(data, name)()
            if name == "stereo_motorcycle":
                array = array[0]
    except ImportError:
        raise RenormError("built-in photos need scikit-image and scikit-learn: pip install 'renorm[photos]'") from None
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-12)).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


@dataclass
class PhotoCrops(ImageSource):
    """Seeded random crops of a fixed list of photos."""

    photos: tuple[tuple[str, str], ...] = ()
    count: int = 0
    seed: int = 0
    preset: Preset | None = None
    _transform: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.count

    def crop(self, index: int) -> Image.Image:
        """The index-th crop, before preprocessing."""
        generator = np.random.default_rng(self.seed + index)
        photo = _photo(*self.photos[int(generator.integers(len(self.photos)))])
        width, height = photo.size
        area = width * height * generator.uniform(0.1, 1.0)
        aspect = math.exp(generator.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(min(width, round(math.sqrt(area * aspect))))
        h = int(min(height, round(math.sqrt(area / aspect))))
        left = int(generator.integers(0, width - w + 1))
        top = int(generator.integers(0, height - h + 1))
        crop = photo.crop((left, top, left + w, top + h))
        return crop.transpose(Image.FLIP_LEFT_RIGHT) if generator.random() < 0.5 else crop

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        if self._transform is None:
            self._transform = self.preset.transform()
        return self._transform(self.crop(index)), -1


def open_photo_crops(spec: str, preset: Preset) -> PhotoCrops:
    """Open photos:calib[:N] or photos:eval[:N]."""
    parts = spec.split(":")
    split = parts[1] if len(parts) > 1 else ""
    if split not in SPLITS or len(parts) > 3:
        raise RenormError(f"unknown photo set {spec!r}; use photos:calib[:N] or photos:eval[:N]")
    try:
        count = int(parts[2]) if len(parts) == 3 else DEFAULT_COUNT[split]
    except ValueError:
        raise RenormError(f"{spec!r}: the number of crops must be an integer") from None
    if count < 1:
        raise RenormError(f"{spec!r}: the number of crops must be at least 1")
    return PhotoCrops(name=f"photos:{split}", photos=SPLITS[split], count=count, seed=SEED[split], preset=preset)
