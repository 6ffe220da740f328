"""Virtual tokens: n learned positions in front of the input, the mechanism prompt and prefix
tuning share.

Prompt tuning puts them in front of the input embeddings, prefix tuning in front of every
self-attention's keys and values. Neither changes what any module of the model computes, so
their tensors live in one wrapper at the model's root, ``model.deltatune_virtual_tokens``, one
delta per adapter: switching, disabling, saving, loading and accounting then work as for any
delta, and forward hooks bring the active ones into the computation. File keys follow:
``deltatune_virtual_tokens.prompt``, ``deltatune_virtual_tokens.prefixes``.

Here: that holder, and the transformers calling conventions the hooks share (arguments by
name, the key/value cache, positions, masks).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.layer import AdapterState, Delta, DeltaLayer

HOLDER = "deltatune_virtual_tokens"


class Holder(DeltaLayer):
    """The root wrapper: every adapter's virtual tokens, and the hooks each kind needs."""

    def __init__(self, state: AdapterState):
        super().__init__(nn.Identity(), state)
        self.hooks: dict[type, list[RemovableHandle]] = {}


def add(model: nn.Module, adapter_name: str, state: AdapterState, delta: Delta,
        hooks: Callable[[], list[RemovableHandle]]) -> None:
    """Hold ``delta`` at the model's root, on the model's device; ``hooks()`` registers the
    forward hooks its kind needs, once per model (removed with the last delta of the kind)."""
    if HOLDER not in model._modules:
        setattr(model, HOLDER, Holder(state).train(model.training))
    holder = getattr(model, HOLDER)
    holder.add_delta(adapter_name, delta.to(next(model.parameters()).device).train(model.training))
    if type(delta) not in holder.hooks:
        holder.hooks[type(delta)] = hooks()


def release(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter's virtual tokens; hooks and holder go with the last that need them."""
    holder = model._modules[HOLDER]
    kind = type(holder.deltas[adapter_name])
    del holder.deltas[adapter_name]
    if not any(isinstance(d, kind) for d in holder.deltas.values()):
        for handle in holder.hooks.pop(kind):
            handle.remove()
    if not len(holder.deltas):
        delattr(model, HOLDER)


def active(model: nn.Module, kind: type) -> list[Any]:
    """The active, enabled deltas of one kind (prompts or prefixes), in activation order."""
    holder = model._modules.get(HOLDER)
    return [d for d in holder.active_deltas() if isinstance(d, kind)] if holder is not None else []


def arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All call arguments by name, so hooks can rewrite them whichever way they were passed."""
    return {**dict(zip(parameter_names(type(module)), args)), **kwargs}


@functools.cache
def parameter_names(kind: type) -> list[str]:
    """The names of ``kind.forward``'s parameters, ``self`` left out (read once per class)."""
    return list(inspect.signature(kind.forward).parameters)[1:]


def cache_of(kw: dict[str, Any]) -> Any:
    """The key/value cache passed under either of its names (``cache=None`` counts as absent)."""
    return kw["cache"] if kw.get("cache") is not None else kw.get("past_key_values")


def cached_length(kw: dict[str, Any]) -> int:
    """How many tokens the cache already holds (0 without one): > 0 while generating."""
    cache = cache_of(kw)
    return cache.get_seq_length() if cache is not None else 0


def positions(kw: dict[str, Any]) -> torch.Tensor:
    """The input's position ids: as passed, or as the model would count them, after the cache."""
    if kw.get("position_ids") is not None:
        return kw["position_ids"]
    tokens = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
    start = cached_length(kw)
    return torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]  # (1, seq)


def padded(tensor: torch.Tensor, n: int, value: int, like: torch.Size | None = None) -> torch.Tensor:
    """``n`` columns of ``value`` in front of a (batch, seq) tensor (when shaped ``like``, if given)."""
    if tensor.dim() != 2 or (like is not None and tensor.shape != like):
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], n), value), tensor], dim=1)  # (batch, n + seq)
