"""Write src/renorm/assets/fashion_mnist_mini.npz: a seeded random subset of Fashion-MNIST.

    python scripts/make_fashion_mnist_mini.py

2000 training images (calibration for the demo and the tests) and 3000 test images,
drawn with seed 0 from the Debian package dataset-fashion-mnist. Used when the full
data set is not installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from renorm.data import FASHION_MNIST_MINI, fashion_mnist_arrays, fashion_mnist_available  # noqa: E402

COUNTS = {"train": 2000, "test": 3000}


def main() -> None:
    if not fashion_mnist_available():
        sys.exit("needs the full Fashion-MNIST: apt-get install dataset-fashion-mnist")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in COUNTS.items():
        images, labels, _ = fashion_mnist_arrays(split)
        pick = np.sort(rng.permutation(len(images))[:count])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[pick], labels[pick].astype(np.uint8)
        arrays[f"{split}_indices"] = pick.astype(np.int32)
    np.savez_compressed(FASHION_MNIST_MINI, **arrays)
    print(f"{FASHION_MNIST_MINI}: {FASHION_MNIST_MINI.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
