"""Virtual tokens: n learned positions in front of the input, the mechanism prompt and prefix
tuning share.

Prompt tuning puts them in front of the input embeddings, prefix tuning in front of every
self-attention's keys and values. Neither changes what any module of the model computes, so
their tensors live in one wrapper at the model's root, ``model.deltatune_virtual_tokens``, one
delta per adapter: switching, disabling, saving, loading and accounting then work as for any
delta, and forward hooks bring the active ones into the computation. File keys follow:
``deltatune_virtual_tokens.prompt``, ``deltatune_virtual_tokens.prefixes``.

Here: that holder, and the transformers calling conventions the hooks share (arguments by
name, the key/value cache, positions, masks), for every row alike or, in a per-row batch
(``deltatune.mixed_batch``), row by row.
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
    """Drop one adapter's virtual tokens; hooks and holder go with the last that need them.
    Also undoes an ``add`` that failed part way (a holder without the delta, or without hooks)."""
    holder = model._modules.get(HOLDER)
    if holder is None:
        return
    if adapter_name in holder.deltas:
        kind = type(holder.deltas.pop(adapter_name))
        if not any(isinstance(d, kind) for d in holder.deltas.values()):
            for handle in holder.hooks.pop(kind, []):
                handle.remove()
    if not len(holder.deltas):
        for handles in holder.hooks.values():
            for handle in handles:
                handle.remove()
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


def tokens(kw: dict[str, Any]) -> torch.Tensor | None:
    """The input: its ids, (batch, seq), or the embeddings passed instead, (batch, seq, d)."""
    return kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")


def positions(kw: dict[str, Any]) -> torch.Tensor:
    """The input's position ids: as passed, or as the model would count them, after the cache."""
    if kw.get("position_ids") is not None:
        return kw["position_ids"]
    given, start = tokens(kw), cached_length(kw)
    return torch.arange(start, start + given.shape[1], device=given.device)[None]  # (1, seq)


def padded(tensor: torch.Tensor, n: int, value: int, like: torch.Size | None = None) -> torch.Tensor:
    """``n`` columns of ``value`` in front of a (batch, seq) tensor (when shaped ``like``, if given)."""
    if tensor.dim() != 2 or (like is not None and tensor.shape != like):
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], n), value), tensor], dim=1)  # (batch, n + seq)


def running(model: nn.Module, kind: type) -> list[Any]:
    """The deltas of one kind this forward runs: the active ones, or in a per-row batch those of
    its rows."""
    holder = model._modules.get(HOLDER)
    rows = holder._adapter_state.rows if holder is not None else None
    if rows is None:
        return active(model, kind)
    return [d for n, d in holder.deltas.items() if n in rows.names and isinstance(d, kind)]


def in_rows(model: nn.Module, kind: type, batch: int, device: torch.device) -> dict[str, tuple[Any, torch.Tensor]] | None:
    """In a per-row batch (``deltatune.mixed_batch``): adapter name -> (its delta of ``kind``, the
    indices of its rows) for a module input of ``batch`` rows. None outside such a batch."""
    holder = model._modules.get(HOLDER)
    state = holder._adapter_state if holder is not None else None
    if state is None or state.rows is None or state.disabled:
        return None
    return {n: (holder.deltas[n], index) for n, index in state.rows.groups(batch, device).items()
            if n in holder.deltas and isinstance(holder.deltas[n], kind)}


class PrefixedCache:
    """Stands in for an attention module's cache: its ``update`` returns keys and values with
    prefixes in front, and the real cache (if any) stores and counts the user's tokens only.

    ``prefix``: (2, n, d_kv), the same for every row, or (batch, 2, n, d_kv), one per row.
    """

    def __init__(self, inner: Any, prefix: torch.Tensor):
        self.inner, self.prefix = inner, prefix

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            keys, values = self.inner.update(keys, values, layer_idx, *args, **kwargs)
        batch, heads, _, head_dim = keys.shape
        prefix = self.prefix.to(keys.dtype)
        prefix = prefix.expand(batch, *prefix.shape) if prefix.dim() == 3 else prefix  # (batch, 2, n, d_kv)
        n = prefix.shape[-2]
        prefix = prefix.reshape(batch, 2, n, heads, head_dim).permute(1, 0, 3, 2, 4)  # (2, batch, heads, n, head_dim)
        return torch.cat([prefix[0], keys], dim=2), torch.cat([prefix[1], values], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0


def widen_mask(mask: torch.Tensor | None, n: int, queries: int, past: int, causal: bool,
               like: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor | None:
    """Put n key columns in front of a 4D mask (boolean or additive): visible to every query, or,
    with ``own`` (batch, n), to the rows whose own columns it marks."""
    if mask is None:
        if own is None and (not causal or queries == 1):
            return None  # everything is visible, the prefixes too
        # No mask in a causal layer means "causal" to sdpa, which aligns it wrongly once keys
        # outnumber queries: spell it out, each query seeing its own past.
        visible = torch.ones(queries, past + queries, dtype=torch.bool, device=like.device)
        visible = visible.tril(past) if causal else visible
        mask = torch.zeros(visible.shape, dtype=like.dtype, device=like.device)
        mask = mask.masked_fill(~visible, torch.finfo(like.dtype).min)[None, None]
    if own is None:
        front = torch.ones if mask.dtype == torch.bool else torch.zeros
        return torch.cat([front(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)
    mask = mask.expand(len(own), *mask.shape[1:])
    seen = own[:, None, None, :].expand(*mask.shape[:-1], n)  # (batch, heads or 1, queries, n)
    if mask.dtype != torch.bool:
        seen = torch.zeros(seen.shape, dtype=mask.dtype, device=mask.device).masked_fill(~seen, torch.finfo(mask.dtype).min)
    return torch.cat([seen, mask], dim=-1)


def widen_bias(module: nn.Module, bias: torch.Tensor | None, n: int, queries: int, past: int,
               like: torch.Tensor) -> torch.Tensor:
    """T5-style relative position bias: none for the prefixes. Later layers reuse the first one's."""
    keys = past + queries
    if bias is None:
        if getattr(module, "has_relative_attention_bias", False):
            bias = module.compute_bias(queries, keys, past_seen_tokens=past)
        else:
            bias = torch.zeros(1, module.n_heads, queries, keys, dtype=like.dtype, device=like.device)
    missing = n + keys - bias.shape[-1]
    if missing <= 0:
        return bias
    return torch.cat([bias.new_zeros(*bias.shape[:-1], missing), bias], dim=-1)
