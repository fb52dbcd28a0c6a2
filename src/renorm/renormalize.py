"""BatchNorm re-estimation ("re-normalization") on unlabeled images.

Modes
  exact  each BatchNorm's running mean / unbiased variance become the population
         statistics of its input over all N images.
  shift  keep the original statistics and move them by the shift that compression
         caused: mean += mu_comp - mu_fp32, var *= var_comp / var_fp32 (the FP32 model
         sees the same images). Robust when the images are few or unlike training data.
  none   leave the statistics alone.
  auto   run each of the three and keep the one whose outputs are closest to the
         reference model's (mean KL(reference || model)) on calibration images:
         the last AUTO_IMAGES of them, which reconstruction (it takes the first) has
         not fitted when there are enough. Ties keep the earlier of exact, shift, none.
         Label-free; costs the exact and shift passes plus four scoring passes over
         those images.

How (both modes). The statistics the deployed, eval-mode network needs are a fixed
point: each BatchNorm's input computed with every earlier BatchNorm already at its final
statistics. What matters most is that the statistics are *consistent* layer to layer;
the sample size matters much less (benchmarks/renorm_variants.py measures both). A
train-mode pass over small batches normalizes by per-batch statistics (so the result
depends on the batch size); the paper's one-batch pass over all N images is the fixed
point but needs memory for N images at once; an eval-mode pass that measures every
layer under the old statistics of the layers before it is inconsistent, and a second
such pass can diverge.

renorm makes one progressive pass. The images go through the network in chunks of
`chunk` images (default 64, whatever the batch size). At each BatchNorm a pre-hook
merges the chunk's input moments into the layer's running population moments (Chan's
merge, float64) and sets them as the layer's statistics before it normalizes the chunk;
so every chunk's later layers are computed with earlier layers' statistics estimated
from all images so far, including that chunk. With N <= chunk this is exactly the
paper's one-batch fixed point; with more images it approximates it, using all of them
(the first chunks' inputs to later layers, computed under statistics from few images,
stay in the moments; benchmarks/renorm_variants.py measures the deviation).
Memory: one chunk. Cost: one forward pass (two, FP32 and compressed, in shift mode),
plus the moments. The result depends on the order and the chunk size, never on the
batch size.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from renorm import distributed
from renorm.data import Batches, ImageSource, SubsetImages, chunk_shares, first_images, no_readable_images
from renorm.errors import RenormError
from renorm.forward import eval_mode, forward
from renorm.prune import HISTORY_ATTRIBUTE, kept_channels, pruning_steps

MODES = ("exact", "shift", "none")
AUTO = "auto"
CHOICES = MODES + (AUTO,)  # what renormalize() and --renorm accept
AUTO_IMAGES = 256  # calibration images that score each mode in auto
_DEAD = 1e-10  # a channel whose variance is below this fraction of its layer's mean variance
_CANCEL = 100.0  # sums of squares are trusted while mean^2 <= _CANCEL * variance (relative error ~6e-8 x that ratio)


@dataclass
class Moments:
    """Streaming per-channel count, mean and sum of squared deviations (float64)."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Merge one batch (channels on dim 1) into the running moments.

        With several processes (renorm.distributed), each holds its share of the batch and
        all of them merge the moments of the whole batch.
        """
        n = x.numel() // x.shape[1]
        if n:
            mean, var = _batch_moments(x)
            m2 = var * n
        else:  # this process's share of the chunk is empty
            mean = m2 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        n, mean, m2 = distributed.reduce_moments(n, mean, m2)
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance, as BatchNorm stores it."""
        return self.m2 / max(self.count - 1, 1)


