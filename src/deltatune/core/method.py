"""The method interface: a validated config dataclass plus a few hooks, found by name.

A method is registered with :func:`register` under its name (``lora``, ``adapter``, ...), so
``method: lora`` in YAML and ``LoraConfig(...)`` in Python reach the same code. Most methods
attach :class:`~deltatune.core.layer.Delta` modules to wrapped base modules and override only
``inject``; the defaults below then give saving, loading, merging and accounting for free.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError
from .fields import check_fields, help_field
from .layer import AdapterState, Delta, DeltaLayer
from .peft_keys import TUNER_PREFIX
from .targets import resolve_targets

FAMILIES = ("additive", "selective", "re-parameterisation", "full")


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses set ``method`` and add validated fields."""

    method: ClassVar[str] = ""

    modules_to_save: list[str] = help_field(
        [], "Modules (same matching rules as target_modules) trained in full and saved with the "
            "adapter, e.g. the task head ['classifier'].")

    def __post_init__(self) -> None:
        check_fields(self, self.method)
        self.validate()

    def validate(self) -> None:
        """Check what types and ranges cannot (fields together); raise ConfigError naming the
        field, the value and what is allowed."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def variant(self) -> str:
        """The name ``compare`` gives this config's runs: the method's, or one that tells an option
        that makes another method apart (LoRA with ``use_dora`` is ``dora``)."""
        return self.method

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


@dataclass(frozen=True)
class Tuning:
    """A method's learning rates with AdamW: what ``compare`` searches and trains at."""

    #: the rate that suits the method (``compare`` without a search, and a search's fallback)
    default_learning_rate: float = 1e-3
    #: the log-spaced rates ``compare`` searches by successive halving on validation data;
    #: empty: ``compare`` trains at ``default_learning_rate`` alone
    learning_rates: tuple[float, ...] = ()
    #: True when the update is a product B A whose factors the deltas name (``Delta.factor_roles``):
    #: LoRA+ (``training.loraplus_lr_ratio``) then trains B faster than A
    factored: bool = False


class TrainingHooks:
    """A method's part in the training loop, for methods that change while they train (a rank
    budget reallocated by importance, a regulariser). ``Method.training_hooks`` returns one per
    adapter; the loop calls it for the adapter that trains and never asks which method it is.
    The defaults do nothing."""

    def start(self, total_steps: int) -> None:
        """Called once before training with the run's number of optimizer steps; raise ConfigError
        where the run does not fit the method (a schedule longer than the run)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the task's loss at every forward pass (after the model ran), or None."""
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``, before the gradients
        are cleared: they are still there to read."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What ``after_step`` accumulated (running estimates, schedules), saved with each
        checkpoint so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


