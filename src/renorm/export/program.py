"""Architectures no spec names, stored as a torch.export program without its tensors.

A model renorm cannot rebuild from a spec (a user's own nn.Module, a pickled module) is
saved as the program torch.export traces from it: a graph of aten operators, no Python
class to import or unpickle. The program is traced from the compressed model, so it
computes what that model computes (its activation quantizers included); every parameter
and buffer in it is stripped to a zero-stride view of one element, so that the renorm
file's packed codes and state_dict stay the one copy of the weights. The archive is
xz-compressed (its JSON graph shrinks ~40x: 0.79 MB -> 15 kB for mobilenet_v2).

Loading checks that the archive holds nothing torch.export would unpickle (tensor
subclasses, script or opaque objects) and reads it with torch's weights-only unpickler
forced, so opening the file runs no code from it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import lzma
import os
import types
import warnings
import zipfile
from typing import Iterator

import torch
from torch import nn

from renorm.errors import RenormError, one_line
from renorm.quantize.points import PointsForward
from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE

MARK = "_renorm_program"  # set on a model rebuilt from a program: it can be evaluated, not edited


class NotExportable(Exception):
    """torch.export could not trace the model; the message says why, in one line."""


MAX_ARCHIVE = 1 << 30  # bytes a program may unpack to: a bound against a crafted file


def export_program(model: nn.Module, example: torch.Tensor) -> bytes:
    """The torch.export.save archive of `model` traced on `example`, every tensor stripped, xz-compressed.

    The batch and the image size are left free where the model allows it. Raises
    NotExportable when torch.export cannot trace the model.
    """
    traced = copy.deepcopy(model).cpu().eval()
    points = traced.__dict__.pop("forward", None)  # activation points replace forward by an fx graph runner
    if isinstance(points, PointsForward):  # export that graph itself: same submodules, a real forward(x)
        traced = torch.fx.GraphModule(traced, points.graph).eval()
    for module in traced.modules():  # codes and masks are kept in the renorm file, packed
        module._buffers.pop(MASK_ATTRIBUTE, None)
        module._modules.pop(ATTRIBUTE, None)  # else torch.export keeps its buffers as constants
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # an older torch (no Dim.AUTO, no pt2 archive) lands here too
            free = torch.export.Dim.AUTO
            program = torch.export.export(traced, (example,), dynamic_shapes=({0: free, 2: free, 3: free},))
            for name, tensor in list(program.state_dict.items()):
                stripped = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
                program.state_dict[name] = (nn.Parameter(stripped, requires_grad=tensor.requires_grad)
                                            if isinstance(tensor, nn.Parameter) else stripped)
            program.example_inputs = None
            torch.export.save(program, buffer)
        except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
            raise NotExportable(one_line(error)[:200]) from None
    return lzma.compress(buffer.getvalue(), preset=6)


def load_program(data: bytes, where: str) -> nn.Module:
    """The module of a program written by export_program, with fresh (uninitialised) tensors.

    where: the file it came from, for error messages. The caller fills the tensors
    (load_state_dict). The module is in eval mode and stays there: a traced program
    has no training mode.
    """
    data = _decompress(data, where)
    _check_nothing_pickled(data, where)
    try:
        with _weights_only(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001
        raise RenormError(f"cannot read the torch.export program in {where} ({one_line(error)[:200]}); it needs "
                          f"a torch that reads it (written by torch {torch.__version__} or earlier?)") from None
    module = program.module()
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        fresh = torch.empty(tensor.shape, dtype=tensor.dtype)
        if attribute in owner._parameters:
            owner._parameters[attribute] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
        else:
            owner._buffers[attribute] = fresh
    for owner in module.modules():  # lifted constants are plain attributes: as buffers, .to(device) moves them
        for attribute, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor):
                delattr(owner, attribute)
                owner.register_buffer(attribute, value, persistent=False)
    # torch.export's module refuses train()/eval(); the graph is the eval-mode one whatever the flag
    module.train = types.MethodType(_set_training_flags, module)
    module.eval = types.MethodType(lambda self: self.train(False), module)
    setattr(module, MARK, True)
    return module.eval()


def _set_training_flags(self: nn.Module, mode: bool = True) -> nn.Module:
    for module in self.modules():
        module.training = mode
    return self


def _decompress(data: bytes, where: str) -> bytes:
    decompressor = lzma.LZMADecompressor()
    try:
        archive = decompressor.decompress(data, max_length=MAX_ARCHIVE)
    except lzma.LZMAError as error:
        raise RenormError(f"the torch.export program in {where} is damaged ({error})") from None
    if not decompressor.eof:
        raise RenormError(f"the torch.export program in {where} is cut short or unpacks to over "
                          f"{MAX_ARCHIVE >> 20} MB; write the file again with renorm compress --out")
    return archive


def _check_nothing_pickled(data: bytes, where: str) -> None:
    """Refuse an archive in which torch.export.load would unpickle anything but plain tensors."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        configs = [json.loads(archive.read(name)) for name in names
                   if name.endswith("_config.json") and "/data/" in name]
    except (zipfile.BadZipFile, ValueError, KeyError) as error:
        raise RenormError(f"the torch.export program in {where} is damaged ({one_line(error)[:100]})") from None
    pickled = [key for config in configs for key, entry in config.get("config", {}).items()
               if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_"))]
    legacy = [name for name in names if name.endswith((".pt", ".pkl")) and "/sample_inputs/" not in name]
    if pickled or legacy:
        raise RenormError(f"the torch.export program in {where} holds pickled objects ({(pickled or legacy)[0]}); "
                          "renorm writes none: the file was not written by renorm compress --out")


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """torch.load inside the block may only rebuild tensors and plain containers, whatever its caller asks."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {key: os.environ.pop(key, None) for key in keys}
    os.environ[keys[0]] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
