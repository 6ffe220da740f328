"""What users do with adapters: apply, switch, disable, merge, unmerge, remove."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .layer import AdapterState, ModuleCopy
from .method import Method, MethodConfig, add_deltas, check_not_nested, deltas_of, iter_layers, method_for, registered
from .quantized import is_quantized, quantized_module
from .rows import accept_adapter_names, drop_adapter_names
from .state import STATE_ATTR, adapter_state, merged_adapters, refuse_if_merged, require_adapter, require_state


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
    if adapter_name in state.methods:
        raise ConfigError(f"the model already has an adapter named '{adapter_name}'.",
                          "pass another adapter_name, or delete_adapter() the old one.")
    refuse_if_merged(model, "add an adapter")
    method = method_for(config)
    with all_or_nothing(model, adapter_name, method):
        saved = method.saved_modules(model)
        plan = method.plan(model)
        _check_wrapped(model, list(plan or []), saved, config.method)
        method.inject(model, adapter_name, state, plan)
        add_deltas(model, saved, adapter_name, state, lambda base, _: ModuleCopy(base))
        state.methods[adapter_name] = method  # its config as applied: values derived from the model filled in
        setattr(model, STATE_ATTR, state)
        accept_adapter_names(model)
        set_adapter(model, adapter_name)
    return model


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, adapter_name: str, method: Method) -> Iterator[None]:
    """Adding an adapter (``apply``, ``load_adapter``): any exception inside the block removes
    whatever of it was added, so the model is as it was (wrappers, hooks, active adapters and
    which parameters train)."""
    before = adapter_state(model)
    active = list(before.active) if before else []
    trains = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        _remove(model, adapter_name, method)
        state = adapter_state(model)
        if state is not None:
            state.methods.pop(adapter_name, None)
            state.active = active
        if before is None:  # nothing had an adapter: no state, no adapter_names hooks
            model.__dict__.pop(STATE_ATTR, None)
            drop_adapter_names(model)
        for param in model.parameters():
            param.requires_grad_(trains.get(id(param), param.requires_grad))
        raise


def _remove(model: nn.Module, adapter_name: str, method: Method) -> None:
    """Take one adapter's deltas (and what its method added) out; empty wrappers unwrapped."""
    method.remove(model, adapter_name)
    for name, layer in list(iter_layers(model)):
        if adapter_name in layer.deltas:
            del layer.deltas[adapter_name]
        if not len(layer.deltas):
            _replace(model, name, layer.base_layer)


def _check_wrapped(model: nn.Module, wrapped: list[str], saved: list[str], method: str) -> None:
    """Every method's modules: none also trained in full, none inside or around another wrapper."""
    for name in wrapped:
        clash = next((s for s in saved if s == name or name.startswith(s + ".") or s.startswith(name + ".")), None)
        if clash:
            raise ConfigError(f"'{name}' is a {method} target and overlaps '{clash}' in modules_to_save.",
                              "a module is either adapted or trained in full, not both.")
    check_not_nested(model, wrapped + saved)
    for name in saved:
        packed = next((k for k, m in model.get_submodule(name).named_modules() if quantized_module(m)), None)
        if packed is not None:
            raise ConfigError(f"'{name}' in modules_to_save is quantised ('{name}{'.' if packed else ''}{packed}' is "
                              f"a {type(model.get_submodule(name).get_submodule(packed)).__name__}): a module "
                              "trained in full needs its weights in full precision.",
                              f"load the base with it left out of quantization, e.g. "
                              f"BitsAndBytesConfig(..., llm_int8_skip_modules=['{name.rpartition('.')[2]}']).")


def trainable_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters that training this adapter updates, by their name in the model."""
    method = require_adapter(model, adapter_name).methods[adapter_name]
    params = {}
    for name, layer, delta in deltas_of(model, adapter_name):
        prefix = f"{name}.deltas.{adapter_name}."
        params.update({prefix + k: p for k, p in delta.named_parameters()})
    params.update(method.extra_trainable(model, adapter_name))
    return params


def set_trainable(model: nn.Module, names: set[str]) -> None:
    """Exactly the named parameters train; everything else is frozen.

    Raises:
        ConfigError: a named parameter is stored quantised (packed integers, e.g. bitsandbytes'
            4-bit weights): nothing changes.
    """
    packed = [(n, p) for n, p in model.named_parameters() if n in names and is_quantized(p)]
    if packed:
        name, param = packed[0]
        raise ConfigError(f"'{name}' is stored quantised ({type(param).__name__}, {param.dtype}; {len(packed)} such "
                          "parameter(s) in all): "
                          "its values cannot take gradients, so this adapter cannot train it.",
                          "use a method that keeps the base frozen (the additive and re-parameterisation families in "
                          "`deltatune methods`), or load the base model without quantization_config.")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make one adapter (or several, combined) active and trainable; the others stay loaded but idle."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    state = require_state(model)
    for name in names:
        require_adapter(model, name)
    refuse_if_merged(model, "switch adapters")
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
    refuse_if_merged(model, "disable adapters")
    for name in state.active:
        if state.methods[name].in_place:
            raise MergeError(f"adapter '{name}' changed the base weights in place; there is no "
                             "base model left to switch back to.", "load a fresh base model instead.")
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous


def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights; outputs stay the same, the deltas stop running.

    Raises:
        MergeError: already merged, or an active method cannot merge (the message says why);
            nothing stays merged when this is raised.
    """
    state = require_state(model)
    refuse_if_merged(model, "merge again")
    for name in state.active:
        method = state.methods[name]
        if not method.mergeable:
            raise MergeError(f"adapter '{name}' ({method.name}) cannot be merged: {method.merge_refusal}.",
                             "serve it unmerged, or train a mergeable method ("
                             f"{', '.join(n for n, c in registered().items() if c.mergeable)}).")
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
    for name in list(state.methods):
        state.methods[name].remove(model, name)
    for name, layer in list(iter_layers(model)):
        _replace(model, name, layer.base_layer)
    delattr(model, STATE_ATTR)
    drop_adapter_names(model)
    for param in model.parameters():
        # a plain model again, trainable as loaded; a quantised base's integer codes cannot be
        if param.is_floating_point():
            param.requires_grad_(True)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; wrappers left with no delta are replaced by their base module."""
    state = require_adapter(model, adapter_name)
    refuse_if_merged(model, "delete an adapter")
    _remove(model, adapter_name, state.methods[adapter_name])
    del state.methods[adapter_name]
    state.active = [n for n in state.active if n != adapter_name]
    if not state.methods:  # a plain model again, trainable as from_pretrained gives it
        delattr(model, STATE_ATTR)
        drop_adapter_names(model)
        model.requires_grad_(True)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, keyed by module path without the adapter name.

    e.g. ``bert.encoder.layer.0.attention.self.query.lora_A.weight`` or ``classifier.weight``.
    """
    method = require_adapter(model, adapter_name).methods[adapter_name]
    tensors = {}
    for name, _, delta in deltas_of(model, adapter_name):
        tensors.update({f"{name}.{k}": v for k, v in delta.stored_state().items()})
    tensors.update(method.extra_state(model, adapter_name))
    return tensors