class PeftCodec:
    """How one method's adapter files translate to and from Hugging Face peft's format: its
    config fields and tensor keys. The method's file defines one; ``io/peft_format`` knows
    peft's directory layout and asks the codec for everything about the method."""

    #: ``peft_type`` in peft's adapter_config.json
    peft_type: ClassVar[str] = ""
    #: peft's prompt learning: its config has a task type (and the method maps its own keys).
    prompt_learning: ClassVar[bool] = False
    #: peft config fields that mean nothing for loading here (settings deltatune detects itself).
    ignored: ClassVar[tuple[str, ...]] = ()

    def config_from_peft(self, peft_config: dict[str, Any]) -> dict[str, Any]:
        """The method's config, as plain data, from peft's ``adapter_config.json``."""
        raise NotImplementedError(f"{type(self).__name__}.config_from_peft")

    def peft_config(self, config: Any, description: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """peft's method-specific config fields for an adapter file saved with ``config``."""
        raise NotImplementedError(f"{type(self).__name__}.peft_config")

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Our file's tensors under peft's keys, for the ``adapter_config.json`` written beside them."""
        return {TUNER_PREFIX + k: v for k, v in tensors.items()}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor],
                          peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """peft's tensors under our keys."""
        return {k.removeprefix(TUNER_PREFIX): v for k, v in tensors.items()}

    def check_base(self, model: nn.Module) -> None:
        """Refuse, before the model changes, a peft adapter whose outputs we would not reproduce here."""


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
    #: what a comparison or a search needs to train this method at its best (its learning rates)
    tuning: ClassVar[Tuning] = Tuning()
    #: why merging is impossible, for non-mergeable methods.
    merge_refusal: ClassVar[str] = "it adds computation that no base weight can hold"
    #: why it cannot train with its parameters sharded across processes (training.distributed:
    #: fsdp); "": it can.
    shard_refusal: ClassVar[str] = ""
    def __init__(self, config: MethodConfig):
        self.config = config

    def plan(self, model: nn.Module) -> Any:
        """Check the config against the model and return what ``inject`` needs: the names of
        the modules it will wrap, as a list or as the keys of a dict (name -> what goes there).

        Runs before anything changes, so every error leaves the model untouched. The engine
        then checks those modules against ``modules_to_save`` and other adapters' wrappers.
        """
        return None

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: Any) -> None:
        """Add this adapter's modules to the model (in place)."""
        raise NotImplementedError(f"{type(self).__name__}.inject")

    def targets(self, model: nn.Module, entries: str | list[str], supported: tuple[type, ...],
                field_name: str = "target_modules", linear_types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
        """``resolve_targets`` for this method: ``"all-linear"`` leaves out the modules trained in full."""
        return resolve_targets(model, entries, supported, self.name, field_name, linear_types,
                               exclude=self.saved_modules(model))

    def saved_modules(self, model: nn.Module) -> list[str]:
        """The modules ``modules_to_save`` selects (trained in full), outermost first."""
        if not self.config.modules_to_save or self.in_place:
            return []
        names = resolve_targets(model, self.config.modules_to_save, (nn.Module,), self.name,
                                field_name="modules_to_save")
        return [n for n in names if not any(n.startswith(o + ".") for o in names)]

    def extra_trainable(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """Base parameters this adapter trains in place (e.g. LoRA's bias='all'), by name."""
        return {}

    def row_refusal(self) -> str:
        """Why this adapter cannot share a batch (``mixed_batch``), or a served model, with other
        adapters; "": each row can run its own adapter. A method whose adapters may train base
        parameters in place (``extra_trainable``) says so here."""
        return ""

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Stored tensors beyond the deltas' own, by file key."""
        return {}

    def saved_config(self, model: nn.Module, adapter_name: str) -> MethodConfig:
        """The config an adapter file records: the one applied, unless the deltas store themselves
        as a plainer adapter with the same outputs (PiSSA as a plain rank-2r LoRA) or training
        decided their shapes (the ranks AdaLoRA kept)."""
        return self.config

    def report_figures(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        """Figures about this adapter beyond the parameter counts, for the parameter report (the
        ranks AdaLoRA kept); plain JSON data."""
        return {}

    def not_stored(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Trainable parameters (or parts of them) that the adapter file does not hold (training-only
        parts, AdaLoRA's cut triplets)."""
        return {}

    def regenerable(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Frozen tensors the adapter needs that its config rebuilds exactly (e.g. from a seed), by
        file key; the file holds them only where ``extra_state`` returns them too."""
        return {}

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        """Undo anything ``inject`` did beyond adding deltas (hooks, root modules)."""

    def training_hooks(self, model: nn.Module, adapter_name: str) -> TrainingHooks | None:
        """What the training loop calls besides the optimizer while this adapter trains (None:
        nothing; most methods are fixed functions of their parameters)."""
        return None

    #: the ways ``combine_adapters`` combines this method's adapters (core/combine.py's names);
    #: empty: they cannot be combined
    combinations: ClassVar[tuple[str, ...]] = ()

    def combine_refusal(self, how: str) -> str:
        """Why this adapter cannot be combined ``how`` (""; it can)."""
        if how in self.combinations:
            return ""
        return "deltatune does not combine this method's adapters" if not self.combinations else \
            f"its adapters combine with how = {', '.join(self.combinations)} only"

    def combine(self, model: nn.Module, sources: dict[str, tuple["Method", float]],
                combination: Any) -> tuple[MethodConfig, dict[str, dict[str, torch.Tensor]]]:
        """The adapters named in ``sources`` (name -> (their method, weight)) combined as
        ``combination`` (core.combine.Combination) says: the new adapter's config, and each wrapped
        module's stored tensors (``Delta.stored_state``'s keys) by module name."""
        raise NotImplementedError(f"{type(self).__name__}.combine")

    #: how its adapter files read and write in Hugging Face peft's format; None: peft has none.
    peft: ClassVar[PeftCodec | None] = None


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method reachable by its name and its config class.

    Raises:
        ValueError: an unknown family, or another class already registered under the name.
    """
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ + other.__module__ != cls.__qualname__ + cls.__module__:
        raise ValueError(f"method name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}; "
                         f"give {cls.__module__}.{cls.__qualname__} another name.")
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


def peft_codec(peft_type: Any) -> PeftCodec:
    """The codec that reads peft adapters of ``peft_type``."""
    readers = {cls.peft.peft_type: cls.peft for cls in _REGISTRY.values() if cls.peft}
    if peft_type not in readers:
        raise AdapterFileError(f"peft adapters of type '{peft_type}' cannot be read by deltatune.",
                               f"supported peft types: {', '.join(readers)}.")
    return readers[peft_type]


def config_from_dict(values: dict[str, Any], where: str = "method") -> MethodConfig:
    """Build a method config from plain data (YAML, JSON): ``{"method": "lora", "r": 8, ...}``."""
    if not isinstance(values, dict) or "method" not in values:
        raise ConfigError(f"'{where}' needs a 'method' key.", f"one of: {', '.join(sorted(registered()))}.")
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
