"""Adapter files without a model: convert between formats, describe what a file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter_files import read_adapter, write_adapter
from .export import base_class


def convert(source: str | Path, target: str | Path, to: str) -> Path:
    """Rewrite the adapter at ``source`` into ``target`` in the ``to`` format ('peft' or 'deltatune').

    Raises:
        AdapterFileError: unreadable source, or a method the target format cannot express.
    """
    description, tensors = read_adapter(source)
    description = {"format": "deltatune", "method": description["config"]["method"],
                   **{k: v for k, v in description.items() if k != "format"}}
    write_adapter(Path(target), description, tensors, format=to)
    return Path(target)


def _quantization(description: dict[str, Any]) -> str:
    """``4-bit nf4, double quantisation, compute bfloat16`` from an adapter's base_quantization."""
    if "base_quantization" not in description:  # a peft file, or one written before deltatune recorded it
        return "not recorded"
    recorded = description["base_quantization"]
    if not recorded:
        return "full precision"
    if recorded.get("load_in_8bit"):
        return f"8-bit ({recorded.get('quant_method', 'bitsandbytes')})"
    double = ", double quantisation" if recorded.get("bnb_4bit_use_double_quant") else ""
    return (f"4-bit {recorded.get('bnb_4bit_quant_type', '?')}{double}, compute "
            f"{recorded.get('bnb_4bit_compute_dtype', '?')} ({recorded.get('quant_method', 'bitsandbytes')})")


def inspect_adapter(path: str | Path) -> str:
    """A readable description: method, config, base model, fingerprint, tensors and sizes."""
    description, tensors = read_adapter(path)
    config: dict[str, Any] = description["config"]
    total = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    lines = [f"adapter:     {path} ({description['format']} format)",
             f"method:      {config['method']}",
             f"base model:  {description.get('base_model_name_or_path') or 'unknown'} "
             f"({base_class(description) or '?'})",
             f"fingerprint: {description.get('base_fingerprint') or '-'}",
             f"base held:   {_quantization(description)}",
             "config:      " + ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "method"),
             f"tensors:     {len(tensors)}, {total:,} parameters, {nbytes:,} bytes"]
    width = max((len(k) for k in tensors), default=0)
    lines += [f"  {k:<{width}}  {str(tuple(t.shape)):<14} {str(t.dtype).replace('torch.', '')}"
              for k, t in sorted(tensors.items())]
    return "\n".join(lines)
