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

from .errors import MergeError


@dataclass
class AdapterState:
    """What one model's adapters are and which of them run. Shared by all its wrappers and hooks."""

    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> MethodConfig
    active: list[str] = field(default_factory=list)
    disabled: bool = False


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

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            own = self.stored_state()
            for key, value in tensors.items():
                own[key].copy_(value)


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

    def __init__(self, base_layer: nn.Module, state: AdapterState | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.merged: list[str] = []
        self._adapter_state = state if state is not None else AdapterState(active=["default"])

    def add_delta(self, adapter_name: str, delta: Delta) -> None:
        self.deltas[adapter_name] = delta

    def active_deltas(self) -> list[Delta]:
        state = self._adapter_state
        if state.disabled:
            return []
        return [self.deltas[n] for n in state.active if n in self.deltas and n not in self.merged]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
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

    def merge(self, adapter_name: str = "default") -> None:
        if adapter_name in self.merged:
            raise MergeError(f"adapter '{adapter_name}' is already merged.", "call unmerge() first.")
        if self.merged and self.deltas[adapter_name].merges_on_original:
            raise MergeError(f"adapter '{adapter_name}' rescales the original weight, which '{self.merged[-1]}' "
                             "has already changed by merging first.",
                             f"make '{adapter_name}' the first active adapter, or merge it alone.")
        self.deltas[adapter_name].merge(self.base_layer)
        self.merged.append(adapter_name)

    def unmerge(self) -> None:
        """Undo merges in reverse order, so stacked merges restore the base exactly."""
        while self.merged:
            self.deltas[self.merged.pop()].unmerge(self.base_layer)

    def __getattr__(self, name: str) -> Any:
        # Code around the wrapper (e.g. `attn.query.weight`, `embeddings.word_embeddings.weight`)
        # keeps working: unknown attributes are read from the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
