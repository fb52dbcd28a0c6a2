"""renorm: compress pretrained CNNs without labels or retraining.

Quantize or prune a network, then re-estimate its BatchNorm statistics on unlabeled
images (He & Cheng, ECCV 2018). The pipeline is load -> compress -> renormalize ->
calibrate activations -> evaluate -> export; each stage is a function here.
"""
from __future__ import annotations

__version__ = "0.1.0"

from renorm.errors import RenormError

__all__ = ["RenormError", "__version__"]
