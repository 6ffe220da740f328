"""The method interface: a validated config dataclass plus a few hooks, found by name.

A method is registered with :func:`register` under its name (``lora``, ``adapter``, ...), so
``method: lora`` in YAML and ``LoraConfig(...)`` in Python reach the same code. Most methods
attach :class:`~deltatune.core.layer.Delta` modules to wrapped base modules and override only
``inject``; the defaults below then give saving, loading, merging and accounting for free.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .errors import ConfigError
from .layer import AdapterState, Delta, DeltaLayer
from .targets import ALL_LINEAR, resolve_targets

FAMILIES = ("additive", "selective", "re-parameterisation", "full")


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation beside it (shown by ``deltatune methods``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses set ``method`` and add validated fields."""

    method: ClassVar[str] = ""

    modules_to_save: list[str] = help_field(
        [], "Modules (same matching rules as target_modules) trained in full and saved with the "
            "adapter, e.g. the task head ['classifier'].")

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def validate(self) -> None:
        """Check values; raise ConfigError naming the field, the value and what is allowed."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not type_ok(value, hints[f.name]):
                raise ConfigError(f"{self.method}.{f.name} = {value!r} has the wrong type.",
                                  f"expected {type_name(hints[f.name])}.")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "method") -> "MethodConfig":
        """Build from plain data; unknown keys are errors that list the known ones."""
        values = {k: v for k, v in values.items() if k != "method"}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown key '{where}.{unknown[0]}' for method '{cls.method}'.",
                              f"allowed keys: {', '.join(known)}.")
        return cls(**values)


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):  # int, not "<class 'int'>"
        return tp.__name__
    return str(tp).replace("typing.", "")


class Method:
    """How one PEFT method adapts a model. One instance per config; methods keep no other state.

    Class attributes describe the method for users and for the training loop, which never
    asks which method it runs.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    family: ClassVar[str]
    mergeable: ClassVar[bool] = False
    #: True when training changes the base weights themselves (nothing to switch back to).
    in_place: ClassVar[bool] = False
    #: the trainable-parameter count, as a formula (shown by ``deltatune methods``).
    count_formula: ClassVar[str] = ""
    #: a learning rate that suits the method with AdamW (used by ``compare`` unless overridden).
    default_learning_rate: ClassVar[float] = 1e-3
    #: the log-spaced learning rates ``compare`` searches (successive halving on validation data);
    #: empty: ``compare`` trains at ``default_learning_rate`` alone.
    learning_rates: ClassVar[tuple[float, ...]] = ()
    #: why merging is impossible, for non-mergeable methods.
    merge_refusal: ClassVar[str] = "it adds computation that no base weight can hold"

    def __init__(self, config: MethodConfig):
        self.config = config

    def plan(self, model: nn.Module) -> Any:
        """Check the config against the model and return what ``inject`` needs.

        Runs before anything changes, so every error leaves the model untouched.
        """
        return None

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: Any) -> None:
        """Add this adapter's modules to the model (in place)."""
        raise NotImplementedError(f"{type(self).__name__}.inject")

    def extra_trainable(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """Base parameters this adapter trains in place (e.g. LoRA's bias='all'), by name."""
        return {}

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Stored tensors beyond the deltas' own, by file key."""
        return {}

    def not_stored(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """Trainable parameters that the adapter file does not hold (training-only parts)."""
        return {}

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        """Undo anything ``inject`` did beyond adding deltas (hooks, root modules)."""


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method reachable by its name and its config class."""
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    cls.config_class.method = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        raise ConfigError(f"unknown method '{name}'.", (f"did you mean '{close[0]}'? " if close else "")
                          + f"choose one of: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def method_for(config: MethodConfig) -> Method:
    return method_class(config.method)(config)


def config_from_dict(values: dict[str, Any], where: str = "method") -> MethodConfig:
    """Build a method config from plain data (YAML, JSON): ``{"method": "lora", "r": 8, ...}``."""
    if not isinstance(values, dict) or "method" not in values:
        raise ConfigError(f"'{where}' needs a 'method' key.", f"e.g. method: lora (one of {', '.join(sorted(_REGISTRY))}).")
    return method_class(values["method"]).config_class.from_dict(values, where)


def iter_layers(model: nn.Module):
    """Yield (name, wrapper) for every deltatune wrapper in the model, named as the module it wraps."""
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            yield name, module


def deltas_of(model: nn.Module, adapter_name: str):
    """Yield (module name, wrapper, delta) for one adapter."""
    for name, layer in iter_layers(model):
        if adapter_name in layer.deltas:
            yield name, layer, layer.deltas[adapter_name]


def wrap(model: nn.Module, name: str, state: AdapterState) -> DeltaLayer:
    """Replace the module at ``name`` with a wrapper around it (or return the wrapper already there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    module = getattr(parent, child)
    if isinstance(module, DeltaLayer):
        return module
    layer = DeltaLayer(module, state)
    setattr(parent, child, layer)
    return layer


def add_deltas(model: nn.Module, names: list[str], adapter_name: str, state: AdapterState,
               make_delta: typing.Callable[[nn.Module, str], Delta]) -> None:
    """Wrap each named module and attach ``make_delta(base_module, name)`` for the adapter."""
    for name in names:
        layer = wrap(model, name, state)
        delta = make_delta(layer.base_layer, name)
        ref = next(layer.base_layer.parameters(), None)
        if ref is not None:
            delta.to(device=ref.device)
        delta.train(layer.base_layer.training)  # a new module must not turn dropout on in an eval model
        layer.add_delta(adapter_name, delta)


def check_not_nested(model: nn.Module, names: list[str]) -> None:
    """Refuse targets inside or around another wrapper: a module is wrapped once, at one level."""
    wrapped = [n for n, _ in iter_layers(model)]
    for name in names:
        for other in wrapped:
            if other != name and (name.startswith(other + ".") or other.startswith(name + ".")):
                raise ConfigError(f"'{name}' overlaps '{other}', which another adapter already wraps.",
                                  "adapters may share a module but not nest: target other modules "
                                  "or delete_adapter() the other adapter first.")


def check_not_saved(model: nn.Module, names: list[str], config: MethodConfig) -> list[str]:
    """Return ``names`` less those that are, contain or sit inside a module of
    ``config.modules_to_save``; an explicit target that does is refused.

    A trained copy runs instead of its original, so an adapter inside it would never run and
    one around it would nest two wrappers. ``"all-linear"`` simply skips such modules, as it
    skips the output head. Checked in ``plan``, before anything changes.
    """
    if not config.modules_to_save:
        return names
    saved = resolve_targets(model, config.modules_to_save, (nn.Module,), config.method,
                            field_name="modules_to_save")
    broad = getattr(config, "target_modules", None) in (ALL_LINEAR, [ALL_LINEAR])
    kept = []
    for name in names:
        clash = next((s for s in saved if s == name or name.startswith(s + ".")
                      or s.startswith(name + ".")), None)
        if clash and not broad:
            raise ConfigError(f"'{name}' is a {config.method} target and overlaps '{clash}' in "
                              "modules_to_save.", "a module is either adapted or trained in full, not both.")
        if not clash:
            kept.append(name)
    return kept


def release_hooks(model: nn.Module, attr: str, adapter_name: str) -> None:
    """Hooks that one method's adapters share on a model (kept at ``model.<attr>``, with a
    ``users`` set and a ``remove()``): the last adapter to leave removes them."""
    hooks = getattr(model, attr, None)
    if hooks is None:
        return
    hooks.users.discard(adapter_name)
    if not hooks.users:
        hooks.remove()
        delattr(model, attr)
