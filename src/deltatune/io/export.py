"""Merged export: an adapter folded into its base, written as a plain transformers model."""

from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn

from ..core.errors import AdapterFileError
from ..core.method import method_for
from ..core.verbs import adapter_state, merge_and_unload, unload
from .adapter_files import load_adapter, read_adapter
from .atomic import follow_umask

HEADS = ("classifier.weight", "classifier.out_proj.weight", "score.weight", "qa_outputs.weight")


def base_for(adapter: str | Path, base: str | None = None) -> nn.Module:
    """The base model an adapter was saved from, loaded from a local folder (never the hub)."""
    description, tensors = read_adapter(adapter)
    path = base or description.get("base_model_name_or_path")
    if not path or not Path(path).is_dir():
        raise AdapterFileError(f"the base model of '{adapter}' is not a local folder ({path!r}).",
                               "pass --base with the folder of the base model.")
    class_name = description.get("base_model_class") or "AutoModel"
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise AdapterFileError(f"transformers has no model class '{class_name}'.", "pass --base and upgrade transformers.")
    head = next((tensors[k] for k in HEADS if k in tensors), None)
    kwargs = {"num_labels": head.shape[0]} if head is not None and "Classification" in class_name else {}
    return model_class.from_pretrained(path, **kwargs)


def export_merged(adapter: str | Path, output: str | Path, base: str | None = None) -> Path:
    """Merge the adapter into its base and save model, config and tokenizer to ``output``.

    Raises:
        MergeError: the method cannot merge (adapters, prompts, prefixes).
        AdapterFileError: the base model cannot be found locally.
    """
    model = base_for(adapter, base)
    load_adapter(model, adapter)
    state = adapter_state(model)
    method = method_for(state.configs["default"])
    plain = unload(model) if method.in_place else merge_and_unload(model)
    output = Path(output)
    plain.save_pretrained(output)
    base_path = base or read_adapter(adapter)[0].get("base_model_name_or_path")
    try:
        transformers.AutoTokenizer.from_pretrained(base_path).save_pretrained(output)
    except (OSError, ValueError):
        pass  # a base without a tokenizer: the model is still complete
    follow_umask(*output.iterdir())  # save_pretrained's safetensors files are 0o600
    return output
