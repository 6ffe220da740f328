"""A model's adapter bookkeeping: where it lives, and the checks every verb starts with."""

from __future__ import annotations

from torch import nn

from .errors import ConfigError, MergeError
from .layer import AdapterState
from .method import iter_layers

STATE_ATTR = "_deltatune_state"


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's adapter bookkeeping, or None for a model deltatune has not touched.

    A model built from wrappers made on their own (``LoRALinear``) gets one state the first
    time a verb sees it: its wrappers then switch, merge and save together.
    """
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        return state
    layers = [layer for _, layer in iter_layers(model)]
    own = [layer._adapter_state for layer in layers if layer._adapter_state.methods]
    if not own:
        return None
    for layer in layers:
        layer._adapter_state = own[0]
    setattr(model, STATE_ATTR, own[0])
    return own[0]


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None or not state.methods:
        raise ConfigError("this model has no deltatune adapter.", "call deltatune.apply(model, config) first.")
    return state


def require_adapter(model: nn.Module, adapter_name: str) -> AdapterState:
    state = require_state(model)
    if adapter_name not in state.methods:
        raise ConfigError(f"no adapter named '{adapter_name}'.",
                          f"the model has: {', '.join(state.methods)}.")
    return state


def merged_adapters(model: nn.Module) -> list[str]:
    return sorted({name for _, layer in iter_layers(model) for name in layer.merged})


def refuse_if_merged(model: nn.Module, action: str) -> None:
    if merged_adapters(model):
        raise MergeError(f"cannot {action} while adapters are merged into the base weights.",
                         "call deltatune.unmerge(model) first.")
