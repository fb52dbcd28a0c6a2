"""Calibration images nudged towards the statistics the network was trained on.

A few unlabeled photos excite only some of a network's channels; reconstruction fitted on
them leaves the others free to drift, and the quantized model then disagrees with FP32 on
other photos. The FP32 network's BatchNorm layers remember the mean and variance of every
channel over the training set. refine_images() moves a few calibration images, by Adam on
their pixels, until each BatchNorm input's batch mean and standard deviation match those
running statistics (the label-free loss of ZeroQ / DeepInversion, started from real photos
instead of noise), and reconstruction uses them beside the real images. See
renorm.reconstruct.ReconstructConfig.refined and docs/RESULTS.md for what it changes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from renorm.errors import RenormError
from renorm.renormalize import batchnorm_layers


def refine_images(reference: nn.Module, images: torch.Tensor, steps: int = 30, learning_rate: float = 0.01,
                  batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Return a copy of `images` moved so that, batch by batch, every BatchNorm of `reference` sees
    inputs whose per-channel mean and standard deviation match its running statistics.

    Loss per BatchNorm: mean over channels of ((mean - running_mean)^2 + (std - sqrt(running_var))^2)
    / running_var, summed over the BatchNorms; Adam on the pixels, `steps` passes over the images in
    batches of `batch_size`, mirrored left-right on every other pass. `reference` is not modified
    (a copy with frozen weights runs in eval mode).
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise RenormError(f"image refinement needs steps >= 1, batch_size >= 1 and a learning rate > 0, got "
                          f"{steps}, {batch_size}, {learning_rate}")
    model = copy.deepcopy(reference).eval()
    model.requires_grad_(False)
    layers = [layer for _, layer in batchnorm_layers(model)]
    if not layers:
        raise RenormError("refining calibration images needs BatchNorm layers with running statistics, and "
                          "this model has none; reconstruct without refined images (refined=0)")
    losses: list[torch.Tensor] = []

    def match(module: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
        x = args[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        mean, std = x.mean(dims), x.var(dims, unbiased=False).add(1e-12).sqrt()
        variance = module.running_var.float() + module.eps
        losses.append((((mean - module.running_mean.float()) ** 2 + (std - variance.sqrt()) ** 2)
                       / variance).mean())

    handles = [layer.register_forward_pre_hook(match) for layer in layers]
    pixels = images.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=learning_rate)
    try:
        with torch.enable_grad(), tqdm(total=steps, desc="refine images", unit="step", disable=not progress,
                                        leave=False) as bar:
            for step in range(steps):
                for start in range(0, len(pixels), batch_size):
                    losses.clear()
                    batch = pixels[start:start + batch_size]
                    model(batch.flip(-1) if step % 2 else batch)
                    optimizer.zero_grad()
                    torch.stack(losses).sum().backward()
                    optimizer.step()
                bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return pixels.detach().to(images.dtype)
