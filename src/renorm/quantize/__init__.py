"""Weight and activation quantization."""
from __future__ import annotations

from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
from renorm.quantize.weights import (QuantizedWeight, WeightQuantConfig, fit_channels, quantize_tensor,
                                     quantize_weights, weight_quantization_stats)

__all__ = ["ActivationQuantConfig", "QuantizedWeight", "WeightQuantConfig", "calibrate_activations",
           "fit_channels", "quantize_tensor", "quantize_weights", "weight_quantization_stats"]
