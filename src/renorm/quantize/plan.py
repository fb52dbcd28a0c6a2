"""Which scheme and bits each layer gets: the grids' bit ranges, `--layer-bits PATTERN=BITS`, first/last.

A pattern is a glob over layer names (`layer4.*`, `_blocks.1?.*`) or a type keyword:
  depthwise  convs with one input channel per group (groups == in_channels > 1)
  grouped    other convs with groups > 1
  pointwise  1x1 convs without groups
  conv, linear, first, last  (first and last: the model's first conv and last linear layer)
BITS is 2..8, or 32 to leave the layer in float. Later patterns override earlier ones and
the first/last rule. A layer whose bits the scheme cannot represent (pow2 above 6 bits)
is quantized uniform, as the first and last layers are.


The budgeted allocation (`--avg-bits`) is renorm.quantize.allocation.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from renorm.errors import RenormError

KEYWORDS = ("depthwise", "grouped", "pointwise", "conv", "linear", "first", "last")
FLOAT_BITS = 32
SCHEMES = ("pow2", "uniform", "minmax")
BITS_RANGE = {"pow2": (2, 6), "uniform": (2, 8), "minmax": (2, 8)}


def check_bits(scheme: str, bits: int, flag: str = "--wbits", float_value: int = 32) -> None:
    """Raise a RenormError naming `flag` unless `bits` is valid for `scheme` (float_value means float)."""
    if scheme not in SCHEMES:
        raise RenormError(f"unknown weight scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    low, high = BITS_RANGE[scheme]
    if not low <= bits <= high:
        extra = "; use --scheme uniform for 7 or 8 bits" if scheme == "pow2" and bits > high else ""
        raise RenormError(f"{flag} {bits} is out of range for {scheme}: choose {low}..{high} "
                          f"(or {float_value} to leave weights in float){extra}")



def parse_layer_bits(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """Parse `PATTERN=BITS` strings; raise a RenormError naming the bad one."""
    parsed = []
    for item in items:
        pattern, sep, value = str(item).rpartition("=")
        if not sep or not pattern:
            raise RenormError(f"--layer-bits {item!r} is not PATTERN=BITS (e.g. depthwise=8 or 'layer4.*=3')")
        try:
            bits = int(value)
        except ValueError:
            raise RenormError(f"--layer-bits {item!r}: {value!r} is not a number of bits (2..8, or 32 for float)") \
                from None
        check_layer_bits(pattern, bits)
        parsed.append((pattern, bits))
    return tuple(parsed)


def check_layer_bits(pattern: str, bits: int) -> None:
    if not (2 <= bits <= 8 or bits == FLOAT_BITS):
        raise RenormError(f"--layer-bits {pattern}={bits}: bits must be 2..8, or 32 to leave the layer in float")


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    groups = getattr(module, "groups", 1)
    if groups > 1:
        return "depthwise" if groups == module.in_channels else "grouped"
    if all(k == 1 for k in getattr(module, "kernel_size", (0,))):
        return "pointwise"
    return "conv"


def matches(pattern: str, name: str, module: nn.Module, ends: tuple[str | None, str | None]) -> bool:
    """Whether a --layer-bits pattern selects this layer."""
    if pattern == name:
        return True
    if pattern in KEYWORDS:
        kind = layer_kind(module)
        if pattern == "first":
            return name == ends[0]
        if pattern == "last":
            return name == ends[1]
        if pattern == "conv":
            return not isinstance(module, nn.Linear)
        return kind == pattern
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns_match(layers: list[tuple[str, nn.Module]], patterns: Sequence[tuple[str, int]],
                         ends: tuple[str | None, str | None]) -> None:
    for pattern, _ in patterns:
        if not any(matches(pattern, name, module, ends) for name, module in layers):
            examples = ", ".join(name for name, _ in layers[:4])
            raise RenormError(f"--layer-bits pattern {pattern!r} matches no conv/linear layer; use a glob over "
                              f"layer names (e.g. {examples}) or one of {', '.join(KEYWORDS)}")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: scheme and bits, or None for float."""

    scheme: str
    bits: int


def plan_bits(layers: list[tuple[str, nn.Module]], bits: int, scheme: str, first_last_bits: int,
              exclude: Sequence[str], patterns: Sequence[tuple[str, int]],
              ends: tuple[str | None, str | None]) -> dict[str, LayerPlan | None]:
    """Scheme and bits of every layer (None: float), from the defaults, first/last, exclude and patterns."""
    check_patterns_match(layers, patterns, ends)
    plans: dict[str, LayerPlan | None] = {}
    for name, module in layers:
        chosen, layer_scheme = bits, scheme
        if name in ends and bits != FLOAT_BITS:  # with float weights (--wbits 32) the ends stay float too
            chosen = first_last_bits if first_last_bits != 0 else FLOAT_BITS
            layer_scheme = "uniform"
        for pattern, pattern_bits in patterns:
            if matches(pattern, name, module, ends):
                chosen, layer_scheme = pattern_bits, scheme
        if name in exclude or chosen == FLOAT_BITS:
            plans[name] = None
            continue
        low, high = BITS_RANGE[layer_scheme]
        if not low <= chosen <= high:
            layer_scheme = "uniform"
        plans[name] = LayerPlan(layer_scheme, chosen)
    return plans
