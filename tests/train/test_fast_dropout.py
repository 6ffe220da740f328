"""training.fast_dropout: masks from 16-bit random numbers, and attention with dropout outside sdpa."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.train import fast_dropout as fd
from tests import tiny

COUNT = 2**20


def within_binomial(observed: float, probability: float, count: int) -> bool:
    """``observed`` is a fraction of ``count`` independent draws of ``probability``: 6 standard
    deviations (a false alarm about once in 500 million runs)."""
    return abs(observed - probability) <= 6 * math.sqrt(probability * (1 - probability) / count)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 / 3])
def test_each_element_is_kept_with_probability_1_minus_p_rounded_to_2_to_the_16(p):
    keep, scale = fd.keep_mask((COUNT,), p, torch.device("cpu"))
    kept = round((1 - p) * 2**16) / 2**16
    assert abs(kept - (1 - p)) <= 2**-17
    assert scale == 1 / kept  # the expectation of a kept-and-scaled element is the element
    assert within_binomial(keep.double().mean().item(), kept, COUNT)
    # the four numbers of one 64-bit draw are independent: neighbours are kept together as often as chance says
    together = (keep[:-1] & keep[1:]).double().mean().item()
    assert within_binomial(together, kept**2, COUNT - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_or_scales_each_element_and_its_gradient_follows_the_same_mask(dtype):
    x = torch.randn(64, 33, dtype=dtype).requires_grad_()  # 33: a count that is not a multiple of 4
    y = fd.fast_dropout(x, 0.3)
    kept = y != 0
    _, scale = fd.keep_mask((1,), 0.3, x.device)
    assert y.dtype == dtype
    assert torch.equal(y[kept], x.detach().mul(scale)[kept])
    assert 0.55 < kept.double().mean() < 0.85
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream.mul(scale) * kept)


def test_a_seed_draws_the_same_masks_and_eval_or_p_0_change_nothing():
    x = torch.randn(1000)
    torch.manual_seed(3)
    first = fd.fast_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(fd.fast_dropout(x, 0.2), first)
    assert fd.fast_dropout(x, 0.2, training=False) is x
    assert fd.fast_dropout(x, 0.0) is x
    layer = fd.FastDropout(0.2).eval()
    assert layer(x) is x and layer.p == 0.2


def drop_with(monkeypatch, keep_mask) -> None:
    monkeypatch.setattr(fd, "keep_mask", keep_mask)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_every_dropout_is_swapped_and_a_mask_that_keeps_all_gives_the_model_without_dropout(family, monkeypatch):
    """With every mask keeping everything, training mode computes what eval mode computes: the
    attention path sees the masks sdpa sees (padding, causal, grouped key/value heads)."""
    model = tiny.build(family)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):  # LLaMA's is 0 unless configured: give it some
            module.attention_dropout = 0.1
    batch = tiny.inputs(family)
    expected = tiny.output(model, batch)
    dropouts = sum(type(m) is nn.Dropout for m in model.modules())
    assert fd.use_fast_dropout(model, torch.device("cpu")) == dropouts
    assert not any(type(m) is nn.Dropout for m in model.modules())
    torch.testing.assert_close(tiny.output(model, batch), expected, rtol=0, atol=0)  # eval: sdpa, as before
    assert model.config._attn_implementation == fd.ATTENTION
    shapes = []
    drop_with(monkeypatch, lambda shape, p, device: (shapes.append(tuple(shape)) or torch.ones(shape, dtype=torch.bool), 1.0))
    tiny.assert_close_ulps(tiny.output(model.train(), batch), expected)
    length = batch["input_ids"].shape[1]
    assert any(shape[-2:] == (length, length) for shape in shapes), shapes  # attention probabilities


def test_attention_drops_the_probabilities_after_softmax_and_scales_the_rest(monkeypatch):
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    padding = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    padding[1, ..., 3:] = False
    pattern = torch.rand(2, 4, 5, 5, generator=g) > 0.25
    drop_with(monkeypatch, lambda shape, p, device: (pattern, 4 / 3))
    module = nn.Module().train()
    got, _ = fd.attention(module, query, key, value, padding, dropout=0.25, scaling=0.5)
    scores = (query @ key.transpose(-1, -2) * 0.5).masked_fill(~padding, -math.inf)
    expected = (scores.softmax(-1) * pattern * (4 / 3)) @ value
    tiny.assert_close_ulps(got, expected.transpose(1, 2))


def test_off_the_cpu_nothing_is_swapped():
    model = tiny.build("bert")
    assert fd.use_fast_dropout(model, torch.device("cuda")) == 0
    assert any(type(m) is nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_bf16_attention_computes_in_fp32_as_sdpa_does(monkeypatch):
    """bf16 inputs: scores, softmax and the product with v in fp32, rounded once at the end, as
    sdpa's own kernels compute them: the two agree to one bf16 rounding of the output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 9, 16, generator=g).bfloat16() * 3 for _ in range(3))
    padding = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    padding[0, ..., 6:] = False
    drop_with(monkeypatch, lambda shape, p, device: (torch.ones(shape, dtype=torch.bool), 1.0))
    got, _ = fd.attention(nn.Module().train(), query, key, value, padding, dropout=0.1)
    expected, _ = sdpa_attention_forward(nn.Module().eval(), query, key, value, padding, dropout=0.0)
    assert got.dtype == torch.bfloat16
    tiny.assert_close_ulps(got.float(), expected.float(), ulps=2**16)  # 2^16 fp32 ulps: one bf16 ulp
