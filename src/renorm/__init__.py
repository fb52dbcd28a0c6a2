"""renorm: compress pretrained CNNs without labels or retraining.

Quantize or prune a network, then re-estimate its BatchNorm statistics on unlabeled
images (He & Cheng, ECCV 2018). The pipeline is load -> compress -> renormalize ->
calibrate activations -> evaluate -> export; each stage is a function here, and
`compress` runs them all.
"""
from __future__ import annotations

__version__ = "0.1.0"

from renorm.errors import RenormError  # noqa: E402
from renorm.api import Config, Result, compress  # noqa: E402
from renorm.data import Batches, PRESETS, make_preset, open_images, sample  # noqa: E402
from renorm.evaluate import evaluate  # noqa: E402
from renorm.export import save_compressed  # noqa: E402
from renorm.export.onnx_qdq import export_onnx  # noqa: E402
from renorm.models import load_model  # noqa: E402
from renorm.prune import PruneConfig, prune  # noqa: E402
from renorm.quantize import (ActivationQuantConfig, WeightQuantConfig, calibrate_activations,  # noqa: E402
                             quantize_weights)
from renorm.reconstruct import ReconstructConfig, reconstruct  # noqa: E402
from renorm.renormalize import renormalize  # noqa: E402

__all__ = ["ActivationQuantConfig", "Batches", "Config", "PRESETS", "PruneConfig", "RenormError", "Result",
           "WeightQuantConfig", "calibrate_activations", "compress", "evaluate", "export_onnx", "load_model", "make_preset",
           "open_images", "prune", "quantize_weights", "ReconstructConfig", "reconstruct", "renormalize", "sample", "save_compressed", "__version__"]
