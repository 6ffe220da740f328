"""VeRA: config checks, outputs and merged weights by hand, the shared projections (drawn as
peft draws them, stored once, moved with the model), honest counts, and parity with peft."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core.method import iter_layers
from deltatune.methods.vera import VeraProjections
from tiny import HIDDEN, LAYERS, assert_close_ulps, build, inputs, output, perturb


class Net(nn.Module):
    def __init__(self, *shapes: tuple[int, int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in shapes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def vera_deltas(model: nn.Module) -> list:
    return [layer.deltas["default"] for _, layer in iter_layers(model) if "default" in layer.deltas]


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "vera.r"), ({"vera_dropout": 1.0}, "vera.vera_dropout"), ({"target_modules": []}, "vera.target_modules"),
    ({"d_initial": 0.0}, "vera.d_initial"), ({"projection_prng_key": -1}, "vera.projection_prng_key"),
    ({"projection_prng_key": 2**64}, "vera.projection_prng_key"), ({"save_projection": "no"}, "vera.save_projection"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.VeraConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} ") and "\n  fix: " in message, message


def test_peft_defaults():
    config = dt.VeraConfig()
    assert (config.r, config.projection_prng_key, config.save_projection, config.vera_dropout, config.d_initial) == (
        256, 0, True, 0.0, 0.1)


def test_targets_must_be_linear():
    with pytest.raises(dt.TargetError, match="LayerNorm, which vera cannot adapt"):
        dt.apply(build("bert"), dt.VeraConfig(r=4, target_modules=["LayerNorm"]))


# --- outputs and weights by hand ----------------------------------------------------------

def hand_model() -> tuple[Net, torch.Tensor]:
    """W0 = [[1,0,0],[0,0,1]], b = [0.5, 0]; A = [[1,0,1],[0,1,0]], B = [[1,2],[0,1]];
    lambda_d = [0.5, -1], lambda_b = [2, 3]; x = [1, 2, 3]."""
    net = Net((3, 2))
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1]]))
        net.layers[0].bias.copy_(torch.tensor([0.5, 0]))
    dt.apply(net, dt.VeraConfig(r=2, target_modules=["layers.0"]))
    (delta,) = vera_deltas(net)
    with torch.no_grad():
        delta.projections.vera_A.copy_(torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
        delta.projections.vera_B.copy_(torch.tensor([[1.0, 2], [0, 1]]))
        delta.vera_lambda_d.copy_(torch.tensor([0.5, -1]))
        delta.vera_lambda_b.copy_(torch.tensor([2.0, 3]))
    return net, torch.tensor([[1.0, 2, 3]])


def test_output_worked_out_by_hand():
    # W0 x + b = [1.5, 3];  A x = [4, 2];  * lambda_d = [2, -2];  B . = [-2, -2];  * lambda_b = [-4, -6]
    net, x = hand_model()
    torch.testing.assert_close(net(x), torch.tensor([[-2.5, -3.0]]))


def test_merged_weight_worked_out_by_hand():
    # diag(lambda_b) B diag(lambda_d) A = diag([2, 3]) [[0.5, -2], [0, -1]] A = [[1, -4, 1], [0, -3, 0]]
    net, x = hand_model()
    dt.merge(net)
    torch.testing.assert_close(net.layers[0].weight, torch.tensor([[2.0, -4, 1], [0, -3, 1]]))
    torch.testing.assert_close(net(x), torch.tensor([[-2.5, -3.0]]))
    dt.unmerge(net)
    torch.testing.assert_close(net.layers[0].weight, torch.tensor([[1.0, 0, 0], [0, 0, 1]]))


def test_a_fresh_adapter_starts_at_d_initial_and_zero():
    net = dt.apply(Net((3, 2)), dt.VeraConfig(r=5, d_initial=0.05, target_modules=["layers.0"]))
    (delta,) = vera_deltas(net)
    assert torch.equal(delta.vera_lambda_d, torch.full((5,), 0.05)) and torch.equal(delta.vera_lambda_b, torch.zeros(2))


# --- the shared projections ---------------------------------------------------------------

def test_projections_are_drawn_as_peft_draws_them_and_each_layer_slices_its_part():
    # layers 3 -> 4 -> 2: A is r x max_in = 2 x 4, B is max_out x r = 4 x 2
    net = dt.apply(Net((3, 4), (4, 2)), dt.VeraConfig(r=2, target_modules=["layers.0", "layers.1"],
                                                      projection_prng_key=11))
    generator = torch.Generator().manual_seed(11)
    a, b = _kaiming_init((2, 4), generator=generator), _kaiming_init((4, 2), generator=generator)
    up, down = vera_deltas(net)
    assert torch.equal(up.projections.vera_A, a) and torch.equal(up.projections.vera_B, b)
    assert a.abs().max() <= (6 / 4) ** 0.5 and b.abs().max() <= (6 / 2) ** 0.5  # Kaiming-uniform bounds
    perturb(net, scale=1.0)
    x = torch.randn(5, 4)
    expected = net.layers[1].base_layer(x) + down.vera_lambda_b * ((down.vera_lambda_d * (x @ a.T)) @ b[:2].T)
    torch.testing.assert_close(net.layers[1](x), expected)
    x = torch.randn(5, 3)
    expected = net.layers[0].base_layer(x) + up.vera_lambda_b * ((up.vera_lambda_d * (x @ a[:, :3].T)) @ b.T)
    torch.testing.assert_close(net.layers[0](x), expected)


def test_projections_are_one_module_shared_by_reference_and_move_with_the_model():
    model = build("bert")
    batch = inputs("bert")
    dt.apply(model, dt.VeraConfig(r=4))
    perturb(model)
    expected = output(model, batch)
    deltas = vera_deltas(model)
    assert len(deltas) == 2 * LAYERS and len({id(d.projections) for d in deltas}) == 1
    assert [type(m) for m in model.modules() if isinstance(m, VeraProjections)] == [VeraProjections]
    assert not [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]  # not repeated per layer
    model.to(torch.float64)
    assert len({d.projections.vera_A.data_ptr() for d in deltas}) == 1
    assert deltas[-1].projections.vera_B.dtype == torch.float64
    assert_close_ulps(output(model, batch).float(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_projections_follow_the_model_to_the_gpu():
    model = build("gpt2")
    batch = inputs("gpt2")
    dt.apply(model, dt.VeraConfig(r=4, target_modules="all-linear"))
    perturb(model, scale=1.0)
    expected = output(model, batch)
    model.to("cuda")
    assert all(d.projections.vera_A.is_cuda and d.projections.vera_B.is_cuda for d in vera_deltas(model))
    got = output(model, {k: v.cuda() for k, v in batch.items()}).cpu()
    assert_close_ulps(got, expected)  # another device sums in another order: rounding only
    dt.merge(model)
    assert_close_ulps(output(model, {k: v.cuda() for k, v in batch.items()}).cpu(), expected)


def test_adapters_with_other_seeds_have_their_own_projections():
    model = build("bert")
    dt.apply(model, dt.VeraConfig(r=4, projection_prng_key=1), adapter_name="one")
    dt.apply(model, dt.VeraConfig(r=4, projection_prng_key=2), adapter_name="two")
    layer = next(layer for _, layer in iter_layers(model))
    one, two = layer.deltas["one"].projections, layer.deltas["two"].projections
    assert one is not two and not torch.equal(one.vera_A, two.vera_A)
    assert dt.adapter_state_dict(model, "two")["vera_A"] is two.vera_A


# --- counts -------------------------------------------------------------------------------

def test_counts_by_hand_on_bert():
    """Queries and values (d = 32) of 2 layers, r = 4: r + d per layer trained; A (4 x 32)
    and B (32 x 4) once, regenerable from the seed and stored only with save_projection."""
    model = dt.apply(build("bert"), dt.VeraConfig(r=4, modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    vectors, projections, head = 2 * LAYERS * (4 + HIDDEN), 4 * HIDDEN + HIDDEN * 4, HIDDEN * 3 + 3
    assert (vectors, projections) == (144, 256)
    assert (report.trainable, report.stored, report.regenerable, report.not_stored) == (
        vectors + head, vectors + projections + head, projections, 0)
    assert report.changed == 2 * LAYERS * HIDDEN * HIDDEN + head
    assert "regenerable from the config: 256" in str(report)

    report = dt.parameter_report(dt.apply(build("bert"), dt.VeraConfig(r=4, save_projection=False)))
    assert (report.trainable, report.stored, report.regenerable) == (vectors, vectors, projections)


def test_counts_by_hand_on_gpt2_conv1d():
    """c_attn maps 32 -> 96 (fused q, k, v): r + 96 per layer; A 4 x 32, B 96 x 4."""
    report = dt.parameter_report(dt.apply(build("gpt2"), dt.VeraConfig(r=4)))
    assert (report.trainable, report.stored, report.regenerable) == (2 * 100, 200 + 128 + 384, 128 + 384)
    assert report.changed == 2 * HIDDEN * 3 * HIDDEN


def test_the_file_holds_projections_only_when_asked(tmp_path):
    for save in (True, False):
        model = dt.apply(build("gpt2"), dt.VeraConfig(r=4, save_projection=save))
        dt.save_adapter(model, tmp_path / str(save))
        keys = set(load_file(tmp_path / str(save) / "adapter_model.safetensors"))
        assert ({"vera_A", "vera_B"} <= keys) == save
        assert "transformer.h.0.attn.c_attn.vera_lambda_b" in keys and len(keys) == 4 + 2 * save


# --- parity with Hugging Face peft --------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices (fan_in_fan_out, PRNG)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapters_load_with_equal_outputs_and_back(family, save_projection, tmp_path):
    batch = inputs(family)
    base = output(build(family), batch)
    theirs = peft.get_peft_model(build(family), peft.VeraConfig(r=4, projection_prng_key=5,
                                                                save_projection=save_projection))
    perturb(theirs, scale=1.0)
    expected = output(theirs.eval(), batch)
    assert (expected - base).abs().max() > 0.1 * base.abs().max()  # the vectors do something
    theirs.save_pretrained(tmp_path / "peft")
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= peft_keys) == save_projection

    ours = dt.load_adapter(build(family), tmp_path / "peft")  # without projections: drawn from the seed
    assert (output(ours, batch) - expected).abs().max() <= 1e-5
    assert dt.parameter_report(ours).stored == sum(
        t.numel() for t in load_file(tmp_path / "peft" / "adapter_model.safetensors").values())

    dt.save_adapter(ours, tmp_path / "back", format="peft")
    assert set(load_file(tmp_path / "back" / "adapter_model.safetensors")) == peft_keys
    again = peft.PeftModel.from_pretrained(build(family), tmp_path / "back").eval()
    assert (output(again, batch) - expected).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("save_projection", [True, False])
def test_deltatune_adapters_run_the_same_in_peft(save_projection, tmp_path):
    model = dt.apply(build("gpt2"), dt.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], projection_prng_key=3,
                                                 save_projection=save_projection))
    perturb(model, scale=1.0)
    batch = inputs("gpt2")
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["fan_in_fan_out"], config["save_projection"]) == ("VERA", True, save_projection)
    theirs = peft.PeftModel.from_pretrained(build("gpt2"), tmp_path / "out").eval()
    assert (output(theirs, batch) - expected).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_peft_features_deltatune_lacks_are_refused(tmp_path):
    peft.get_peft_model(build("bert"), peft.VeraConfig(r=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0]}))
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.AdapterFileError, match="layers_to_transform"):
        dt.load_adapter(model, tmp_path)
    assert sorted(model.state_dict()) == keys


def test_stored_projections_win_over_the_seed(tmp_path):
    """A file that holds A and B pins them: a load uses the file's, not the seed's."""
    model = dt.apply(build("bert"), dt.VeraConfig(r=4))
    perturb(model)
    with torch.no_grad():
        vera_deltas(model)[0].projections.vera_A.mul_(-2)  # no longer what the seed draws
    batch = inputs("bert")
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "pinned")
    fresh = dt.load_adapter(build("bert"), tmp_path / "pinned")
    assert_close_ulps(output(fresh, batch), expected)
