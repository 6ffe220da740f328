"""What the engine must know of weights a quantisation library stores (bitsandbytes' 4-bit and
8-bit, loaded through transformers): they cannot train, they may pack several values into one
stored element, and a merge reaches their values only by dequantising them and quantising the
result again. Detection is duck-typed; bitsandbytes is imported only to (de)quantise."""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn


def bitsandbytes() -> ModuleType:
    """bitsandbytes, which a model holding its layers is loaded with already."""
    return importlib.import_module("bitsandbytes")


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


def quantized_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What a quantised layer's weight takes in memory: its codes and the scales they need (4-bit:
    one absmax per block, itself quantised with double quantisation, and the code table; 8-bit:
    one scale per row)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        extra = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            extra += [state.state2.absmax, state.state2.code]
    else:
        extra = [weight.SCB if weight.SCB is not None else getattr(getattr(module, "state", None), "SCB", None)]
    return [weight.data] + [t for t in extra if isinstance(t, torch.Tensor)]


def weight_values(module: nn.Module) -> torch.Tensor:
    """A layer's weight as values: the weight itself, or for a quantised layer a dequantised copy
    in the dtype it was quantised from (what its forward computes with)."""
    weight = module.weight
    if not is_quantized(weight):
        return weight
    bnb = bitsandbytes()
    if weight.dtype == torch.int8:  # LLM.int8(): codes per row, one scale per row (kept on the layer after a forward)
        scale = weight.SCB if weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scale)
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked for the CPU kernel at an inference forward
        state = copy.deepcopy(state)  # the inverse rewrites the state it is given
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        if not state.nested:  # bitsandbytes 0.50's inverse restores a nested absmax only: the packing
            # stored it transposed, (in / block, out), in bf16 (what the CPU kernel computes with)
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32)
    return bnb.functional.dequantize_4bit(data, state)


def snapshot(module: nn.Module) -> Any:
    """What :func:`restore` needs to give a quantised layer back its codes exactly (None for a
    layer whose weight is plain floats)."""
    weight = getattr(module, "weight", None)
    if weight is None or not is_quantized(weight):
        return None
    if weight.dtype == torch.int8:
        return weight.data, weight.SCB if weight.SCB is not None else module.state.SCB
    return weight


def restore(module: nn.Module, held: Any) -> None:
    if isinstance(held, tuple):
        codes, scale = held
        bnb = bitsandbytes()
        module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scale)
    else:
        module.weight = held
        if hasattr(module, "quant_state"):
            module.quant_state = held.quant_state


def requantize(module: nn.Module, values: torch.Tensor, like: torch.Tensor) -> None:
    """Quantise ``values`` into ``module``'s weight the way ``like`` (its former weight) was quantised."""
    bnb = bitsandbytes()
    if like.dtype == torch.int8:
        fresh = bnb.nn.Int8Params(values, requires_grad=False, has_fp16_weights=False)
    else:
        fresh = bnb.nn.Params4bit(values, requires_grad=False, blocksize=like.quant_state.blocksize,
                                  compress_statistics=like.compress_statistics, quant_type=like.quant_type,
                                  quant_storage=like.quant_storage, module=module)
    module.weight = fresh._quantize(values.device)


@contextlib.contextmanager
def weight_in_float(module: nn.Module, requantize_after: bool = True) -> Iterator[None]:
    """Within the block a quantised layer's weight is its dequantised values, which may be changed
    in place (a merge); they are quantised again at the end (unless ``requantize_after`` is False:
    the caller puts codes back itself), or on an error the codes are put back untouched. Nothing
    happens for a layer whose weight is plain floats."""
    weight = getattr(module, "weight", None)
    if weight is None or not is_quantized(weight):
        yield
        return
    held = snapshot(module)
    module.weight = nn.Parameter(weight_values(module).clone(), requires_grad=False)
    try:
        yield
    except BaseException:
        restore(module, held)
        raise
    if requantize_after:
        requantize(module, module.weight.data, like=weight)


def keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit codes for its CPU inference kernel at the first eval-mode
    forward: its training forward (0.50) cannot run on the repacked codes (an in-place bias add on
    a tensor autograd tracks), so a run that evaluates and then trains on would fail."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
