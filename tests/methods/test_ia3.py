"""IA3: config checks, default targets per family, counts, merged weights by hand, parity with peft."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from deltatune.core.verbs import merged_adapters
from tiny import HIDDEN, LAYERS, ROUND_TRIP, assert_close_ulps, build, inputs, output, perturb

FFN = 64  # the tiny models' feed-forward width (GPT-2: 4 x HIDDEN)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(3, 4)
        self.down = nn.Linear(4, 2)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def scales(model: nn.Module) -> dict[str, tuple[bool, tuple]]:
    """Adapted module -> (scales its input, shape of l)."""
    return {n: (m.deltas["default"].feedforward, tuple(m.deltas["default"].ia3_l.shape))
            for n, m in model.named_modules() if isinstance(m, DeltaLayer)}


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"target_modules": []}, "ia3.target_modules"), ({"feedforward_modules": 3}, "ia3.feedforward_modules"),
    ({"target_modules": 3}, "ia3.target_modules"), ({"init_ia3_weights": "yes"}, "ia3.init_ia3_weights"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.IA3Config(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} ") and "\n  fix: " in message, message


def test_empty_feedforward_modules_scale_every_target_on_its_output():
    model = dt.apply(build("bert"), dt.IA3Config(target_modules=["value", "output.dense"], feedforward_modules=[]))
    assert not any(feedforward for feedforward, _ in scales(model).values())


def test_feedforward_modules_must_be_a_subset_of_target_modules():
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match="not in target_modules: feedforward_modules must be a "
                                             "subset") as info:
        dt.apply(model, dt.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"]))
    assert "add the module to target_modules" in info.value.hint
    assert sorted(model.state_dict()) == keys


def test_targets_must_be_linear():
    with pytest.raises(dt.TargetError, match="LayerNorm, which ia3 cannot adapt"):
        dt.apply(build("bert"), dt.IA3Config(target_modules=["LayerNorm"]))


# --- default targets ---------------------------------------------------------------------

@pytest.mark.parametrize("family,expected", [
    ("bert", {"attention.self.key": (False, (HIDDEN, 1)), "attention.self.value": (False, (HIDDEN, 1)),
              "output.dense": (True, (1, FFN))}),
    ("gpt2", {"attn.c_attn": (False, (3 * HIDDEN, 1)), "mlp.c_proj": (True, (1, 4 * HIDDEN))}),
    ("llama", {"self_attn.k_proj": (False, (16, 1)), "self_attn.v_proj": (False, (16, 1)),
               "mlp.down_proj": (True, (1, FFN))}),
])
def test_default_targets_scale_keys_values_and_the_feedforward_input(family, expected):
    model = dt.apply(build(family), dt.IA3Config())
    found = scales(model)
    assert len(found) == LAYERS * len(expected)
    for name, scale in found.items():
        assert scale == next(v for k, v in expected.items() if name.endswith("." + k)), name


def test_t5_scales_both_attentions_of_a_decoder_block():
    found = scales(dt.apply(build("t5"), dt.IA3Config()))
    assert sum(n.startswith("encoder.") for n in found) == LAYERS * 3  # k, v, wo
    assert sum(n.startswith("decoder.") for n in found) == LAYERS * 5  # k, v twice, wo
    assert {n for n, (ff, _) in found.items() if ff} == {
        f"{stack}.block.{i}.layer.{j}.DenseReluDense.wo" for stack, j in (("encoder", 1), ("decoder", 2))
        for i in range(LAYERS)}


# --- counts ------------------------------------------------------------------------------

def test_counts_on_tiny_bert():
    model = dt.apply(build("bert"), dt.IA3Config(modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    head = HIDDEN * 3 + 3
    assert report.trainable == report.stored == LAYERS * (2 * HIDDEN + FFN) + head == 355
    # key and value: weight and bias rescaled; the feed-forward output: only its weight's columns
    assert report.changed == LAYERS * (2 * (HIDDEN * HIDDEN + HIDDEN) + FFN * HIDDEN) + head


def test_counts_on_tiny_gpt2():
    report = dt.parameter_report(dt.apply(build("gpt2"), dt.IA3Config()))
    assert report.trainable == report.stored == LAYERS * (3 * HIDDEN + 4 * HIDDEN)
    assert report.changed == LAYERS * (HIDDEN * 3 * HIDDEN + 3 * HIDDEN + 4 * HIDDEN * HIDDEN)


# --- the formulas ------------------------------------------------------------------------

def _set_vectors(model: Net) -> tuple[torch.Tensor, torch.Tensor]:
    l_out, l_in = torch.tensor([1.5, -2.0, 0.5, 3.0]), torch.tensor([2.0, 0.25, -1.0, 4.0])
    with torch.no_grad():
        model.up.deltas["default"].ia3_l.copy_(l_out[:, None])
        model.down.deltas["default"].ia3_l.copy_(l_in[None, :])
    return l_out, l_in


def test_outputs_and_merged_weights_by_hand():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    l_out, l_in = _set_vectors(model)
    W1, b1 = model.up.weight.detach().clone(), model.up.bias.detach().clone()
    W2, b2 = model.down.weight.detach().clone(), model.down.bias.detach().clone()
    x = torch.randn(5, 3)
    expected = (l_in * torch.relu(l_out * (x @ W1.T + b1))) @ W2.T + b2
    torch.testing.assert_close(model(x).detach(), expected)
    dt.merge(model)
    torch.testing.assert_close(model.up.base_layer.weight.detach(), torch.diag(l_out) @ W1)
    torch.testing.assert_close(model.up.base_layer.bias.detach(), l_out * b1)
    torch.testing.assert_close(model.down.base_layer.weight.detach(), W2 @ torch.diag(l_in))
    torch.testing.assert_close(model.down.base_layer.bias.detach(), b2)  # input scaling leaves it
    torch.testing.assert_close(model(x).detach(), expected)
    dt.unmerge(model)
    plain = dt.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
    assert sorted(plain.state_dict()) == ["down.bias", "down.weight", "up.bias", "up.weight"]
    torch.testing.assert_close(plain(x).detach(), expected)


def test_conv1d_merge_scales_columns_for_outputs_and_rows_for_inputs():
    model = dt.apply(build("gpt2"), dt.IA3Config())
    perturb(model)
    batch, block = inputs("gpt2"), model.transformer.h[0]
    expected = output(model, batch)
    qkv, proj = block.attn.c_attn, block.mlp.c_proj
    W_qkv, b_qkv, W_proj = qkv.weight.detach().clone(), qkv.bias.detach().clone(), proj.weight.detach().clone()
    l_qkv, l_proj = (layer.deltas["default"].ia3_l.detach().flatten() for layer in (qkv, proj))
    dt.merge(model)
    torch.testing.assert_close(qkv.base_layer.weight.detach(), W_qkv * l_qkv[None, :])  # (in, out)
    torch.testing.assert_close(qkv.base_layer.bias.detach(), b_qkv * l_qkv)
    torch.testing.assert_close(proj.base_layer.weight.detach(), l_proj[:, None] * W_proj)
    assert_close_ulps(output(model, batch), expected)


def test_a_zero_entry_refuses_to_merge_and_nothing_stays_merged():
    model = dt.apply(build("bert"), dt.IA3Config())
    perturb(model)
    with torch.no_grad():  # the last adapted layer: every layer before it would merge first
        model.bert.encoder.layer[-1].output.dense.deltas["default"].ia3_l[0, 5] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.MergeError, match="1 zero entries") as info:
        dt.merge(model)
    assert "unmerged" in info.value.hint
    assert merged_adapters(model) == []
    for name, param in model.named_parameters():
        assert_close_ulps(param, before[name], ROUND_TRIP)


def test_random_init_changes_the_outputs():
    model, batch = build("bert"), inputs("bert")
    base = output(model, batch)
    torch.manual_seed(0)
    dt.apply(model, dt.IA3Config(init_ia3_weights=False))
    assert not torch.allclose(output(model, batch), base, atol=1e-4)  # random vectors move outputs far past rounding


# --- parity with Hugging Face peft -------------------------------------------------------

PARITY = [
    pytest.param("bert", {"target_modules": ["key", "value", "output.dense"],
                          "feedforward_modules": ["output.dense"], "modules_to_save": ["classifier"]}, id="bert"),
    pytest.param("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
                 id="gpt2-conv1d"),
    pytest.param("llama", {"target_modules": ["k_proj", "v_proj", "down_proj"],
                           "feedforward_modules": ["down_proj"]}, id="llama"),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices
@pytest.mark.parametrize("family,kwargs", PARITY)
def test_outputs_and_counts_match_peft(family, kwargs):
    ours = dt.apply(build(family), dt.IA3Config(**kwargs))
    perturb(ours)
    theirs = peft.get_peft_model(build(family), peft.IA3Config(**kwargs)).eval()
    # Native keys are peft's keys without the "base_model.model." prefix, shapes included.
    tensors = {f"base_model.model.{k}": v for k, v in dt.adapter_state_dict(ours).items()}
    result = peft.set_peft_model_state_dict(theirs, tensors)
    assert not result.unexpected_keys
    batch = inputs(family)
    assert (output(theirs, batch) - output(build(family), batch)).abs().max() > 1e-4  # copied in
    assert_close_ulps(output(theirs, batch), output(ours, batch))
    report = dt.parameter_report(ours)
    assert theirs.get_nb_trainable_parameters() == (report.trainable, report.total)
