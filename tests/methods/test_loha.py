"""LoHa: the Hadamard change by hand, counts, merging, the dropouts, GPT-2's Conv1D kept out of peft."""

from __future__ import annotations

import torch
from torch import nn

import deltatune as dt
from tiny import (
    HIDDEN,
    LAYERS,
    assert_conv1d_trains_here_but_not_in_peft,
    assert_fresh_is_base_and_trained_merges,
    build,
    perturb,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x):
        return self.proj(x)


def test_the_change_is_the_scaled_hadamard_product_of_two_low_rank_products():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoHaConfig(r=2, alpha=3, target_modules=["proj"]))
    perturb(model, scale=0.5)
    delta, x = model.proj.deltas["default"], torch.randn(4, 6)
    w1 = delta.hada_w1_a.detach() @ delta.hada_w1_b.detach()
    w2 = delta.hada_w2_a.detach() @ delta.hada_w2_b.detach()
    change = 1.5 * w1 * w2  # alpha / r = 3 / 2
    W0, b = model.proj.base_layer.weight.detach(), model.proj.base_layer.bias.detach()
    torch.testing.assert_close(model(x), x @ (W0 + change).T + b)
    assert torch.linalg.matrix_rank(change) > 2  # a rank-2 pair reaches more than rank 2


def test_counts_on_tiny_bert():
    model = dt.apply(build("bert"), dt.LoHaConfig(r=4, modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    per_layer = 2 * 4 * (HIDDEN + HIDDEN)  # query and value: d -> d
    assert report.trainable == report.stored == LAYERS * 2 * per_layer + HIDDEN * 3 + 3


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_merges_exactly():
    assert_fresh_is_base_and_trained_merges(dt.LoHaConfig(r=2, target_modules="all-linear"),
                                            lambda m: m.model.layers[0].self_attn.q_proj.base_layer.weight, scale=0.5)


def test_gpt2_conv1d_layers_train_here_and_are_kept_out_of_peft(tmp_path):
    assert_conv1d_trains_here_but_not_in_peft(dt.LoHaConfig(r=2, target_modules=["c_attn"]),
                                              "peft's LoHa has no Conv1D layer", tmp_path, scale=0.5)


def test_module_dropout_skips_the_whole_change_and_rank_dropout_rows_of_it():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoHaConfig(r=2, target_modules=["proj"], module_dropout=0.5))
    perturb(model, scale=0.5)
    x = torch.randn(3, 6)
    base = model.proj.base_layer(x)
    adapted = model.eval()(x)
    model.train()
    outs = [model(x) for _ in range(40)]
    skipped = sum(torch.equal(o, base) for o in outs)
    assert 5 < skipped < 35 and all(torch.equal(o, base) or torch.allclose(o, adapted) for o in outs)

    model = dt.apply(Net(), dt.LoHaConfig(r=2, target_modules=["proj"], rank_dropout=0.5))
    perturb(model, scale=0.5)
    delta = model.proj.deltas["default"]
    full = delta.delta_weight().detach()
    model.train()
    dropped = delta.forward_weight().detach()
    kept = (dropped != 0).all(dim=1)
    assert 0 < kept.sum() < len(kept)  # some rows dropped, some kept
    torch.testing.assert_close(dropped[kept], full[kept] * len(kept) / kept.sum())  # rescaled by 1 / mean
