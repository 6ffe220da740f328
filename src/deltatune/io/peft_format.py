"""Hugging Face ``peft`` adapter directories, both ways, for LoRA, IA3 and prompt tuning.

peft's keys are ours with ``base_model.model.`` in front, and LoRA biases of adapted layers
sit under ``base_layer``: ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
``modules_to_save`` are stored under the module's own path, as ours are. What one format cannot
express is refused with a message, never dropped; config fields a newer peft added are ignored
with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.errors import AdapterFileError

PREFIX = "base_model.model."  # LoRA, IA3: peft's tuner model wraps the transformers model
PROMPT_PREFIX = "base_model."  # prompt learning: the transformers model is the base model itself
#: a key the loader matches by suffix against the model's own keys (the prompt's module varies).
ANY_MODULE = "*."

# Fields with a meaning deltatune does not implement: refused unless they hold their default.
_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                "layers_pattern": None, "lora_bias": False, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None, "exclude_modules": None,
                "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None}
# Fields that carry no meaning for loading (bookkeeping, or settings deltatune detects itself).
_IGNORED = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
            "inference_mode", "task_type", "fan_in_fan_out", "init_lora_weights", "init_ia3_weights",
            "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
            "qalora_group_size", "ensure_weight_tying", "arrow_config", "kasa_config",
            "lora_ga_config", "monteclora_config", "velora_config", "num_transformer_submodules",
            "num_attention_heads", "num_layers", "token_dim", "tokenizer_name_or_path",
            "tokenizer_kwargs", "prompt_tuning_init"}


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """A deltatune method config (plain data) from peft's ``adapter_config.json``."""
    kind = data.get("peft_type")
    readers = {"LORA": _lora_from_peft, "IA3": _ia3_from_peft, "PROMPT_TUNING": _prompt_from_peft}
    if kind not in readers:
        raise AdapterFileError(f"peft adapters of type '{kind}' cannot be read by deltatune.",
                               f"supported peft types: {', '.join(readers)}.")
    for field, default in _UNSUPPORTED.items():
        if data.get(field, default) not in (default, None, {}, False):
            raise AdapterFileError(f"this peft adapter sets {field}={data[field]!r}, which deltatune "
                                   "does not implement; loading it without would change its outputs.",
                                   f"retrain without {field}, or use peft for this adapter.")
    config = readers[kind](data)
    known = set(_UNSUPPORTED) | _IGNORED | set(config) | {"target_modules", "modules_to_save", "feedforward_modules",
                                                          "prompt_tuning_init_text"}
    extra = sorted(k for k in data if k not in known and data[k] not in (None, False, {}, []))
    if extra:
        warnings.warn(f"ignoring peft config fields deltatune does not know: {', '.join(extra)}", stacklevel=3)
    return config


def _targets(value: Any) -> Any:
    """peft: a string is one regex over whole names ("all-linear" aside); a list is names/suffixes."""
    if isinstance(value, str) and value != "all-linear":
        return [f"re:{value}"]
    return value


def _lora_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    return {"method": "lora", "r": data["r"], "lora_alpha": data["lora_alpha"],
            "lora_dropout": data.get("lora_dropout", 0.0), "target_modules": _targets(data["target_modules"]),
            "bias": data.get("bias", "none"), "use_rslora": data.get("use_rslora", False),
            "init": "gaussian" if data.get("init_lora_weights") == "gaussian" else "kaiming",
            "modules_to_save": list(data.get("modules_to_save") or [])}


def _ia3_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    return {"method": "ia3", "target_modules": _targets(data["target_modules"]),
            "feedforward_modules": _targets(data.get("feedforward_modules") or []),
            "modules_to_save": list(data.get("modules_to_save") or [])}


def _prompt_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    if (data.get("num_transformer_submodules") or 1) != 1:
        raise AdapterFileError("this peft prompt has prompts for an encoder and a decoder; deltatune "
                               "prompts the encoder only.", "use peft for encoder-decoder prompts.")
    return {"method": "prompt", "num_virtual_tokens": data["num_virtual_tokens"],
            "modules_to_save": list(data.get("modules_to_save") or [])}


