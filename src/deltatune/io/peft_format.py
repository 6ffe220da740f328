"""Hugging Face ``peft`` adapter directories, both ways, for LoRA, IA3, prompt and prefix tuning.

peft's keys are ours with ``base_model.model.`` in front, and LoRA biases of adapted layers
sit under ``base_layer``: ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
``modules_to_save`` are stored under the module's own path, as ours are. What one format cannot
express is refused with a message, never dropped; config fields a newer peft added are ignored
with a warning.

peft stores a prefix as one ``prompt_embeddings`` tensor, num_virtual_tokens x (layers * 2 *
d_kv): for each position, every layer's key then value. Ours is one ``(2, n, d_kv)`` tensor per
layer; a peft file read without a model holds them stacked in layer order under ``*.prefix``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from ..core.errors import AdapterFileError
from ..hf.anatomy import ANATOMIES, model_type

PREFIX = "base_model.model."  # LoRA, IA3: peft's tuner model wraps the transformers model
PROMPT_PREFIX = "base_model."  # prompt learning: the transformers model is the base model itself
#: a key the loader matches by suffix against the model's own keys (the prompt's module varies).
ANY_MODULE = "*."
#: every layer's prefixes, (layers, 2, n, d_kv) in layer order; the loader gives each layer its own.
PREFIX_STACK = ANY_MODULE + "prefix"

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
            "tokenizer_kwargs", "prompt_tuning_init", "init_weights", "prefix_projection",
            "encoder_hidden_size"}


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def config_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    """A deltatune method config (plain data) from peft's ``adapter_config.json``."""
    kind = data.get("peft_type")
    readers = {"LORA": _lora_from_peft, "IA3": _ia3_from_peft, "PROMPT_TUNING": _prompt_from_peft,
               "PREFIX_TUNING": _prefix_from_peft}
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


def _prefix_from_peft(data: dict[str, Any]) -> dict[str, Any]:
    if (data.get("num_transformer_submodules") or 1) != 1:
        raise AdapterFileError("this peft prefix adapter is for an encoder-decoder model: peft prefixes the "
                               "decoder's self-attention only, deltatune the encoder's and the decoder's, so "
                               "the outputs would differ.", "use peft for this adapter.")
    # The file holds the prefixes themselves (peft saves its projection's output): they load
    # as plain prefixes, as those of deltatune's own files do.
    return {"method": "prefix", "num_virtual_tokens": data["num_virtual_tokens"], "reparameterize": False,
            "modules_to_save": list(data.get("modules_to_save") or [])}


def check_base(description: dict[str, Any], model: Any) -> None:
    """Refuse, before the model changes, a peft adapter whose outputs deltatune would not reproduce."""
    if description["config"]["method"] != "prefix":
        return
    anatomy = ANATOMIES.get(model_type(model))
    if anatomy is not None and not anatomy.decoder_only:
        raise AdapterFileError(
            f"this peft prefix adapter would not give peft's outputs on a '{model_type(model)}' model: peft "
            "runs prefixes as a key/value cache, which shifts the input's positions by num_virtual_tokens "
            "(and needs transformers < 5 on encoders); deltatune's encoder prefixes keep them.",
            "load it into the decoder-only model (GPT-2, LLaMA-style) it was trained for.")


