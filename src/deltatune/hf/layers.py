"""The linear layers transformers models are built from, seen the same way.

GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, ``(in, out)``;
``nn.Linear`` stores ``(out, in)``. Methods that read feature sizes or rescale weight rows and
columns ask here instead of branching on the type themselves.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def weight_is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored ``(in, out)`` (``Conv1D``), not ``(out, in)``."""
    return isinstance(module, Conv1D)
