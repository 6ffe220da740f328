"""The linear layers transformers models are built from, seen the same way.

GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, ``(in, out)``;
``nn.Linear`` stores ``(out, in)``. Methods that read feature sizes or rescale weight rows and
columns ask here instead of branching on the type themselves. transformers is not imported
for it: no model can hold a ``Conv1D`` before transformers has loaded the class, so listing
methods (``deltatune methods``) stays fast.
"""

from __future__ import annotations

import sys

from torch import nn

from ..core.layer import DeltaLayer


def linear_types() -> tuple[type, ...]:
    """``nn.Linear``, and transformers' ``Conv1D`` once transformers has loaded it."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)


def weight_is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored ``(in, out)`` (``Conv1D``), not ``(out, in)``; a module an
    adapter already wraps is seen through its wrapper."""
    base = module.base_layer if isinstance(module, DeltaLayer) else module
    return isinstance(base, linear_types()[1:])


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer with parameters of its own (LayerNorm, RMSNorm, T5's
    LayerNorm, ...), found by type name: transformers defines a norm class per architecture."""
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if weight_is_transposed(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features
