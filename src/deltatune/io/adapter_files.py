"""Adapter files: ``adapter_model.safetensors`` (only stored tensors) + ``adapter_config.json``.

The weights file also carries the config in its safetensors metadata, so it is complete on
its own: if a save is interrupted between the two files, the loader trusts the weights file.
Weights are read with safetensors only; deltatune never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import AdapterFileError, ConfigError, TargetError, warn_user
from ..core.method import config_from_dict, deltas_of, method_for
from ..core.quantized import values_shape
from ..core.verbs import (
    active_adapters,
    adapter_state_dict,
    all_or_nothing,
    apply,
    delete_adapter,
    require_adapter,
    set_adapter,
)
from ..hf.layers import weight_is_transposed
from ..hf.quantization import base_quantization
from ..version import __version__
from . import peft_format
from .atomic import atomic_write, atomic_write_text

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "deltatune"


def base_fingerprint(model: nn.Module, adapter_name: str) -> str:
    """A hash of the names and shapes of the base weights an adapter touches (the shapes of their
    values: the same for a base loaded quantised or not)."""
    shapes = []
    for name, layer, _ in deltas_of(model, adapter_name):
        shapes += [(f"{name}.{k}", values_shape(p)) for k, p in layer.base_layer.named_parameters()]
    return "sha256:" + hashlib.sha256(repr(sorted(shapes)).encode()).hexdigest()[:16]


def _describe(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    method = require_adapter(model, adapter_name).methods[adapter_name]
    config = method.config
    base_config = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "deltatune_version": __version__,
        "method": config.method,
        "config": method.saved_config(model, adapter_name).to_dict(),
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "base_model_type": getattr(base_config, "model_type", None),
        "base_model_class": type(model).__name__,
        "base_fingerprint": base_fingerprint(model, adapter_name),
        # how the base it trained on was quantised (BitsAndBytesConfig's names); null: full precision
        "base_quantization": base_quantization(model),
        # peft's fan_in_fan_out: the adapted weights are stored (in, out), as GPT-2's Conv1D.
        "fan_in_fan_out": any(weight_is_transposed(layer.base_layer) for _, layer, _ in deltas_of(model, adapter_name)),
    }


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 format: str = "deltatune") -> Path:
    """Write one adapter's stored tensors and config into the directory ``path``.

    ``format="peft"`` writes what ``peft.PeftModel.from_pretrained`` loads (LoRA, IA3, prompt,
    prefix on decoder-only models).

    Each file is replaced atomically: a crash mid-save leaves the previous adapter loadable.

    Returns:
        The directory.

    Raises:
        ConfigError: no such adapter. AdapterFileError: ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"cannot save the adapter to '{path}': it is a file, not a directory.",
                               "choose a directory path.")
    description = _describe(model, adapter_name)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    write_adapter(path, description, tensors, format)
    return path


def write_adapter(path: Path, description: dict[str, Any], tensors: dict[str, torch.Tensor], format: str) -> None:
    """Write a described adapter in deltatune's or peft's layout, each file atomically."""
    if format not in ("deltatune", "peft"):
        raise ConfigError(f"unknown adapter format '{format}'.", "use 'deltatune' or 'peft'.")
    metadata = {"format": "pt", "deltatune": json.dumps(description)}
    config = description
    if format == "peft":
        config, tensors = peft_format.to_peft(description, tensors)
        metadata = {"format": "pt"}
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    except OSError as error:
        raise AdapterFileError(f"could not write the adapter to '{path}': {error.strerror or error}.",
                               "free disk space or choose a writable directory; any previous "
                               "adapter there is intact.") from error


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model.

    Returns:
        (description, tensors).

    Raises:
        AdapterFileError: missing, corrupted, pickled or inconsistent files.
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory '{path}' does not exist.",
                               f"pass the directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f"'{pickled[0]}' is a pickle file, which deltatune never loads: convert it to "
                "safetensors with the tool that wrote it." if pickled else "save the adapter again.")
        raise AdapterFileError(f"'{path}' has no {WEIGHTS_NAME}.", hint)
    try:
        tensors = load_file(weights)
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"'{weights}' is not a valid safetensors file ({error}).",
                               "the file is truncated or corrupted: save or copy it again.") from error
    description = _read_description(path / CONFIG_NAME, metadata)
    if description.get("format") == "peft":
        tensors = peft_format.tensors_from_peft(tensors, description["peft_config"])
        peft_format.drop_unsaved_modules(description["config"], tensors)
    return description, tensors


