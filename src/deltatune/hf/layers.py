"""The linear layers transformers models are built from, seen the same way.

GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, ``(in, out)``;
``nn.Linear`` stores ``(out, in)``. Methods that read feature sizes or rescale weight rows and
columns ask here instead of branching on the type themselves. transformers is not imported
for it: no model can hold a ``Conv1D`` before transformers has loaded the class, so listing
methods (``deltatune methods``) stays fast.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer import Delta, DeltaLayer
from ..core.quantized import values_held


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


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """A linear or Conv1D layer's weight as (d_out, d_in): a view, so writes go to the layer."""
    weight = module.weight.data
    return weight.T if weight_is_transposed(module) else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if weight_is_transposed(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class WeightDelta(Delta):
    """A change ΔW (d_out, d_in) to one linear or Conv1D layer's weight, built from a method's
    factors (``delta_weight``) and applied as ``out + x ΔW^T``: merged, ``W <- W + ΔW``.

    For methods whose ΔW does not factor into products a batch can apply one at a time (LoHa's
    Hadamard product, LoKr's Kronecker product): each forward builds ΔW once. In training, the
    LyCORIS dropouts peft applies to them: ``rank_dropout`` drops each output row of ΔW with that
    probability (``rescale``: the kept rows times 1 / the fraction kept), ``module_dropout`` skips
    the whole change in a forward pass with that probability.
    """

    def __init__(self, rank_dropout: float = 0.0, module_dropout: float = 0.0, rescale: bool = True):
        super().__init__()
        self.rank_dropout, self.module_dropout, self.rescale = rank_dropout, module_dropout, rescale

    def delta_weight(self) -> torch.Tensor:
        """ΔW, oriented (d_out, d_in)."""
        raise NotImplementedError(f"{type(self).__name__}.delta_weight")

    def forward_weight(self) -> torch.Tensor:
        """The ΔW a forward pass applies: in training, with rows dropped (``rank_dropout``)."""
        change = self.delta_weight()
        if not (self.training and self.rank_dropout):
            return change
        keep = (torch.rand(change.shape[0], device=change.device) > self.rank_dropout).to(change.dtype)
        return change * (keep / keep.mean() if self.rescale else keep)[:, None]

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return out
        change = self.forward_weight()
        return out + F.linear(args[0].to(change.dtype), change).to(out.dtype)

    def merge(self, base: nn.Module) -> None:
        weight = oriented_weight(base)
        weight.copy_(weight + self.delta_weight().detach())  # in fp32, written once: a bf16 base rounds once

    def unmerge(self, base: nn.Module) -> None:
        weight = oriented_weight(base)
        weight.copy_(weight - self.delta_weight().detach())

    def changed_numel(self, base: nn.Module) -> int:
        return values_held(base.weight)
