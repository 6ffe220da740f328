"""LoKr: the Kronecker change by hand, the factors' shapes and counts, merging, Conv1D kept out of peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lokr import factorization
from tiny import (
    LAYERS,
    assert_conv1d_trains_here_but_not_in_peft,
    assert_fresh_is_base_and_trained_merges,
    build,
    perturb,
)


class Net(nn.Module):
    def __init__(self, d_in: int = 12, d_out: int = 8):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dimension,factor,expected", [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)),
                                                       (128, 4, (4, 32)), (12, -1, (3, 4)), (32, 3, (2, 16))])
def test_dimensions_split_near_their_square_root_or_by_the_factor(dimension, factor, expected):
    assert factorization(dimension, factor) == expected


def test_the_split_is_peft_s_for_every_size_and_factor():
    """Files agree on the factors' shapes only if both split alike: compared with peft's own rule."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    pairs = [(d, k) for d in range(1, 1025) for k in (-1, 1, 2, 3, 4, 5, 8, 16)]
    assert [factorization(d, k) for d, k in pairs] == [peft_factorization(d, k) for d, k in pairs]


def test_the_change_is_the_scaled_kronecker_product_of_its_factors():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoKrConfig(r=8, alpha=4, target_modules=["proj"]))  # 8 = 2 x 4, 12 = 3 x 4
    perturb(model, scale=0.5)
    delta, x = model.proj.deltas["default"], torch.randn(4, 12)
    assert delta.lokr_w1.shape == (2, 3) and delta.lokr_w2.shape == (4, 4)  # r = 8 >= 4 / 2: both whole
    w1, w2 = delta.lokr_w1.detach(), delta.lokr_w2.detach()
    change = torch.zeros(8, 12)
    for i in range(2):
        for j in range(3):
            change[4 * i:4 * i + 4, 4 * j:4 * j + 4] = w1[i, j] * w2  # the Kronecker product by blocks
    change *= 0.5  # alpha / r = 4 / 8
    W0, b = model.proj.base_layer.weight.detach(), model.proj.base_layer.bias.detach()
    torch.testing.assert_close(model(x), x @ (W0 + change).T + b)


def test_small_ranks_write_the_factors_as_low_rank_products_and_count_them():
    model = dt.apply(build("bert"), dt.LoKrConfig(r=1, decompose_both=True))  # query, value: 32 = 4 x 8
    delta = model.bert.encoder.layer[0].attention.self.query.deltas["default"]
    assert {n: tuple(p.shape) for n, p in delta.named_parameters()} == {
        "lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    assert dt.parameter_report(model).trainable == LAYERS * 2 * (8 + 16)  # (4 + 4) + (8 + 8) per layer
    whole_w1 = dt.apply(build("bert"), dt.LoKrConfig(r=1)).bert.encoder.layer[0].attention.self.query.deltas["default"]
    assert {n: tuple(p.shape) for n, p in whole_w1.named_parameters()} == {
        "lokr_w1": (4, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_a_fresh_adapter_changes_nothing_and_a_trained_one_merges_exactly(init):
    assert_fresh_is_base_and_trained_merges(dt.LoKrConfig(r=2, target_modules="all-linear", init_weights=init),
                                            lambda m: m.model.layers[0].mlp.down_proj.base_layer.weight, scale=0.5)


def test_gpt2_conv1d_layers_train_here_and_are_kept_out_of_peft(tmp_path):
    assert_conv1d_trains_here_but_not_in_peft(dt.LoKrConfig(r=2, target_modules=["c_fc"]),
                                              "peft's LoKr has no Conv1D layer", tmp_path, scale=0.5)


def test_rank_dropout_rescales_only_when_asked():
    for rescale in (False, True):
        torch.manual_seed(0)
        model = dt.apply(Net(), dt.LoKrConfig(r=8, target_modules=["proj"], rank_dropout=0.5,
                                              rank_dropout_scale=rescale))
        perturb(model, scale=0.5)
        delta = model.proj.deltas["default"]
        full = delta.delta_weight().detach()
        model.train()
        dropped = delta.forward_weight().detach()
        kept = (dropped != 0).all(dim=1)
        assert 0 < kept.sum() < len(kept)
        torch.testing.assert_close(dropped[kept], full[kept] * (len(kept) / kept.sum() if rescale else 1))


def test_bad_settings_are_refused():
    with pytest.raises(dt.ConfigError, match="not a start LoKr knows"):
        dt.LoKrConfig(init_weights="gaussian")
    with pytest.raises(dt.ConfigError, match="decompose_factor = 0"):
        dt.LoKrConfig(decompose_factor=0)