def _read_description(config_path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    embedded = _embedded_description(config_path.parent / WEIGHTS_NAME, metadata)
    on_disk = None
    if config_path.is_file():
        try:
            on_disk = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if embedded is None:
                raise AdapterFileError(f"'{config_path}' is not valid JSON ({error}).",
                                       "restore the file or save the adapter again.") from error
            warn_user(f"{config_path} is not valid JSON ({error}); using the config saved inside the weights file.")
    if embedded is not None:
        if on_disk is not None and on_disk != embedded:
            warn_user(f"{config_path} differs from the config saved inside the weights file "
                      "(an interrupted save?); using the one saved with the weights.")
        return embedded
    if on_disk is None:
        raise AdapterFileError(f"'{config_path}' is missing.", "save the adapter again.")
    if peft_format.is_peft_config(on_disk):
        return peft_format.describe_peft(on_disk)
    if on_disk.get("format") != FORMAT:
        raise AdapterFileError(f"'{config_path}' is neither a deltatune nor a peft adapter config.",
                               "point to a directory written by deltatune.save_adapter or peft's save_pretrained.")
    return on_disk


def _embedded_description(weights: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The config saved inside the weights file, or None (peft's files carry none)."""
    if "deltatune" not in metadata:
        return None
    hint = "the file is truncated or corrupted: save or copy it again."
    try:
        embedded = json.loads(metadata["deltatune"])
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"'{weights}' is corrupted: the config saved inside it is not valid JSON "
                               f"({error}).", hint) from error
    if not isinstance(embedded, dict):
        raise AdapterFileError(f"'{weights}' is corrupted: the config saved inside it is not a JSON object.", hint)
    return embedded


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved at ``path`` into ``model`` and load its tensors.

    Raises:
        AdapterFileError: the files are damaged or were made for another base model; the model
            is left as it was.
        ConfigError: the stored config names an unknown method or has invalid values.
    """
    description, tensors = read_adapter(path)
    return load_read_adapter(model, description, tensors, path, adapter_name)


def load_read_adapter(model: nn.Module, description: dict[str, Any], tensors: dict[str, torch.Tensor],
                      path: str | Path, adapter_name: str = "default") -> nn.Module:
    """``load_adapter`` of what ``read_adapter(path)`` returned, for callers that read it already."""
    try:
        config = config_from_dict(description["config"], where=f"{path}/{CONFIG_NAME}:config")
    except (KeyError, ConfigError) as error:
        problem = error.message if isinstance(error, ConfigError) else f"it has no {error} entry."  # one fix: ours
        raise AdapterFileError(f"the config in '{path}' is not usable: {problem}",
                               "save the adapter again with this version of deltatune.") from error
    if "peft_config" in description:
        peft_format.check_base(description, model)
    with all_or_nothing(model, adapter_name, method_for(config)):  # any failure: the model as it was
        try:
            apply(model, config, adapter_name)
        except TargetError as error:
            raise AdapterFileError(f"the adapter in '{path}' does not fit {type(model).__name__}: {error.message}",
                                   "load it into the base model it was trained on.") from error
        load_adapter_state_dict(model, tensors, adapter_name)
        _check_fingerprint(model, adapter_name, description)
    return model


def restore_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Put a saved state of one of the model's own adapters back (the best one, after training went
    on): its tensors are copied in place, or, where the file's config is not the one the live
    adapter would save (AdaLoRA kept other ranks then), the adapter is rebuilt from the file."""
    description, tensors = read_adapter(path)
    method = require_adapter(model, adapter_name).methods[adapter_name]
    live = json.loads(json.dumps(method.saved_config(model, adapter_name).to_dict()))
    if description.get("config") == live:
        load_adapter_state_dict(model, tensors, adapter_name)
        return
    active = active_adapters(model)
    delete_adapter(model, adapter_name)
    load_read_adapter(model, description, tensors, path, adapter_name)
    set_adapter(model, active)


def _check_fingerprint(model: nn.Module, adapter_name: str, description: dict[str, Any]) -> None:
    expected = description.get("base_fingerprint")
    if expected and expected != base_fingerprint(model, adapter_name):
        raise AdapterFileError(
            f"the adapter was saved for another base model ({description.get('base_model_name_or_path') or 'unknown'}, "
            f"fingerprint {expected}): the shapes of the modules it adapts differ here.",
            "load it into the base model it was trained on.")


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Copy stored tensors into an adapter already applied with the same config.

    Raises:
        AdapterFileError: keys missing or unexpected, or a tensor of the wrong shape; the
            message names the module.
    """
    expected = adapter_state_dict(model, adapter_name)
    check_tensors_match(expected, tensors)
    owners = {}
    for name, _, delta in deltas_of(model, adapter_name):
        for key in delta.stored_state():
            owners[f"{name}.{key}"] = (delta, key)
    per_delta: dict[int, tuple] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            if key in owners:
                delta, rel = owners[key]
                per_delta.setdefault(id(delta), (delta, {}))[1][rel] = value
            else:
                expected[key].copy_(value)
        for delta, values in per_delta.values():
            delta.load_stored_state(values)


def check_tensors_match(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Missing/unexpected set arithmetic and shape checks, with the module named."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise AdapterFileError(f"the adapter file does not fit this model: {'; '.join(parts)}.",
                               "load it into the base model it was trained on, with the same method config.")
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterFileError(
                f"'{key}' has shape {tuple(value.shape)} in the file but {tuple(expected[key].shape)} "
                "in this model: the adapter was trained on another base model.",
                "load it into the base model it was trained on.")
