"""Hugging Face ``peft`` adapter directories, both ways, for every method that has a peft twin.

This module knows peft's file layout, not any method: each method's file translates its own
config fields and tensors in its codec (``Method.peft``, a ``PeftCodec``). What one format
cannot express is refused with a message, never dropped; config fields a newer peft added are
ignored with a warning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterFileError, warn_user
from ..core.method import config_from_dict, method_class, method_for, peft_codec

# Bookkeeping fields every peft config may carry (each codec lists its own in ignored).
_IGNORED = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
            "inference_mode", "task_type", "init_weights", "modules_to_save"}


class _Reads(dict):
    """A peft config that remembers which fields its reader looked at."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """A deltatune method config (plain data) from peft's ``adapter_config.json``."""
    reads = _Reads(data)
    codec = peft_codec(data.get("peft_type"))
    config = codec.config_from_peft(reads)
    config["modules_to_save"] = list(data.get("modules_to_save") or [])
    known = _IGNORED | reads.read | set(codec.ignored)
    extra = sorted(k for k in data if k not in known and data[k] not in (None, False, {}, []))
    if extra:
        warn_user(f"ignoring peft config fields deltatune does not know: {', '.join(extra)}")
    return config


def describe_peft(data: dict[str, Any]) -> dict[str, Any]:
    """The description of an adapter read from a peft directory (its layout and task type kept)."""
    return {"format": "peft", "config": config_from_peft(data), "peft_config": data,
            "base_model_name_or_path": data.get("base_model_name_or_path"),
            "fan_in_fan_out": bool(data.get("fan_in_fan_out"))}


def check_base(description: dict[str, Any], model: nn.Module) -> None:
    """Refuse, before the model changes, a peft adapter whose outputs deltatune would not reproduce."""
    codec = method_class(description["config"]["method"]).peft
    if codec is not None:
        codec.check_base(model)


def tensors_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft keys -> deltatune keys."""
    return peft_codec(peft_config.get("peft_type")).tensors_from_peft(tensors, peft_config)


def drop_unsaved_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """peft adds task-head names (``classifier``, ``score``) to ``modules_to_save`` whether or not the
    model has them, and skips the missing ones; keep only the entries the file holds tensors for."""
    def stored(entry: str) -> bool:
        return any(k.startswith(entry + ".") or f".{entry}." in k for k in tensors)

    entries = dict.fromkeys(config["modules_to_save"])  # peft may list one twice
    config["modules_to_save"] = [e for e in entries if stored(e)]


def to_peft(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(peft adapter_config.json, peft tensors) from a deltatune adapter."""
    config = description["config"]
    method = method_for(config_from_dict(config))
    codec = method.peft
    if codec is None:
        raise AdapterFileError(f"'{method.name}' adapters have no peft format that deltatune writes.",
                               "keep the deltatune format.")
    peft_config = {"peft_type": codec.peft_type,
                   "base_model_name_or_path": description.get("base_model_name_or_path"),
                   # Prompts need it to reach the model; for other tuners peft would add head
                   # modules to modules_to_save and then require their tensors.
                   "inference_mode": True,
                   "task_type": _prompt_task_type(description) if codec.prompt_learning else None,
                   "revision": None,
                   # Without a task_type, the class to load the base as (peft writes it so too):
                   # AutoPeftModel and `deltatune export` read it to build the model with its head.
                   "auto_mapping": None if codec.prompt_learning or not description.get("base_model_class")
                   else {"base_model_class": description["base_model_class"], "parent_library": "transformers"},
                   "modules_to_save": config.get("modules_to_save") or None,
                   **codec.peft_config(method.config, description, tensors)}
    return peft_config, codec.tensors_to_peft(tensors, peft_config)


TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}  # first match wins


def task_type(model_class: str | None) -> str | None:
    """peft's task type for a transformers model class (it picks how prompts reach the model)."""
    return next((t for suffix, t in TASK_TYPES.items() if (model_class or "").endswith(suffix)), None)


def _prompt_task_type(description: dict[str, Any]) -> str:
    """Without a task_type peft loads a prompt or prefix into a plain PeftModel, which ignores it."""
    kind = task_type(description.get("base_model_class")) or (description.get("peft_config") or {}).get("task_type")
    if kind is None:
        raise AdapterFileError(f"peft needs a task_type to apply a prompt or prefix, and deltatune knows none for "
                               f"the base model class '{description.get('base_model_class')}'.",
                               "save the adapter from a transformers model with a task head (e.g. "
                               "...ForCausalLM, ...ForSequenceClassification).")
    return kind
