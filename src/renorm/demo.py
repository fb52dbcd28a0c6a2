"""`renorm demo`: the embedded default, offline, in a few minutes on 2 CPU cores.

Reference resnet18 (Fashion-MNIST) -> 4-bit power-of-two weights (first/last layer 8-bit)
-> exact re-normalization on 1000 unlabeled training images -> 8-bit activations, with
the test accuracy of each stage (the full 10k test set when the Debian package
dataset-fashion-mnist is installed, else the bundled subset).
"""
from __future__ import annotations

from typing import Any

from renorm.api import Config, compress
from renorm.data import open_images
from renorm.models import load_model

DEMO_CONFIG = Config(wbits=4, scheme="pow2", first_last_bits=8, abits=8, renorm="exact", num_images=1000)


def demo(progress: bool = False, config: Config = DEMO_CONFIG) -> dict[str, Any]:
    """Run the demo pipeline and return its report."""
    loaded = load_model("fmnist-resnet18")
    calib = open_images("fashion-mnist:train", loaded.preset, labeled=False)
    test = open_images("fashion-mnist:test", loaded.preset, labeled=True)
    return compress(loaded, calib, config, test, progress=progress).report
