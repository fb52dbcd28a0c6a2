"""What every image set shares: the preprocessing `Preset` and the `ImageSource` interface.

The floor below `data` (folders, built-in sets, batching) and `photos` (natural photo
crops): both build on these and neither imports the other's pieces from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from renorm.errors import RenormError


@dataclass(frozen=True)
class Preset:
    """Preprocessing: RGB, resize shorter side, centre-crop, optional pad, normalize."""

    name: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: int = 0
    interpolation: str = "bilinear"  # of the resize: a torchvision InterpolationMode value (timm models: bicubic)

    @property
    def input_size(self) -> int:
        return self.crop + 2 * self.pad

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        resize = T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation))
        steps: list[Any] = [T.Lambda(_to_rgb), resize, T.CenterCrop(self.crop)]
        if self.pad:
            steps.append(T.Pad(self.pad))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def describe(self) -> dict[str, Any]:
        """The fields as plain values; interpolation only when not bilinear, so that files with the
        usual presets stay readable by renorm versions that predate it."""
        described = {"name": self.name, "resize": self.resize, "crop": self.crop, "pad": self.pad,
                     "mean": list(self.mean), "std": list(self.std)}
        if self.interpolation != "bilinear":
            described["interpolation"] = self.interpolation
        return described


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


PRESETS: dict[str, Preset] = {
    "imagenet": Preset("imagenet", 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # EfficientNet-Lite (TensorFlow): (x - 127) / 128 on 0..255 pixels.
    "tf": Preset("tf", 256, 224, (127 / 255,) * 3, (128 / 255,) * 3),
    # Reference models: 28x28 Fashion-MNIST zero-padded to 32x32 (the background is black).
    "fashion-mnist": Preset("fashion-mnist", 28, 28, (0.2860,) * 3, (0.3530,) * 3, pad=2),
}


def make_preset(base: str | Preset = "imagenet", resize: int | None = None, crop: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Preset:
    """Return `base` (a preset or its name) with any of resize/crop/mean/std overridden."""
    if isinstance(base, str):
        if base not in PRESETS:
            raise RenormError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[base]
    if resize is not None and resize < 1:
        raise RenormError(f"--resize must be a positive number of pixels, got {resize}")
    if crop is not None and crop < 1:
        raise RenormError(f"--crop must be a positive number of pixels, got {crop}")
    mean3 = _three("mean", mean) if mean is not None else base.mean
    std3 = _three("std", std) if std is not None else base.std
    if any(s <= 0 for s in std3):
        raise RenormError(f"--std values must be positive, got {list(std3)}")
    custom = any(v is not None for v in (resize, crop, mean, std))
    return Preset(base.name + ("+custom" if custom else ""), resize or base.resize, crop or base.crop,
                  mean3, std3, base.pad, base.interpolation)


def _three(what: str, values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3  # type: ignore[return-value]
    if len(values) == 3:
        return values  # type: ignore[return-value]
    raise RenormError(f"--{what} takes 1 or 3 numbers (one per RGB channel), got {len(values)}")



@dataclass
class ImageSource:
    """An indexable set of images; `load(i)` returns (image tensor, label or -1).

    workers: processes that decode the images while the model runs (0: this process
    decodes them); the images and their order are the same whatever the number.
    """

    name: str
    classes: tuple[str, ...] | None = None
    skipped: list[str] = field(default_factory=list)
    workers: int = 0

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def describe_item(self, index: int) -> str:
        return f"{self.name}[{index}]"
