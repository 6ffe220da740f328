"""The one wrapper type: a frozen base module plus one small delta module per adapter.

    out = post_n(... post_1(base(pre_n(... pre_1(x)))))

Every method that changes what a module computes (LoRA, IA3, bottleneck adapters, BitFit,
copies of whole modules) is a :class:`Delta` with a ``pre`` and/or ``post`` step. The wrapper
knows nothing about any method: it only runs the active, unmerged deltas in order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import quantized
from .errors import ConfigError, MergeError

BASE = "__base__"  # a row's adapter name for "no adapter": the bare base model


class Rows:
    """Which adapter each row of a batch runs (peft's ``adapter_names``): one name per row."""

    def __init__(self, names: list[str]):
        self.names = names
        self._groups: dict[tuple, dict[str, torch.Tensor]] = {}

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Adapter name -> the indices of its rows, for a module input with ``batch`` rows.

        ``batch`` may be a multiple of the names: ``generate`` repeats each row in place for its
        beams and returned sequences (``repeat_interleave``), and so does this.
        """
        key = (batch, device)
        if key not in self._groups:
            if batch % len(self.names):
                raise ConfigError(f"adapter_names names {len(self.names)} rows, and a module received "
                                  f"{batch}.", "pass one adapter name per row of the batch.")
            per_name = batch // len(self.names)
            found: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                found.setdefault(name, []).extend(range(i * per_name, (i + 1) * per_name))
            self._groups[key] = {n: torch.tensor(rows, device=device) for n, rows in found.items() if n != BASE}
        return self._groups[key]


@dataclass
class AdapterState:
    """What one model's adapters are and which of them run. Shared by all its wrappers and hooks."""

    #: adapter name -> its Method (built once, when the adapter is added), holding its config
    methods: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    rows: Rows | None = None  # set inside deltatune.mixed_batch: each row runs its own adapter

    @property
    def configs(self) -> dict[str, Any]:
        """Adapter name -> its MethodConfig, as applied (read-only: a new dict each time)."""
        return {name: method.config for name, method in self.methods.items()}


class Delta(nn.Module):
    """One adapter's change to one module. Override ``pre`` and/or ``post``."""

    #: True when this delta runs its own module instead of the base (a trainable copy).
    replaces_base: bool = False
    #: True when merging needs the base weight as no other delta left it (DoRA divides by the
    #: norm of W0 plus its update): such a delta merges first on its module or not at all.
    merges_on_original: bool = False

    def pre(self, args: tuple) -> tuple:
        """Transform the positional inputs before the base module runs."""
        return args

    @property
    def changes_input(self) -> bool:
        """True when ``pre`` changes what the base module sees (a per-row batch then runs this
        delta's rows through the base module apart)."""
        return type(self).pre is not Delta.pre

    @classmethod
    def post_rows(cls, deltas: list[Delta], rows: list[torch.Tensor], args: tuple, out: torch.Tensor) -> torch.Tensor:
        """``post`` for a batch whose rows ``rows[i]`` belong to ``deltas[i]`` (the other rows
        keep ``out``). This default runs each delta on its rows; methods override it to run all
        of them at once."""
        for delta, index in zip(deltas, rows):
            out = out.index_copy(0, index, delta.post(rows_of(args, index, len(out)), out[index]))
        return out

    def post(self, args: tuple, out: Any) -> Any:
        """Transform the base module's output; ``args`` are the original inputs."""
        return out

    def merge(self, base: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be folded into the base weights.")

    def unmerge(self, base: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be folded into the base weights.")

    def changed_numel(self, base: nn.Module) -> int:
        """How many base parameters differ from the original once this delta is merged."""
        return 0

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this delta, by key relative to the wrapped module."""
        return dict(self.named_parameters())

    def factor_roles(self) -> dict[str, str]:
        """The factors of a product B A that an optimizer treats apart, by parameter name relative
        to this delta: ``"B"``, the output-side matrix that LoRA+ trains ``loraplus_lr_ratio``
        times faster than A, or ``"embedding"``, a factor of an embedding's update, which LoRA+
        trains at a rate of its own. Parameters not named keep the base learning rate."""
        return {}

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            own = self.stored_state()
            for key, value in tensors.items():
                own[key].copy_(value)


def joined(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All the rows of ``rows`` in one index, and for each which entry of ``rows`` it came from."""
    owner = torch.cat([torch.full_like(index, i) for i, index in enumerate(rows)])
    return torch.cat(rows), owner


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows, d) values shaped to broadcast over a (rows, ..., d) tensor ``like``."""
    return values.view(len(values), *[1] * (like.dim() - 2), values.shape[-1])


def rows_of(args: tuple, index: torch.Tensor, batch: int) -> tuple:
    """The given rows of every positional tensor that has a row per batch entry."""
    return tuple(a[index] if isinstance(a, torch.Tensor) and a.dim() and len(a) == batch else a for a in args)


class ModuleCopy(Delta):
    """A trainable copy of the whole module that runs instead of the frozen original.

    Used for ``modules_to_save`` (task heads) and for layer tuning. Stored under the
    module's own keys (``classifier.weight``), so the file looks like the module itself.
    """

    replaces_base = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.copy = copy.deepcopy(base)
        self._backup: dict[str, torch.Tensor] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.copy(*args, **kwargs)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return dict(self.copy.named_parameters())

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            self._backup = {k: v.detach().clone() for k, v in base.named_parameters()}
            for key, value in self.copy.named_parameters():
                base.get_parameter(key).copy_(value)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for key, value in (self._backup or {}).items():
                base.get_parameter(key).copy_(value)
        self._backup = None

    def changed_numel(self, base: nn.Module) -> int:
        return sum(p.numel() for p in base.parameters())


class DeltaLayer(nn.Module):
    """A base module and the deltas of every adapter that targets it."""

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.merged: list[str] = []
        self._adapter_state = state
        self._codes: Any = None  # a quantised base's codes while merged: unmerging restores them exactly

    def add_delta(self, adapter_name: str, delta: Delta) -> None:
        self.deltas[adapter_name] = delta

    def active_deltas(self) -> list[Delta]:
        state = self._adapter_state
        if state.disabled or state.rows is not None:
            return []
        return [self.deltas[n] for n in state.active if n in self.deltas and n not in self.merged]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = self._adapter_state.rows
        if rows is not None and not self._adapter_state.disabled:
            return self._forward_rows(rows, args, kwargs)
        deltas = self.active_deltas()
        if not deltas:
            return self.base_layer(*args, **kwargs)
        inputs = args
        for delta in deltas:
            args = delta.pre(args)
        runner = next((d for d in reversed(deltas) if d.replaces_base), self.base_layer)
        out = runner(*args, **kwargs)
        for delta in deltas:
            out = delta.post(inputs, out)
        return out

    def _forward_rows(self, rows: Rows, args: tuple, kwargs: dict) -> Any:
        """Each row through its own adapter's delta (rows of adapters without one here: the base).

        The base module runs once for the whole batch; deltas that only add to or scale its
        output then run together, kind by kind (``post_rows``); deltas that change its input or
        replace it run on their own rows.
        """
        out = self.base_layer(*args, **kwargs)
        groups = {n: index for n, index in rows.groups(len(out), out.device).items() if n in self.deltas}
        apart = {n: index for n, index in groups.items()
                 if self.deltas[n].changes_input or self.deltas[n].replaces_base}
        by_kind: dict[type, dict[str, torch.Tensor]] = {}
        for name, index in groups.items():
            if name not in apart:
                by_kind.setdefault(type(self.deltas[name]), {})[name] = index
        for kind, members in by_kind.items():
            out = kind.post_rows([self.deltas[n] for n in members], list(members.values()), args, out)
        for name, index in apart.items():
            alone = self._run_alone(self.deltas[name], rows_of(args, index, len(out)), kwargs)
            if alone.shape[1:] != out.shape[1:]:
                raise ConfigError(f"adapter '{name}' gives outputs shaped {tuple(alone.shape[1:])} where the "
                                  f"other rows' are {tuple(out.shape[1:])} (a task head of another size).",
                                  "put adapters with different heads in separate batches.")
            out = out.index_copy(0, index, alone.to(out.dtype))
        return out

    def _run_alone(self, delta: Delta, args: tuple, kwargs: dict) -> Any:
        out = (delta if delta.replaces_base else self.base_layer)(*delta.pre(args), **kwargs)
        return delta.post(args, out)

    def merge(self, adapter_name: str) -> None:
        if self.merged and self.deltas[adapter_name].merges_on_original:
            raise MergeError(f"adapter '{adapter_name}' rescales the original weight, which '{self.merged[-1]}' "
                             "has already changed by merging first.",
                             f"make '{adapter_name}' the first active adapter, or merge it alone.")
        if not self.merged:
            self._codes = quantized.snapshot(self.base_layer)
        with quantized.weight_in_float(self.base_layer):  # a quantised weight: dequantised, merged, quantised again
            self.deltas[adapter_name].merge(self.base_layer)
        self.merged.append(adapter_name)

    def unmerge(self) -> None:
        """Undo merges in reverse order, so stacked merges restore the base exactly; a quantised
        base gets its original codes back (the deltas still unmerge, for what they changed beside)."""
        if not self.merged and self._codes is None:
            return
        with quantized.weight_in_float(self.base_layer, requantize_after=self._codes is None):
            while self.merged:
                self.deltas[self.merged.pop()].unmerge(self.base_layer)
        if self._codes is not None:
            quantized.restore(self.base_layer, self._codes)
            self._codes = None

    def __getattr__(self, name: str) -> Any:
        # Code around the wrapper (e.g. `attn.query.weight`, `embeddings.word_embeddings.weight`)
        # keeps working: unknown attributes are read from the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
