"""Activation quantization: every conv/linear input gets one fitted per-tensor scale.

Inputs that calibration shows are never negative (outputs of ReLU/ReLU6, and pooling of
them) use unsigned levels 0..2^b-1; others (the image, linear bottlenecks) use signed
levels -(2^(b-1)-1)..2^(b-1)-1. The scale is fitted as in the paper: start from
max / top level, then alternate q <- clip(round(x / alpha)), alpha <- <x, q> / <q, q>
while the squared error keeps falling. Fake quantization in float, via forward pre-hooks,
so layer names and state_dict keys stay as they were.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from renorm.data import Batches, no_readable_images
from renorm.errors import RenormError
from renorm.forward import eval_mode, forward
from renorm.layers import quantizable_layers

ATTRIBUTE = "_renorm_act"  # where a module keeps the ActivationQuantizer of its input


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Activation bits, how many images calibrate the scales, and how many values per layer."""

    bits: int = 8
    num_images: int = 400
    max_samples: int = 1 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise RenormError(f"--abits {self.bits} is out of range: choose 2..16 (or 32 for float activations)")
        if self.num_images < 1:
            raise RenormError(f"--act-images must be at least 1, got {self.num_images}")


@dataclass
class ActivationQuantizer:
    """Fake-quantizes a tensor to `bits` with one scale; unsigned or symmetric signed levels."""

    scale: float
    signed: bool
    bits: int
    relative_error: float = float("nan")

    @property
    def limits(self) -> tuple[int, int]:
        top = 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1
        return (-top if self.signed else 0), top

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.limits
        return torch.clamp(torch.round(x / self.scale), low, high) * self.scale


def fit_activation_scale(values: torch.Tensor, max_abs: float, signed: bool, bits: int,
                         max_iterations: int = 100) -> ActivationQuantizer:
    """Fit the scale on sampled values by alternating minimisation, from max / top level."""
    quantizer = ActivationQuantizer(max_abs if max_abs > 0 else 1.0, signed, bits)
    quantizer.scale = quantizer.scale / quantizer.limits[1]
    x = values.to(torch.float32)
    loss = float(((x - quantizer(x)) ** 2).mean())
    low, high = quantizer.limits
    for _ in range(max_iterations):
        q = torch.clamp(torch.round(x / quantizer.scale), low, high)
        qq = float((q * q).sum())
        if qq == 0:
            break
        candidate = ActivationQuantizer(float((x * q).sum()) / qq, signed, bits)
        new_loss = float(((x - candidate(x)) ** 2).mean())
        if not new_loss < loss or candidate.scale <= 0:
            break
        quantizer, loss = candidate, new_loss
    quantizer.relative_error = loss / max(float((x * x).mean()), 1e-30)
    return quantizer


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    quantizer = getattr(module, ATTRIBUTE, None)
    if quantizer is None or not args:
        return args
    return (quantizer(args[0]),) + tuple(args[1:])


def attach(module: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Quantize `module`'s input with `quantizer` from now on."""
    setattr(module, ATTRIBUTE, quantizer)
    # The hook is found by identity, not by a stored handle: handles do not survive deepcopy.
    if _quantize_input not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_quantize_input)


def detach(model: nn.Module) -> None:
    """Remove every activation quantizer from `model`."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _quantize_input:
                del module._forward_pre_hooks[key]
        module.__dict__.pop(ATTRIBUTE, None)


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: Any, config: ActivationQuantConfig = ActivationQuantConfig(),
                          batch_size: int = 50, progress: bool = False, inplace: bool = False) -> nn.Module:
    """Return `model` with an input quantizer fitted for every conv/linear layer (a copy unless inplace=True).

    The scales are fitted on the first `config.num_images` images.
    """
    if not quantizable_layers(model):
        raise RenormError("the model has no conv or linear layer whose input could be quantized")
    model = model if inplace else copy.deepcopy(model)
    layers = quantizable_layers(model)
    detach(model)
    generator = torch.Generator().manual_seed(config.seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    max_abs = dict.fromkeys(samples, 0.0)
    negative = dict.fromkeys(samples, False)

    def collector(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            # config.max_samples values per layer over config.num_images images, whatever the batches
            budget = max(1, config.max_samples * len(args[0]) // config.num_images)
            x = args[0].detach().reshape(-1)
            if x.numel() > budget:
                x = x[torch.randint(x.numel(), (budget,), generator=generator).to(x.device)]
            samples[name].append(x.to(torch.float32).clone())
            max_abs[name] = max(max_abs[name], float(args[0].detach().abs().max()))
            negative[name] = negative[name] or bool((args[0] < 0).any())
        return hook

    handles = [module.register_forward_pre_hook(collector(name)) for name, module in layers]
    try:
        seen = 0
        with eval_mode(model):
            for batch in Batches(images, batch_size, progress, "calibrate activations").images():
                batch = batch[: config.num_images - seen]
                forward(model, batch)
                seen += len(batch)
                if seen >= config.num_images:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise no_readable_images(images, "to calibrate activations on")
    for name, module in layers:
        values = torch.cat(samples[name])
        attach(module, fit_activation_scale(values, max_abs[name], negative[name], config.bits))
    return model


def activation_quantization_stats(model: nn.Module) -> list[dict]:
    """Per quantized input: layer name, bits, signed, scale, relative MSE on the calibration sample."""
    return [{"layer": name, "bits": q.bits, "signed": q.signed, "scale": q.scale, "relative_mse": q.relative_error}
            for name, module in model.named_modules() if (q := getattr(module, ATTRIBUTE, None)) is not None]