def tensors_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft keys -> deltatune keys."""
    native = {}
    for key, value in tensors.items():
        if key == "prompt_embeddings" and peft_config.get("peft_type") == "PREFIX_TUNING":
            native[PREFIX_STACK] = _unflatten_prefixes(value, peft_config)
            continue
        if key == "prompt_embeddings":
            native[ANY_MODULE + "prompt"] = value
            continue
        key = key.removeprefix(PREFIX) if key.startswith(PREFIX) else key.removeprefix(PROMPT_PREFIX)
        key = key.replace(".base_layer.", ".")
        native[key] = value
    return native


def _unflatten_prefixes(value: torch.Tensor, peft_config: dict[str, Any]) -> torch.Tensor:
    """peft's (n, layers * 2 * d_kv) -> (layers, 2, n, d_kv), as peft's get_prompt splits it."""
    n, layers, width = (peft_config.get(k) for k in ("num_virtual_tokens", "num_layers", "token_dim"))
    if not all(isinstance(v, int) for v in (n, layers, width)) or tuple(value.shape) != (n, layers * 2 * width):
        raise AdapterFileError(f"this peft prefix adapter holds prompt_embeddings of shape {tuple(value.shape)}, "
                               f"not num_virtual_tokens x (num_layers * 2 * token_dim) = ({n}, {layers} * 2 * "
                               f"{width}).", "the adapter_config.json does not belong to these weights: save it again.")
    return value.view(n, layers, 2, width).permute(1, 2, 0, 3).contiguous()


def _stack_prefixes(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer ``<key projection>.prefix`` tensors -> one ``PREFIX_STACK`` in layer order, or a refusal."""
    keys = sorted((k for k in tensors if k.endswith(".prefix") and k != PREFIX_STACK), key=_natural)
    if len({re.sub(r"\.\d+\.", ".#.", k) for k in keys}) > 1:
        raise AdapterFileError("this prefix adapter has prefixes in more than one stack of layers (an encoder "
                               "and a decoder); peft's prefix tuning for encoder-decoder models prefixes the "
                               "decoder's self-attention only.", "keep the deltatune format for this adapter.")
    kind = description.get("base_model_type")
    if kind in ANATOMIES and not ANATOMIES[kind].decoder_only:
        raise AdapterFileError(
            f"a prefix adapter for a '{kind}' model has no peft format with the same outputs: peft cannot run "
            "prefix tuning on encoders with transformers 5 (they take no past_key_values), and with older "
            "transformers it shifts the input's positions by num_virtual_tokens, which deltatune's encoder "
            "prefixes do not.", "keep the deltatune format, or share LoRA, IA3 or prompt tuning with peft users.")
    if len({tuple(tensors[k].shape) for k in keys}) > 1:
        raise AdapterFileError("this prefix adapter's layers have prefixes of different widths; peft's "
                               "prefix tuning has one token_dim for all layers.", "keep the deltatune format.")
    if not keys:  # converted from a peft file without a model: stacked already
        return tensors
    rest = {k: v for k, v in tensors.items() if k not in keys}
    return {**rest, PREFIX_STACK: torch.stack([tensors[k] for k in keys])}


def _natural(key: str) -> list:
    """Sort layer 2 before layer 10: the file's keys are sorted as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def drop_unsaved_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """peft adds task-head names (``classifier``, ``score``) to ``modules_to_save`` whether or not the
    model has them, and skips the missing ones; keep only the entries the file holds tensors for."""
    def stored(entry: str) -> bool:
        return any(k.startswith(entry + ".") or f".{entry}." in k for k in tensors)

    entries = dict.fromkeys(config.get("modules_to_save", []))  # peft may list one twice
    config["modules_to_save"] = [e for e in entries if stored(e)]


def to_peft(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(peft adapter_config.json, peft tensors) from a deltatune adapter."""
    config = description["config"]
    writers = {"lora": _lora_to_peft, "ia3": _ia3_to_peft, "prompt": _prompt_to_peft, "prefix": _prefix_to_peft}
    method = config["method"]
    if method not in writers:
        raise AdapterFileError(f"'{method}' adapters have no peft format that deltatune writes.",
                               f"peft format is written for: {', '.join(writers)}; keep the deltatune format.")
    prompt_learning = method in ("prompt", "prefix")
    if method == "prefix":
        tensors = _stack_prefixes(description, tensors)
    peft_config = {"base_model_name_or_path": description.get("base_model_name_or_path"),
                   # Prompts need it to reach the model; for LoRA/IA3 peft would add head
                   # modules to modules_to_save and then require their tensors.
                   "inference_mode": True,
                   "task_type": _prompt_task_type(description) if prompt_learning else None,
                   "revision": None,
                   "modules_to_save": config.get("modules_to_save") or None,
                   **writers[method](config, description, tensors)}
    adapted = {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
    prefix = PROMPT_PREFIX if prompt_learning else PREFIX
    peft_tensors = {}
    for key, value in tensors.items():
        if key == PREFIX_STACK:  # (layers, 2, n, d_kv) -> (n, layers * 2 * d_kv)
            peft_tensors["prompt_embeddings"] = value.permute(2, 0, 1, 3).reshape(value.shape[2], -1).contiguous()
            continue
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


def _prefix_to_peft(config: dict, description: dict, tensors: dict) -> dict[str, Any]:
    layers, _, n, width = tensors[PREFIX_STACK].shape
    # num_attention_heads: peft takes it (and, with grouped-query attention, token_dim) from the
    # base model's config when it loads; the stored prefixes do not depend on the head count.
    return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n, "token_dim": width, "num_layers": layers,
            "num_attention_heads": None, "num_transformer_submodules": 1, "encoder_hidden_size": width,
            # the file holds plain prefixes (folded): peft loads and trains them as such
            "prefix_projection": False}
