"""Per-row adapters: every row of one batch runs its own adapter, in one forward pass.

    with deltatune.mixed_batch(model, ["sentiment", "topic", "__base__"]):
        logits = model(**batch).logits          # row 0 with "sentiment", row 1 "topic", row 2 the base

or, as in peft, ``model(**batch, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

Each wrapper runs its base module once for the whole batch and the rows' deltas on top
(``DeltaLayer._forward_rows``): so one frozen base serves many adapters at the cost of one batch.
Methods whose adapters replace whole blocks or change weights that every row shares cannot
share a batch with other adapters (``Method.row_refusal``), and say so; a batch whose rows
all name the same adapter runs as that adapter alone, whatever its method.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

from .errors import ConfigError, MergeError
from .layer import BASE, AdapterState, Rows
from .state import refuse_if_merged, require_state

KEYWORD = "adapter_names"
HOOKS = "_deltatune_row_hooks"  # model.__dict__ keys: the keyword's hooks, and the batches they entered
ENTERED = "_deltatune_row_batches"


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs adapter ``adapter_names[i]`` (``"__base__"``:
    the base model alone), whichever adapters are active outside it.

    Raises:
        ConfigError: an unknown name, no names, or an adapter whose method cannot share a batch.
        MergeError: adapters are merged, or a ``"__base__"`` row asks for a base that an adapter
            changed in place.
    """
    state = require_state(model)
    names = list(adapter_names)
    _check_names(model, state, names)
    saved = state.active, state.disabled, state.rows
    state.active, state.disabled, state.rows = list(state.active), False, None
    if set(names) == {BASE}:
        state.disabled = True
    elif len(set(names)) == 1:
        state.active = names[:1]
    else:
        state.rows = Rows(names)
    try:
        yield model
    finally:
        state.active, state.disabled, state.rows = saved


def _check_names(model: nn.Module, state: AdapterState, names: list[str]) -> None:
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{KEYWORD} = {names!r}: it needs one adapter name per row.",
                          f"pass a list of names, '{BASE}' for rows that run the base model alone.")
    unknown = sorted({n for n in names if n != BASE and n not in state.methods})
    if unknown:
        raise ConfigError(f"{KEYWORD} names '{unknown[0]}', which this model does not have.",
                          f"its adapters: {', '.join(state.methods)}; '{BASE}' runs a row on the base model.")
    refuse_if_merged(model, "run per-row adapters")
    in_place = [n for n, m in state.methods.items() if m.in_place]
    if BASE in names and in_place:
        raise MergeError(f"adapter '{in_place[0]}' changed the base weights in place: there is no base model "
                         f"left for the '{BASE}' rows.", "load a fresh base model for them.")
    if len(set(names)) > 1:
        for name in sorted(set(names) - {BASE}):
            _check_mixes(name, state.methods[name])


def _check_mixes(name: str, method: Any) -> None:
    reason = method.row_refusal()
    if reason:
        raise ConfigError(f"adapter '{name}' ({method.name}) cannot share a batch with other adapters: {reason}.",
                          "give its rows a batch of their own (deltatune serve does).")


def accept_adapter_names(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=...)`` and ``model.generate(..., adapter_names=...)`` run
    per-row adapters (once per model; ``drop_adapter_names`` undoes it)."""
    if HOOKS in model.__dict__:
        return
    # first: the keyword must be gone before other pre-hooks (prompt tuning's) read the arguments
    handles = [model.register_forward_pre_hook(_enter_rows, with_kwargs=True, prepend=True),
               model.register_forward_hook(_leave_rows, with_kwargs=True, always_call=True)]
    model.__dict__[HOOKS] = handles
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)


def drop_adapter_names(model: nn.Module) -> None:
    for handle in model.__dict__.pop(HOOKS, []):
        handle.remove()
    model.__dict__.pop("generate", None)


def _enter_rows(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = kwargs.pop(KEYWORD, None)
    entered = contextlib.ExitStack()  # left by _leave_rows, which runs even when forward fails
    model.__dict__.setdefault(ENTERED, []).append(entered)
    if names is not None:
        entered.enter_context(mixed_batch(model, names))
    return args, kwargs


def _leave_rows(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    entered = model.__dict__.get(ENTERED)
    if entered:
        entered.pop().close()


def _generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    names = kwargs.pop(KEYWORD, None)
    with mixed_batch(model, names) if names is not None else contextlib.nullcontext():
        return type(model).generate(model, *args, **kwargs)
