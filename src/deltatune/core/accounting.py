"""Honest parameter accounting: what trains, what the saved file holds, what changes.

- ``total``: every parameter in the model as it now is (base, adapters, copies of heads), as values:
  a quantised weight counts the values it holds, not its packed storage elements.
- ``trainable``: parameters with ``requires_grad``.
- ``stored``: what ``save_adapter`` writes (adapter tensors plus ``modules_to_save``).
- ``not_stored``: trained but not in the file (e.g. prefix tuning's re-parameterisation MLP).
- ``changed``: base parameters that differ from the original once merged (d x k per merged
  LoRA layer): the third count the PEFT literature asks for.
- ``method_figures``: what the method adds about itself (the ranks AdaLoRA kept).
- ``quantized`` / ``quantized_bytes``: values the base holds quantised, and the bytes they take
  in memory with their scales (0 for a base in full precision).
- ``frozen_bytes``: what every frozen parameter takes in memory as it is held (bf16, fp32, or
  quantised with its scales): the base's weights.
- ``regenerable``: frozen tensors the adapter needs that its config rebuilds exactly (VeRA's
  random projections, from a seed); in ``stored`` too when the file also holds them. Not
  parameters, so not in ``total``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .method import deltas_of
from .quantized import is_quantized, quantized_tensors, values_held
from .verbs import adapter_state, adapter_state_dict, require_state, trainable_parameters


@dataclass
class ParameterReport:
    total: int
    trainable: int
    stored: int
    not_stored: int
    changed: int
    stored_bytes: int
    per_module: dict[str, dict[str, int]] = field(default_factory=dict)
    regenerable: int = 0
    method_figures: dict[str, Any] = field(default_factory=dict)
    quantized: int = 0
    quantized_bytes: int = 0
    frozen_bytes: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def stored_percent(self) -> float:
        return 100.0 * self.stored / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(trainable_percent=self.trainable_percent, stored_percent=self.stored_percent)
        return data

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f}\n"
                f"stored params: {self.stored:,} ({_size(self.stored_bytes)}) || "
                f"trained, not stored: {self.not_stored:,} || changed params: {self.changed:,}"
                + (f" || regenerable from the config: {self.regenerable:,}" if self.regenerable else "")
                + (f"\nfrozen weights in memory: {_size(self.frozen_bytes)}" if self.frozen_bytes else "")
                + (f" || quantised: {self.quantized:,} values in {_size(self.quantized_bytes)} "
                   f"({8 * self.quantized_bytes / self.quantized:.2f} bits each, scales included)" if self.quantized else "")
                + "".join(f"\n{name.replace('_', ' ')}: {value:,}" for name, value in self.method_figures.items()
                          if isinstance(value, int)))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parameter_report(model: nn.Module, adapter_name: str | None = None) -> ParameterReport:
    """Count the parameters of ``model`` and of one adapter (default: the first active one).

    A model without adapters reports everything trainable and stored, as full fine-tuning would.
    """
    params = dict(model.named_parameters())
    total = sum(values_held(p) for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    state = adapter_state(model)
    quantized = _quantized_layers(model)
    codes = {t.data_ptr(): t for m in quantized for t in quantized_tensors(m)}
    floats = {t.data_ptr(): t for t in map(_held_here, params.values()) if not t.requires_grad and not is_quantized(t)}
    held = {"quantized": sum(values_held(m.weight) for m in quantized), "quantized_bytes": _bytes(codes.values()),
            "frozen_bytes": _bytes(codes.values()) + _bytes(floats.values())}
    if state is None or not state.methods:
        nbytes = sum(p.numel() * p.element_size() for p in params.values())
        return ParameterReport(total, trainable, total, 0, total, nbytes, **held)
    name = adapter_name or (state.active[0] if state.active else next(iter(state.methods)))
    require_state(model)
    stored = adapter_state_dict(model, name)
    method = state.methods[name]
    not_stored = method.not_stored(model, name)
    changed = sum(delta.changed_numel(layer.base_layer) for _, layer, delta in deltas_of(model, name))
    changed += sum(p.numel() for p in method.extra_trainable(model, name).values())
    return ParameterReport(
        total=total,
        trainable=trainable,
        stored=sum(t.numel() for t in stored.values()),
        not_stored=sum(p.numel() for p in not_stored.values()),
        changed=changed,
        stored_bytes=sum(t.numel() * t.element_size() for t in stored.values()),
        per_module=_per_module(trainable_parameters(model, name), stored),
        regenerable=sum(t.numel() for t in method.regenerable(model, name).values()),
        method_figures=method.report_figures(model, name),
        **held,
    )


def _held_here(tensor: nn.Parameter) -> Any:
    """What this process holds of a parameter: all of it, or its shard (training.distributed: fsdp)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose own weight is stored quantised."""
    return [m for m in model.modules()
            if m._parameters.get("weight") is not None and is_quantized(m._parameters["weight"])]


def _per_module(trainable: dict[str, nn.Parameter], stored: dict) -> dict[str, dict[str, int]]:
    """Trainable and stored counts per module, by the module's own name: a wrapped module's
    deltas (``.deltas.``) and its trained base bias (``.base_layer.bias``) count as the module."""
    rows: dict[str, dict[str, int]] = {}
    for key, param in trainable.items():
        module = key.split(".deltas.")[0] if ".deltas." in key else key.rpartition(".")[0].removesuffix(".base_layer")
        rows.setdefault(module, {"trainable": 0, "stored": 0})["trainable"] += param.numel()
    for key, tensor in stored.items():
        module = max((m for m in rows if key.startswith(m + ".")), key=len, default=key.rpartition(".")[0])
        rows.setdefault(module, {"trainable": 0, "stored": 0})["stored"] += tensor.numel()
    return rows