def tensors_from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys -> deltatune keys."""
    native = {}
    for key, value in tensors.items():
        if key == "prompt_embeddings":
            native[ANY_MODULE + "prompt"] = value
            continue
        key = key.removeprefix(PREFIX) if key.startswith(PREFIX) else key.removeprefix(PROMPT_PREFIX)
        key = key.replace(".base_layer.", ".")
        native[key] = value
    return native


def drop_unsaved_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """peft adds task-head names (``classifier``, ``score``) to ``modules_to_save`` whether or not the
    model has them, and skips the missing ones; keep only the entries the file holds tensors for."""
    def stored(entry: str) -> bool:
        return any(k.startswith(entry + ".") or f".{entry}." in k for k in tensors)

    config["modules_to_save"] = [e for e in config.get("modules_to_save", []) if stored(e)]


def to_peft(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(peft adapter_config.json, peft tensors) from a deltatune adapter."""
    config = description["config"]
    writers = {"lora": _lora_to_peft, "ia3": _ia3_to_peft, "prompt": _prompt_to_peft}
    if config["method"] not in writers:
        raise AdapterFileError(f"'{config['method']}' adapters have no peft format that deltatune writes.",
                               f"peft format is written for: {', '.join(writers)}; keep the deltatune format.")
    peft_config = {"base_model_name_or_path": description.get("base_model_name_or_path"),
                   # Prompts need it to reach the model; for LoRA/IA3 peft would add head
                   # modules to modules_to_save and then require their tensors.
                   "inference_mode": True,
                   "task_type": task_type(description.get("base_model_class")) if config["method"] == "prompt" else None,
                   "revision": None,
                   "modules_to_save": config.get("modules_to_save") or None,
                   **writers[config["method"]](config, description, tensors)}
    adapted = {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
    prefix = PROMPT_PREFIX if config["method"] == "prompt" else PREFIX
    peft_tensors = {}
    for key, value in tensors.items():
        if key.endswith(".prompt"):
            peft_tensors["prompt_embeddings"] = value
            continue
        module = key.rsplit(".", 1)[0]
        if key.endswith(".bias") and module in adapted:
            key = f"{module}.base_layer.bias"  # peft keeps an adapted layer's own bias there
        peft_tensors[prefix + key] = value
    return peft_config, peft_tensors


TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def task_type(model_class: str | None) -> str | None:
    """peft's task type for a transformers model class (it picks how prompts reach the model)."""
    return next((t for suffix, t in TASK_TYPES.items() if (model_class or "").endswith(suffix)), None)


def _modules_with(tensors: dict[str, torch.Tensor], *markers: str) -> list[str]:
    """The adapted modules, by full name: peft matches a full name exactly, so no rule differs."""
    return sorted({k.rsplit(f".{m}", 1)[0] for k in tensors for m in markers if f".{m}" in k})


def _lora_to_peft(config: dict, description: dict, tensors: dict) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": config["r"], "lora_alpha": config["lora_alpha"],
            "lora_dropout": config["lora_dropout"],
            "target_modules": _modules_with(tensors, "lora_A.", "lora_embedding_A"),
            "bias": config["bias"], "use_rslora": config["use_rslora"],
            "init_lora_weights": "gaussian" if config["init"] == "gaussian" else True,
            "fan_in_fan_out": description.get("base_model_type") == "gpt2"}


def _ia3_to_peft(config: dict, description: dict, tensors: dict) -> dict[str, Any]:
    targets = _modules_with(tensors, "ia3_l")
    # A feed-forward vector scales the layer's input: peft stores it as (1, d_in).
    feedforward = [m for m in targets if tensors[f"{m}.ia3_l"].shape[0] == 1]
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
            "init_ia3_weights": True, "fan_in_fan_out": description.get("base_model_type") == "gpt2"}


def _prompt_to_peft(config: dict, description: dict, tensors: dict) -> dict[str, Any]:
    prompt = next(v for k, v in tensors.items() if k.endswith(".prompt"))
    return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config["num_virtual_tokens"],
            "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM"}
