"""What every method's peft translation shares: key prefixes and the readers' small helpers.

peft's keys are ours with ``base_model.model.`` in front (its tuner wraps the model); for
prompt learning the transformers model is peft's base model itself, so ``base_model.`` only.
Each method's file translates its own config fields and tensors with these.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AdapterFileError

TUNER_PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."


def targets_from_peft(value: Any) -> Any:
    """peft: a string is one regex over whole names ("all-linear" aside); a list is names/suffixes."""
    if isinstance(value, str) and value != "all-linear":
        return [f"re:{value}"]
    return value


def modules_with(tensors: dict[str, torch.Tensor], *markers: str) -> list[str]:
    """The adapted modules by full name (peft matches full names exactly, so no rule differs)."""
    return sorted({k.rsplit(f".{m}", 1)[0] for k in tensors for m in markers if f".{m}" in k})


def refuse_unsupported(peft_config: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse peft fields with a meaning deltatune does not implement unless they hold their default."""
    for field, default in defaults.items():
        if peft_config.get(field) not in (default, None, {}, False):
            raise AdapterFileError(f"this peft adapter sets {field}={peft_config[field]!r}, which deltatune "
                                   "does not implement; loading it without would change its outputs.",
                                   f"retrain without {field}, or use peft for this adapter.")
