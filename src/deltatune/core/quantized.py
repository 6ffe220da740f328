"""What the engine must know of weights a quantisation library stores (bitsandbytes' 4-bit and
8-bit, loaded through transformers): they cannot train, nothing may be written into them, and
they may pack several values into one stored element. Duck-typed, so core imports no library."""

from __future__ import annotations

import math

import torch
from torch import nn


def is_quantized(param: torch.Tensor) -> bool:
    """A parameter stored as integer codes (4-bit packed in uint8, 8-bit in int8)."""
    return not param.is_floating_point()


def quantized_module(module: nn.Module) -> bool:
    """A layer of a quantisation library (Linear4bit, Linear8bitLt), or one holding codes. transformers
    may leave a layer a Linear4bit with a float weight (MiniLM's classifier): a copy of it fails in
    bitsandbytes' forward, so it is refused as a module trained in full all the same."""
    return type(module).__module__.startswith("bitsandbytes.") or any(
        is_quantized(p) for p in module.parameters(recurse=False))


def values_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the values a parameter holds: its own, or for a quantised weight that packs them
    (4-bit: two per byte, repacked for the CPU kernels at the first forward) the shape its
    quant_state records."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


def values_held(param: torch.Tensor) -> int:
    return math.prod(values_shape(param))
