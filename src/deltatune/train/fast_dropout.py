"""Dropout whose masks cost a quarter of torch's random draws, for training on CPUs.

torch's CPU dropout draws one random number per element (``bernoulli_``), about 6 ns an element
on this project's 2-core machine, and ``scaled_dot_product_attention`` with dropout leaves its
fused kernels for a path that does the same on every attention probability: the 32 dropouts of
a MiniLM LoRA step took a third of it (docs/performance.md). Here one 64-bit draw gives four
16-bit numbers; an element is kept when its number is below ``t = round((1 - p) 2^16)`` and
kept elements are scaled by ``2^16 / t``. That is torch's dropout for ``p' = 1 - t / 2^16``
(``|p' - p| <= 2^-17``): each element kept independently, the expectation unchanged, from
another random stream (a seed gives the same masks again, not torch's masks).

``use_fast_dropout(model)`` swaps the model's ``nn.Dropout`` modules (adapters' included) for
``FastDropout`` and, where the model computes attention with transformers' sdpa, routes training
with dropout through ``attention``: the same mask function, so it sees the same masks as sdpa.
Evaluation, GPUs and attention without dropout still run sdpa's own kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "deltatune_sdpa"
_LEVELS = 2**16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Which elements dropout keeps (bool, ``shape``) and the scale of the kept ones."""
    threshold = round((1 - p) * _LEVELS)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    numbers = words.view(torch.int16)[:count].view(shape)  # uniform on [-2^15, 2^15)
    keep = numbers < threshold - _LEVELS // 2
    return keep, (_LEVELS / threshold if threshold else 0.0)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(ctx.scale).mul_(keep), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with masks from 16-bit numbers (see the module's docstring)."""
    if not training or p == 0:
        return x
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with ``fast_dropout``'s masks; ``p``, ``inplace`` and eval mode as nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except in CPU training with dropout: there softmax, then this
    module's dropout on the probabilities, in fp32 as sdpa's own path for dropout computes them.

    query: (batch, heads, q, d); key, value: (batch, kv heads, k, d); returns (batch, q, heads, d).
    """
    q_length, k_length = query.shape[2], key.shape[2]
    causal = q_length > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if (not (module.training and dropout > 0 and query.device.type == "cpu") or kwargs.get("softcap") is not None
            or (causal and q_length != k_length)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    if position_bias is not None:  # T5's: added to the scores, with the mask folded in
        attention_mask, causal = create_position_bias_mask(position_bias, attention_mask, causal, query, key), False
    if hasattr(module, "num_key_value_groups"):
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if causal:
        attention_mask = torch.ones(q_length, k_length, dtype=torch.bool, device=query.device).tril()
    # In fp32 whatever the inputs, autocast off: sdpa's path for dropout upcasts bf16 inputs alike
    with torch.autocast(query.device.type, enabled=False):
        output = _probabilities_times_values(query.float(), key.float(), value.float(), attention_mask, scaling, dropout)
    return output.to(value.dtype).transpose(1, 2).contiguous(), None


def _probabilities_times_values(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                mask: torch.Tensor | None, scaling: float, p: float) -> torch.Tensor:
    # k transposed made contiguous: a product with the transposed view runs at half the speed here
    scores = (query * scaling) @ key.transpose(-1, -2).contiguous()  # (batch, heads, q, k)
    if mask is not None and mask.dtype == torch.bool:
        # the least finite score, not -inf: a row with no key left is uniform rather than NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask[..., :key.shape[2]]
    return fast_dropout(torch.softmax(scores, dim=-1), p) @ value


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_fast_dropout(model: nn.Module, device: torch.device) -> int:
    """Swap ``model``'s dropout for this module's (see the docstring) when it trains on ``device``
    and that is a CPU; the count of swapped ``nn.Dropout`` modules."""
    if device.type != "cpu":
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    config = getattr(model, "config", None)
    settable = getattr(model, "_can_set_attn_implementation", None)  # transformers models only
    if getattr(config, "_attn_implementation", None) == "sdpa" and settable and settable():
        model.set_attn_implementation(ATTENTION)
    return swapped