def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float64) of a batch (channels on dim 1).

    Contiguous images (N, C, H, W...): per-(image, channel) sums and norms, which torch
    reduces over contiguous memory about 4x faster than its Welford kernel
    (`batch_norm_update_stats`), combined per channel in float64. Their error grows
    with mean^2 / variance; a batch where some channel exceeds _CANCEL is measured
    again with the Welford kernel. On a GPU the Welford kernel is used directly: the check
    above reads a value back to the CPU, which stalls the GPU's queue at every BatchNorm.
    """
    x = x.detach()
    if x.dim() > 2 and x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu":
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        per = rows.shape[-1] * rows.shape[0]
        mean = rows.sum(-1).double().sum(0) / per
        square = (torch.linalg.vector_norm(rows, dim=-1).double() ** 2).sum(0) / per
        var = (square - mean * mean).clamp_min(0)
        if bool((mean * mean <= _CANCEL * var).all()):
            return mean, var
    if x.dim() == 2 or x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        try:
            mean, var = torch.batch_norm_update_stats(x, None, None, 1.0)  # Welford, one fused pass
            return mean.double(), var.double()
        except RuntimeError:
            pass
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    return mean, var


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers (1d/2d/3d, any subclass) that keep running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def renormalize(model: nn.Module, images: Any, mode: str = "exact", reference: nn.Module | None = None,
                batch_size: int = 50, chunk: int = 64, inplace: bool = False, progress: bool = False) -> nn.Module:
    """Return `model` with re-estimated BatchNorm statistics (a copy unless inplace=True).

    images: an ImageSource, an (N, C, H, W) tensor, or a re-iterable of batches (a
    DataLoader); batch_size is how they are read. chunk: images per progressive step (see
    the module docstring). reference: the uncompressed model, required by modes 'shift' and
    'auto' (which leaves the statistics of the mode it chose).
    Nothing but running_mean / running_var changes; the model comes back in eval mode.
    A BatchNorm that never runs on the images keeps its statistics, and one that runs
    more than once per forward pass pools all its call sites; a warning names both
    (renormalize_with_summary also returns them).
    """
    return renormalize_with_summary(model, images, mode, reference, batch_size, chunk, inplace, progress)[0]


@torch.no_grad()
def renormalize_with_summary(model: nn.Module, images: Any, mode: str = "exact", reference: nn.Module | None = None,
                             batch_size: int = 50, chunk: int = 64, inplace: bool = False,
                             progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """renormalize(), and what it did.

    The summary: {"mode", "images", "layers_updated", "not_run": [names of BatchNorms that
    never ran], "shared": {name: calls per forward pass, for those that ran more than once}};
    mode 'auto' adds "chosen", "kl" ({mode: mean KL to the reference}) and "scored_images".
    """
    if mode not in CHOICES:
        raise RenormError(f"unknown re-normalization mode {mode!r}; choose one of {', '.join(CHOICES)}")
    if chunk < 1:
        raise RenormError(f"the re-normalization chunk must be at least 1 image, got {chunk}")
    if isinstance(model, torch.jit.ScriptModule):
        raise RenormError("a TorchScript model cannot be re-normalized (PyTorch allows no hooks on it); "
                          "load the eager model instead (torchvision:NAME --weights FILE)")
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    if mode == AUTO:
        return work, _auto(work, images, reference, batch_size, chunk, progress)
    summary: dict[str, Any] = {"mode": mode, "images": 0, "layers_updated": 0, "not_run": [], "shared": {}}
    if mode == "none":
        return work, summary
    layers = batchnorm_layers(work)
    _warn_skipped(work)
    if not layers:
        warnings.warn("the model has no BatchNorm layer with running statistics; nothing to re-normalize",
                      stacklevel=3)
        return work, summary
    target = _targets(mode, layers, reference, getattr(work, HISTORY_ATTRIBUTE, None))
    stream = Batches(images, batch_size, progress, f"renormalize ({mode})")
    with eval_mode(reference):
        calls, passes, summary["images"] = _progressive_pass(work, layers, stream, chunk, target,
                                                             reference if mode == "shift" else None)
    summary["not_run"] = [name for name, _ in layers if calls[name] == 0]
    summary["shared"] = {name: count // passes for name, count in calls.items() if count > passes}
    summary["layers_updated"] = len(layers) - len(summary["not_run"])
    _warn_unusual(summary)
    return work, summary


def _auto(work: nn.Module, images: Any, reference: nn.Module | None, batch_size: int, chunk: int,
          progress: bool) -> dict[str, Any]:
    """Mode auto, in place: each mode in turn, the statistics of the one closest to `reference` kept."""
    from renorm.evaluate import agreement, images_counted, predict

    if reference is None:
        raise RenormError("re-normalization mode 'auto' compares each mode with the uncompressed model: "
                          "pass reference=<the FP32 model>")
    layers = batchnorm_layers(work)
    if not layers:
        warnings.warn("the model has no BatchNorm layer with running statistics; nothing to re-normalize",
                      stacklevel=4)
        return {"mode": AUTO, "chosen": "none", "images": 0, "layers_updated": 0, "not_run": [], "shared": {}}
    original = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}
    scored = scoring_images(images, AUTO_IMAGES)
    reference_logits = predict(reference, scored, batch_size)[0]
    kl: dict[str, float] = {}
    best: tuple[str, dict, dict] | None = None
    for mode in MODES:
        for name, m in layers:
            m.running_mean.copy_(original[name][0])
            m.running_var.copy_(original[name][1])
        _, summary = renormalize_with_summary(work, images, mode, reference, batch_size, chunk, inplace=True,
                                              progress=progress)
        logits = predict(work, scored, batch_size, progress, f"renormalize (auto): score {mode}")[0]
        kl[mode] = agreement(logits, reference_logits, across_processes=True)["kl"]
        if best is None or kl[mode] < kl[best[0]]:
            best = (mode, summary, {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers})
    chosen, summary, statistics = best
    for name, m in layers:
        m.running_mean.copy_(statistics[name][0])
        m.running_var.copy_(statistics[name][1])
    return {**summary, "mode": AUTO, "chosen": chosen, "kl": kl,
            "scored_images": images_counted(reference_logits, across_processes=True)}


def scoring_images(images: Any, count: int) -> Any:
    """The images mode auto scores on: the last `count` of an ImageSource or tensor, else the first `count`."""
    data = images.data if isinstance(images, Batches) else images
    if isinstance(data, ImageSource):
        return SubsetImages(name=data.name, base=data, indices=list(range(max(0, len(data) - count), len(data))))
    if isinstance(data, torch.Tensor):
        return data[-count:]
    return first_images(data, count)


def _warn_unusual(summary: dict[str, Any]) -> None:
    not_run, shared = summary["not_run"], summary["shared"]
    if not_run:
        warnings.warn(f"{len(not_run)} BatchNorm layers never ran on the images and keep their old statistics "
                      f"(unused in forward, or bypassed by a fused module): {', '.join(not_run[:5])}", stacklevel=4)
    for name, count in list(shared.items())[:5]:
        warnings.warn(f"BatchNorm {name} runs {count} times per forward pass: its statistics pool the inputs of "
                      f"all {count} call sites", stacklevel=4)


def _progressive_pass(work: nn.Module, layers: list, stream: Batches, chunk: int, target: "Target",
                      reference: nn.Module | None) -> tuple[dict[str, int], int, int]:
    """One pass in chunks; each BatchNorm takes its statistics from all inputs so far before it normalizes.

    Returns how many times each BatchNorm ran, the number of forward passes, and of images.
    """
    moments = {name: Moments() for name, _ in layers}
    reference_moments = {name: Moments() for name, _ in batchnorm_layers(reference)} if reference is not None else {}
    calls = dict.fromkeys(moments, 0)

    def update(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            moments[name].add(args[0])
            ref = reference_moments.get(name)
            ref_pair = (ref.mean, ref.variance) if ref is not None else None
            _set_statistics(module, *target(name, moments[name].mean, moments[name].variance, ref_pair))
        return hook

    handles = [module.register_forward_pre_hook(update(name)) for name, module in layers]
    if reference is not None:
        handles += [module.register_forward_pre_hook(lambda _m, args, acc=reference_moments[name]: acc.add(args[0]))
                    for name, module in batchnorm_layers(reference)]
    passes = count = 0
    try:
        for mine in _my_chunks(stream, chunk):
            total = distributed.total(len(mine))
            if total == 0:  # every file of this chunk was unreadable
                continue
            passes, count = passes + 1, count + total
            if reference is not None:
                forward(reference, mine)
            forward(work, mine)
    finally:
        for handle in handles:
            handle.remove()
    if stream.source is not None and distributed.active():  # every process names every skipped file
        stream.source.skipped[:] = list(dict.fromkeys(distributed.gather_lists(stream.source.skipped)))
    if passes == 0:
        raise no_readable_images(stream, "to re-normalize on")
    return calls, passes, count


def _my_chunks(stream: Batches, chunk: int) -> Iterator[torch.Tensor]:
    """This process's share of each chunk (all of it with one process; possibly no image).

    An ImageSource is cut by position (chunk k holds its images k*chunk .. (k+1)*chunk - 1
    that can be read) and each process decodes only its share; other inputs are read
    whole and cut into chunks of `chunk` images.
    """
    source = stream.source
    if source is None:
        for images in rechunk(stream.images(), chunk):
            yield images[distributed.share(len(images))]
        return
    shape = None
    for images in chunk_shares(source, chunk, distributed.share, stream.batch_size, stream.progress, stream.desc):
        if images is None:  # an empty share: the collectives still need this process's forward pass
            shape = shape if shape is not None else stream.first(1).shape[1:]
            images = torch.empty((0, *shape))
        shape = images.shape[1:]
        yield images


def rechunk(batches: Any, size: int):
    """Yield tensors of exactly `size` images (the last may be smaller) from batches of any size."""
    pending: list[torch.Tensor] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        while count >= size:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield joined[:size]
            rest = joined[size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


def _warn_skipped(model: nn.Module) -> None:
    skipped = [name for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    if skipped:
        warnings.warn(f"{len(skipped)} BatchNorm layers keep no running statistics (they normalize each batch "
                      f"by itself) and were left alone: {', '.join(skipped[:3])}", stacklevel=3)


def matched_channels(original: nn.modules.batchnorm._BatchNorm, pruned: nn.modules.batchnorm._BatchNorm) -> list[int]:
    """Index in `original` of each channel of `pruned`, a copy of it with channels removed, found by stored numbers.

    For models pruned outside renorm (renorm's filter pruning records the exact channels:
    see prune.kept_channels). Pruning keeps each surviving channel's stored numbers
    (running mean and variance, weight, bias) and their order. Where several channels
    of `original` share the same numbers and only some of them were kept (a fresh or
    untrained BatchNorm, say), the numbers cannot tell which: that raises a RenormError
    rather than guess.
    """
    lookup: dict[tuple, list[int]] = {}
    for index, row in enumerate(_stored_numbers(original).tolist()):
        lookup.setdefault(tuple(row), []).append(index)
    rows = [tuple(row) for row in _stored_numbers(pruned).tolist()]
    kept_per_row = Counter(rows)
    for row, count in kept_per_row.items():
        candidates = lookup.get(row, [])
        if len(candidates) < count:
            raise RenormError(f"a BatchNorm with {pruned.num_features} channels is not a pruned copy of the "
                              f"reference's with {original.num_features}: its stored numbers differ "
                              "(use --renorm exact)")
        if len(candidates) > count:
            raise RenormError(f"{len(candidates)} channels of the reference share the same stored numbers and "
                              f"{count} of them were kept: which ones cannot be told from the numbers "
                              "(use --renorm exact, or prune with renorm, which records the removed channels)")
    return [lookup[row].pop(0) for row in rows]


def _stored_numbers(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    parts = [bn.running_mean, bn.running_var] if bn.running_mean is not None else []
    if bn.affine:
        parts += [bn.weight.detach(), bn.bias.detach()]
    return torch.stack(parts, 1)


Target = Callable[[str, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def _targets(mode: str, layers: list, reference: nn.Module | None, record: Any) -> Target:
    """The rule that turns measured input statistics into a layer's new statistics.

    shift starts from the reference's stored statistics (of the kept channels after
    filter pruning), never from the compressed model's current ones: applying it twice
    gives the same model as once.
    """
    if mode == "exact":
        return lambda name, mean, var, ref: (mean, var)
    if reference is None:
        raise RenormError("shift re-normalization needs the uncompressed reference model")
    reference_layers = dict(batchnorm_layers(reference))
    for name, _ in layers:
        if name not in reference_layers:
            raise RenormError(f"shift re-normalization needs the same BatchNorm layers in both models; "
                              f"{name!r} is missing from the reference (use --renorm exact)")
    kept = _kept_channels(layers, reference_layers, reference, record)
    original = {}
    for name, _ in layers:
        index = kept.get(name, slice(None))
        other = reference_layers[name]
        original[name] = (other.running_mean.double()[index].clone(), other.running_var.double()[index].clone())

    def shift(name: str, mean: torch.Tensor, var: torch.Tensor, ref: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ref_mean, ref_var = ref
        if name in kept:
            ref_mean, ref_var = ref_mean[kept[name]], ref_var[kept[name]]
        orig_mean, orig_var = original[name]
        new_mean = orig_mean + (mean - ref_mean)
        new_var = orig_var * var / ref_var.clamp_min(1e-30)
        # No FP32 variance to compare with: fall back to the measured statistics.
        ref_dead = ref_var <= _DEAD * ref_var.mean().clamp_min(1e-30)
        new_mean, new_var = torch.where(ref_dead, mean, new_mean), torch.where(ref_dead, var, new_var)
        # A channel that compression made constant: centre it so that it outputs beta.
        dead = (var <= _DEAD * var.mean().clamp_min(1e-30)) & ~ref_dead
        return torch.where(dead, mean, new_mean), torch.where(dead, orig_var, new_var)

    return shift


def _kept_channels(layers: list, reference_layers: dict, reference: nn.Module, record: Any) -> dict[str, torch.Tensor]:
    """For each BatchNorm with fewer channels than the reference's: the reference's index of each kept channel.

    From the model's own pruning record when it has one (exact), else by stored numbers.
    """
    pruned = [(name, m) for name, m in layers if m.num_features != reference_layers[name].num_features]
    if not pruned:
        return {}
    steps, done = pruning_steps(record), pruning_steps(getattr(reference, HISTORY_ATTRIBUTE, None))
    if steps and steps[:len(done)] == done:  # the reference may itself be an earlier step of the record
        recorded = kept_channels(reference, steps[len(done):])
        for name, module in pruned:
            if name not in recorded or len(recorded[name]) != module.num_features:
                raise RenormError(f"shift re-normalization: the model's pruning record does not lead from the "
                                  f"reference to BatchNorm {name!r} with {module.num_features} channels; give the "
                                  "model it was pruned from as the reference, or use --renorm exact")
        return {name: recorded[name] for name, _ in pruned}
    kept = {}
    for name, module in pruned:
        try:
            kept[name] = torch.tensor(matched_channels(reference_layers[name], module))
        except RenormError as error:
            raise RenormError(f"shift re-normalization, BatchNorm {name!r}: {error}") from None
    return kept


def _set_statistics(module: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    module.running_mean.copy_(mean.to(module.running_mean.dtype))
    module.running_var.copy_(var.clamp_min(0).to(module.running_var.dtype))
