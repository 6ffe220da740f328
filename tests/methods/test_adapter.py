"""Bottleneck adapters: config checks, placements per family, counts and outputs by hand."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from tiny import HIDDEN, LAYERS, build, inputs, output, perturb


class Net(nn.Module):
    def __init__(self, d_in: int = 4, d_out: int = 3):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DeltaLayer)]


def adapter_per_site(d: int, m: int) -> int:
    return 2 * d * m + d + m  # down d m + m, up m d + d


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"bottleneck": 0}, "adapter.bottleneck"), ({"bottleneck": -3}, "adapter.bottleneck"),
    ({"bottleneck": 8.0}, "adapter.bottleneck"), ({"activation": "gleu"}, "adapter.activation"),
    ({"placement": "serial"}, "adapter.placement"), ({"scaling": "1"}, "adapter.scaling"),
    ({"scaling": float("inf")}, "adapter.scaling"), ({"init": "zeros"}, "adapter.init"),
    ({"target_modules": []}, "adapter.target_modules"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.AdapterConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} ") and "\n  fix: " in message, message


def test_an_unknown_activation_lists_the_allowed_ones():
    with pytest.raises(dt.ConfigError, match="gleu") as info:
        dt.AdapterConfig(activation="gleu")
    assert all(name in info.value.hint for name in ("gelu", "relu", "silu", "tanh"))


def test_config_round_trips_through_plain_data():
    config = dt.AdapterConfig(bottleneck=16, placement="parallel", scaling=4.0, activation="relu")
    assert dt.config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("placement,module", [("houlsby", "output.dense"), ("parallel", "output")])
def test_a_bottleneck_wider_than_the_hidden_size_is_refused_before_any_change(placement, module):
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match=f"adapter.bottleneck = {HIDDEN + 1} is larger than the "
                                             f"hidden size {HIDDEN}") as info:
        dt.apply(model, dt.AdapterConfig(bottleneck=HIDDEN + 1, placement=placement))
    assert f"at most {HIDDEN}" in info.value.hint
    assert sorted(model.state_dict()) == keys and not wrapped(model)


def test_a_sequential_adapter_needs_linear_targets():
    with pytest.raises(dt.TargetError, match="LayerNorm, which adapter cannot adapt"):
        dt.apply(build("bert"), dt.AdapterConfig(bottleneck=4, target_modules=["attention.output.LayerNorm"]))


def test_a_target_cannot_also_be_a_saved_module():
    model = build("bert")
    with pytest.raises(dt.ConfigError, match="overlaps 'bert.encoder'"):
        dt.apply(model, dt.AdapterConfig(bottleneck=4, modules_to_save=["bert.encoder"]))
    assert not wrapped(model)


def test_a_model_without_a_role_map_needs_target_modules():
    with pytest.raises(dt.ConfigError, match="set target_modules"):
        dt.apply(Net(), dt.AdapterConfig(bottleneck=2))


# --- where the adapters go ---------------------------------------------------------------

@pytest.mark.parametrize("placement,expected", [
    ("houlsby", ["attention.output.dense", "output.dense"]),
    ("pfeiffer", ["output.dense"]),
    ("parallel", ["output"]),
])
def test_placements_on_bert(placement, expected):
    model = dt.apply(build("bert"), dt.AdapterConfig(bottleneck=4, placement=placement))
    prefix = "bert.encoder.layer"
    assert wrapped(model) == [f"{prefix}.{i}.{name}" for i in range(LAYERS) for name in expected]


@pytest.mark.parametrize("family,placement,per_block", [
    ("gpt2", "houlsby", ["attn.c_proj", "mlp.c_proj"]), ("gpt2", "parallel", ["mlp"]),
    ("llama", "houlsby", ["self_attn.o_proj", "mlp.down_proj"]), ("llama", "pfeiffer", ["mlp.down_proj"]),
    ("distilbert", "parallel", ["ffn"]),
])
def test_placements_on_other_families(family, placement, per_block):
    model = dt.apply(build(family), dt.AdapterConfig(bottleneck=4, placement=placement))
    assert [re.sub(r"^.*?\.\d+\.", "", n) for n in wrapped(model)] == per_block * LAYERS  # within a block


# --- counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_counts_on_tiny_bert(placement, per_layer):
    model = build("bert")
    base_total = sum(p.numel() for p in model.parameters())
    dt.apply(model, dt.AdapterConfig(bottleneck=8, placement=placement, modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    adapters = LAYERS * per_layer * adapter_per_site(HIDDEN, 8)  # Houlsby: 2 x 2 x 552 = 2208
    head = HIDDEN * 3 + 3
    assert report.trainable == report.stored == adapters + head
    assert report.total == base_total + adapters + head
    assert report.changed == head  # adapters leave every base weight as it is


def test_houlsby_on_t5_puts_three_adapters_in_a_decoder_block():
    report = dt.parameter_report(dt.apply(build("t5"), dt.AdapterConfig(bottleneck=8)))
    assert report.trainable == (LAYERS * 2 + LAYERS * 3) * adapter_per_site(HIDDEN, 8)


# --- the formulas ------------------------------------------------------------------------

def _adapter(delta, x: torch.Tensor, act) -> torch.Tensor:
    return delta.scaling * (act(x @ delta.down.weight.T + delta.down.bias) @ delta.up.weight.T + delta.up.bias)


def test_fresh_adapter_starts_with_a_zero_up_projection():
    model = dt.apply(build("bert"), dt.AdapterConfig(bottleneck=4, init="near_identity"))
    delta = model.bert.encoder.layer[0].output.dense.deltas["default"]
    assert torch.all(delta.up.weight == 0) and torch.all(delta.up.bias == 0)
    assert 0 < delta.down.weight.std() < 0.02


def test_sequential_output_is_h_plus_scaled_adapter_of_h():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.AdapterConfig(bottleneck=2, activation="tanh", scaling=0.5,
                                             target_modules=["proj"]))
    perturb(model)
    x = torch.randn(5, 4)
    h = model.proj.base_layer(x).detach()
    expected = h + _adapter(model.proj.deltas["default"], h, torch.tanh).detach()
    torch.testing.assert_close(model(x).detach(), expected)


def test_parallel_in_bert_joins_the_residual_before_the_layer_norm():
    model = dt.apply(build("bert"), dt.AdapterConfig(bottleneck=4, placement="parallel", scaling=2.0))
    perturb(model)
    sub = model.bert.encoder.layer[0].output  # BertOutput(hidden, input_tensor)
    base, delta = sub.base_layer, sub.deltas["default"]
    hidden, x = torch.randn(2, 3, 64), torch.randn(2, 3, HIDDEN)
    gelu = nn.functional.gelu
    with torch.no_grad():
        expected = base.LayerNorm(base.dense(hidden) + x + _adapter(delta, x, gelu))
        torch.testing.assert_close(sub(hidden, x), expected)


def test_parallel_in_gpt2_adds_the_adapter_of_the_mlp_input():
    model = dt.apply(build("gpt2"), dt.AdapterConfig(bottleneck=4, placement="parallel"))
    perturb(model)
    mlp = model.transformer.h[1].mlp
    x = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        expected = mlp.base_layer(x) + _adapter(mlp.deltas["default"], x, nn.functional.gelu)
        torch.testing.assert_close(mlp(x), expected)


def test_parallel_on_a_named_linear_reads_its_input():
    model = dt.apply(Net(4, 3), dt.AdapterConfig(bottleneck=2, placement="parallel", target_modules="proj"))
    perturb(model)
    delta, x = model.proj.deltas["default"], torch.randn(5, 4)
    assert (delta.down.in_features, delta.up.out_features) == (4, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.proj.base_layer(x) + _adapter(delta, x, nn.functional.gelu))


# --- merging and unloading ---------------------------------------------------------------

def test_merging_is_refused_with_the_reason():
    model = dt.apply(build("bert"), dt.AdapterConfig(bottleneck=4))
    with pytest.raises(dt.MergeError, match="non-linear"):
        dt.merge_and_unload(model)


def test_unload_gives_back_the_plain_base_model():
    model = build("gpt2")
    batch, keys = inputs("gpt2"), sorted(model.state_dict())
    base = output(model, batch)
    dt.apply(model, dt.AdapterConfig(bottleneck=4, placement="parallel"))
    perturb(model)
    plain = dt.unload(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
    assert sorted(plain.state_dict()) == keys
    torch.testing.assert_close(output(plain, batch), base, atol=0, rtol=0)
