"""What users do with adapters: apply, switch, disable, merge, unmerge, remove."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .layer import AdapterState, ModuleCopy
from .method import (MethodConfig, add_deltas, check_not_nested, deltas_of, iter_layers,
                     method_for)
from .targets import resolve_targets

STATE_ATTR = "_deltatune_state"


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's adapter bookkeeping, or None for a model deltatune has not touched."""
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None or not state.configs:
        raise ConfigError("this model has no deltatune adapter.", "call deltatune.apply(model, config) first.")
    return state


def require_adapter(model: nn.Module, adapter_name: str) -> AdapterState:
    state = require_state(model)
    if adapter_name not in state.configs:
        raise ConfigError(f"no adapter named '{adapter_name}'.",
                          f"the model has: {', '.join(state.configs)}.")
    return state


def apply(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Inject an adapter into ``model`` in place and make it the one active, trainable adapter.

    Args:
        model: any ``torch.nn.Module`` (a transformers model or not).
        config: a method config such as ``LoraConfig(target_modules=["query", "value"])``.
        adapter_name: a name to switch, save and delete this adapter by.

    Returns:
        The same model, with everything frozen but this adapter (and its ``modules_to_save``).

    Raises:
        ConfigError: the name is taken, or the config does not fit the model; the model is
            unchanged when this is raised.
    """
    state = adapter_state(model) or AdapterState()
    if adapter_name in state.configs:
        raise ConfigError(f"the model already has an adapter named '{adapter_name}'.",
                          "pass another adapter_name, or delete_adapter() the old one.")
    _refuse_if_merged(model, "add an adapter")
    method = method_for(config)
    plan = method.plan(model)
    saved = [] if method.family == "full" else _plan_modules_to_save(model, config)
    method.inject(model, adapter_name, state, plan)
    add_deltas(model, saved, adapter_name, state, lambda base, _: ModuleCopy(base))
    state.configs[adapter_name] = config
    setattr(model, STATE_ATTR, state)
    set_adapter(model, adapter_name)
    return model


def _plan_modules_to_save(model: nn.Module, config: MethodConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = resolve_targets(model, config.modules_to_save, (nn.Module,), config.method,
                            field_name="modules_to_save")
    # Keep only the outermost matches: a copy of a module already copies its children.
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    check_not_nested(model, names)
    return names


def trainable_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters that training this adapter updates, by their name in the model."""
    config = require_adapter(model, adapter_name).configs[adapter_name]
    params = {}
    for name, layer, delta in deltas_of(model, adapter_name):
        prefix = f"{name}.deltas.{adapter_name}."
        params.update({prefix + k: p for k, p in delta.named_parameters()})
    params.update(method_for(config).extra_trainable(model, adapter_name))
    return params


def set_trainable(model: nn.Module, names: set[str]) -> None:
    """Exactly the named parameters train; everything else is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make one adapter (or several, combined) active and trainable; the others stay loaded but idle."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    state = require_state(model)
    for name in names:
        require_adapter(model, name)
    _refuse_if_merged(model, "switch adapters")
    state.active = names
    trainable: set[str] = set()
    for name in names:
        trainable.update(trainable_parameters(model, name))
    set_trainable(model, trainable)


def active_adapters(model: nn.Module) -> list[str]:
    return list(require_state(model).active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly what the base model computes."""
    state = require_state(model)
    _refuse_if_merged(model, "disable adapters")
    for name in state.active:
        if method_for(state.configs[name]).in_place:
            raise MergeError(f"adapter '{name}' changed the base weights in place; there is no "
                             "base model left to switch back to.", "load a fresh base model instead.")
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous


def merged_adapters(model: nn.Module) -> list[str]:
    return sorted({name for _, layer in iter_layers(model) for name in layer.merged})


def _refuse_if_merged(model: nn.Module, action: str) -> None:
    if merged_adapters(model):
        raise MergeError(f"cannot {action} while adapters are merged into the base weights.",
                         "call deltatune.unmerge(model) first.")


def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights; outputs stay the same, the deltas stop running.

    Raises:
        MergeError: already merged, or an active method cannot merge (the message says why);
            nothing stays merged when this is raised.
    """
    state = require_state(model)
    _refuse_if_merged(model, "merge again")
    for name in state.active:
        method = method_for(state.configs[name])
        if not method.mergeable:
            raise MergeError(f"adapter '{name}' ({method.name}) cannot be merged: {method.merge_refusal}.",
                             "serve it unmerged, or train a mergeable method (lora, ia3).")
    _refuse_if_tied(model, state.active)
    with torch.no_grad():
        try:
            for name in state.active:
                for _, layer, _ in deltas_of(model, name):
                    layer.merge(name)
        except BaseException:
            # All or nothing: a delta that refuses its values (e.g. IA3 with a zero scale), or
            # any other failure, must not leave the layers before it merged.
            for _, layer in iter_layers(model):
                layer.unmerge()
            raise


def _refuse_if_tied(model: nn.Module, adapter_names: list[str]) -> None:
    """A weight shared by two modules (tied embeddings and LM head) cannot take one module's delta."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for adapter in adapter_names:
        for name, layer, _ in deltas_of(model, adapter):
            for param in layer.base_layer.parameters():
                if len(owners[id(param)]) > 1:
                    others = [o for o in owners[id(param)] if not o.startswith(name + ".")]
                    raise MergeError(f"'{name}' shares its weight with '{others[0]}' (tied weights): "
                                     "merging would change both.",
                                     "serve this adapter unmerged, or untie the weights before applying it.")


def unmerge(model: nn.Module) -> None:
    """Subtract merged adapters from the base weights again."""
    require_state(model)
    if not merged_adapters(model):
        raise MergeError("nothing is merged.", "call deltatune.merge(model) first.")
    with torch.no_grad():
        for _, layer in iter_layers(model):
            layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters (unless ``merge`` already did) and return a plain model: no
    wrappers, original module names."""
    if not merged_adapters(model):
        merge(model)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; merged weights stay as they are."""
    state = require_state(model)
    for name in list(state.configs):
        method_for(state.configs[name]).remove(model, name)
    for name, layer in list(iter_layers(model)):
        _replace(model, name, layer.base_layer)
    delattr(model, STATE_ATTR)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; wrappers left with no delta are replaced by their base module."""
    state = require_adapter(model, adapter_name)
    _refuse_if_merged(model, "delete an adapter")
    method_for(state.configs[adapter_name]).remove(model, adapter_name)
    for name, layer in list(iter_layers(model)):
        if adapter_name in layer.deltas:
            del layer.deltas[adapter_name]
            if not len(layer.deltas):
                _replace(model, name, layer.base_layer)
    del state.configs[adapter_name]
    state.active = [n for n in state.active if n != adapter_name]
    if not state.configs:  # a plain model again, trainable as from_pretrained gives it
        delattr(model, STATE_ATTR)
        model.requires_grad_(True)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, keyed by module path without the adapter name.

    e.g. ``bert.encoder.layer.0.attention.self.query.lora_A.weight`` or ``classifier.weight``.
    """
    config = require_adapter(model, adapter_name).configs[adapter_name]
    tensors = {}
    for name, _, delta in deltas_of(model, adapter_name):
        tensors.update({f"{name}.{k}": v for k, v in delta.stored_state().items()})
    tensors.update(method_for(config).extra_state(model, adapter_name))
    return tensors


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Copy stored tensors into an adapter already applied with the same config.

    Raises:
        AdapterFileError: keys missing or unexpected, or a tensor of the wrong shape; the
            message names the module.
    """
    expected = adapter_state_dict(model, adapter_name)
    check_tensors_match(expected, tensors)
    owners = {}
    for name, _, delta in deltas_of(model, adapter_name):
        for key in delta.stored_state():
            owners[f"{name}.{key}"] = (delta, key)
    per_delta: dict[int, tuple] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            if key in owners:
                delta, rel = owners[key]
                per_delta.setdefault(id(delta), (delta, {}))[1][rel] = value
            else:
                expected[key].copy_(value)
        for delta, values in per_delta.values():
            delta.load_stored_state(values)


def check_tensors_match(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Missing/unexpected set arithmetic and shape checks, with the module named."""
    from .errors import AdapterFileError

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise AdapterFileError(f"the adapter file does not fit this model: {'; '.join(parts)}.",
                               "load it into the base model it was trained on, with the same method config.")
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterFileError(
                f"'{key}' has shape {tuple(value.shape)} in the file but {tuple(expected[key].shape)} "
                "in this model: the adapter was trained on another base model.",
                "load it into the base model it was trained on.")
