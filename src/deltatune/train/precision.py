"""The precision a run computes in, chosen for the hardware, and a frozen base held lean.

``auto`` is bf16 where the device has bf16 arithmetic units (a CPU with AVX-512 BF16 or AMX, a
CUDA device that supports bf16) and fp32 elsewhere: on a CPU without them bf16 is emulated and
runs slower than fp32. Under bf16 the frozen weights are held in bf16 (no fp32 copy to cast at
every forward) while everything that trains keeps fp32 weights and fp32 optimizer state; matmuls
run under ``torch.autocast``, which also keeps losses and softmax-like reductions in fp32.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from accelerate.utils import convert_to_fp32
from torch import nn

from ..core.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what accelerate is asked for: bf16 runs under deltatune's own autocast (accelerate's choice is
#: fixed for the whole process, and one process trains many runs); fp16 needs accelerate's loss scaling
ACCELERATE = {"fp32": "no", "bf16": "no", "fp16": "fp16"}


def native_bf16(device: torch.device) -> bool:
    """True where ``device`` computes bf16 in hardware rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve(precision: str, device: torch.device | None = None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``precision`` with ``auto`` decided for ``device``."""
    device = device or default_device()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}.",
                          "auto picks bf16 where the hardware computes it, else fp32.")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training.precision = fp16 needs a CUDA device; this run is on the CPU.",
                          "use precision: auto (bf16 where the CPU has it) or fp32.")
    return precision


def describe(precision: str, device: torch.device | None = None) -> str:
    """One line for the start of a run: what it computes in, and why."""
    device = device or default_device()
    resolved = resolve(precision, device)
    if precision != "auto":
        return f"precision: {resolved} (as configured)"
    why = "has bf16 arithmetic units" if resolved == "bf16" else "has no bf16 arithmetic units"
    return f"precision: {resolved} (auto: this {device.type.upper()} {why})"


def hold_frozen(model: nn.Module, precision: str) -> int:
    """Cast every frozen floating-point parameter to the compute dtype of a bf16 run; trained
    parameters stay fp32. Returns how many bytes that saved (0 for other precisions: fp16 keeps
    an fp32 base, whose loss scaling needs it)."""
    if precision != "bf16":
        return 0
    saved = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            saved += param.numel() * 2
    return saved


def compute_in(model: nn.Module, precision: str, device: torch.device | None = None) -> nn.Module:
    """A base model for inference in ``precision``, before adapters go into it: frozen, its
    weights held lean, its forward run under autocast with fp32 outputs (as a training run's
    evaluation computes). Adapters loaded afterwards keep their fp32 weights."""
    model.requires_grad_(False)
    hold_frozen(model, precision)
    return autocast_forward(model, precision, device)


def autocast_forward(model: nn.Module, precision: str, device: torch.device | None = None) -> nn.Module:
    """Run ``model``'s forward under autocast in ``precision`` (nothing for fp32), outputs in fp32.

    A bound method, so that ``copy.deepcopy(model)`` gives a copy whose forward runs the copy."""
    if precision != "fp32":
        model._deltatune_autocast = (device or default_device()).type, DTYPES[precision]
        model.forward = types.MethodType(_forward_under_autocast, model)
    return model


def _forward_under_autocast(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    device_type, dtype = self._deltatune_autocast
    with torch.autocast(device_type, dtype=dtype):
        out = type(self).forward(self, *args, **kwargs)
    return convert_to_fp32(out)


def dtype_counts(model: nn.Module) -> dict[str, Any]:
    """Numbers of frozen and trained parameters by dtype (the report's check of a lean base)."""
    counts: dict[str, dict[str, int]] = {"frozen": {}, "trained": {}}
    for param in model.parameters():
        side = counts["trained" if param.requires_grad else "frozen"]
        name = str(param.dtype).removeprefix("torch.")
        side[name] = side.get(name, 0) + param.numel()
    return counts
