"""The base model's own dropout, set to one probability (``model.dropout``).

Architectures name their dropout differently (BERT ``hidden_dropout_prob`` and
``attention_probs_dropout_prob``, GPT-2 ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop``, LLaMA
``attention_dropout``, T5 ``dropout_rate``), and a loaded model holds them in three places: its
config, its ``nn.Dropout`` modules, and plain float attributes that attention reads at each
forward (``attention_dropout``, ``dropout_prob``). All three are set. Called on the loaded
model before a method wraps it, so the method's own dropout (``lora_dropout``) is left alone.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PretrainedConfig

_DROPOUT_NAME = re.compile(r"dropout|pdrop", re.IGNORECASE)


def set_base_dropout(model: nn.Module, p: float) -> list[str]:
    """Set every dropout probability of ``model`` to ``p``; returns the config keys it set."""
    keys = _set_config(model.config, p) if hasattr(model, "config") else []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name, value in vars(module).items():
            if _DROPOUT_NAME.search(name) and isinstance(value, float):
                setattr(module, name, p)
    return keys


def _set_config(config: PretrainedConfig, p: float, prefix: str = "") -> list[str]:
    """Every float ``*dropout*`` / ``*pdrop`` entry of a config and of its sub-configs
    (an encoder-decoder's encoder and decoder)."""
    keys = []
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            keys += _set_config(value, p, f"{prefix}{name}.")
        elif _DROPOUT_NAME.search(name) and (isinstance(value, float) or (value is None and name == "classifier_dropout")):
            setattr(config, name, p)
            keys.append(prefix + name)
    return keys
