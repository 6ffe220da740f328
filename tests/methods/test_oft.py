"""OFT: the rotation by hand (exact Cayley and peft's series), counts, merging, block dropout,
refusals, GPT-2's Conv1D kept out of peft."""

from __future__ import annotations

import json

import peft
import pytest
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


def skew(values: list[float], k: int) -> torch.Tensor:
    q = torch.zeros(k, k)
    q[tuple(torch.triu_indices(k, k, 1))] = torch.tensor(values)
    return q - q.T


def test_the_exact_cayley_rotation_is_orthogonal_and_rotates_the_input_block_by_block():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.OFTConfig(oft_block_size=3, target_modules=["proj"], use_cayley_neumann=False))
    delta = model.proj.deltas["default"]
    with torch.no_grad():
        delta.oft_R.weight.copy_(torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]]))
    eye = torch.eye(3)
    blocks = [(eye - q) @ torch.linalg.inv(eye + q) for q in (skew([0.1, -0.2, 0.3], 3), skew([0.4, 0.0, -0.5], 3))]
    rotation = torch.block_diag(*blocks)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(6))  # orthogonal
    x = torch.randn(4, 6)
    W0, b = model.proj.base_layer.weight.detach(), model.proj.base_layer.bias.detach()
    torch.testing.assert_close(model(x), (x @ rotation) @ W0.T + b)
    # the rows of W0 R^T keep their pairwise angles: the Gram matrix is unchanged
    rotated = W0 @ rotation.T
    torch.testing.assert_close(rotated @ rotated.T, W0 @ W0.T)


def test_the_default_series_is_peft_s_truncated_cayley_transform():
    model = dt.apply(Net(), dt.OFTConfig(r=2, oft_block_size=0, target_modules=["proj"]))
    delta = model.proj.deltas["default"]
    with torch.no_grad():
        delta.oft_R.weight.copy_(torch.tensor([[0.05, 0.1, -0.02], [0.0, 0.03, 0.07]]))
    q = skew([0.05, 0.1, -0.02], 3)
    eye = torch.eye(3)
    series = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q  # five terms
    torch.testing.assert_close(delta.rotations()[0].detach(), series)
    exact = (eye + q) @ torch.linalg.inv(eye - q)
    assert (series - exact).abs().max() < 1e-3  # near the transform it truncates
    assert (series - exact).abs().max() > 1e-7


def test_counts_on_tiny_bert():
    model = dt.apply(build("bert"), dt.OFTConfig(oft_block_size=8, modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    per_layer = (HIDDEN // 8) * 8 * 7 // 2  # 4 blocks of 28 numbers
    assert report.trainable == report.stored == LAYERS * 2 * per_layer + HIDDEN * 3 + 3
    shared = dt.apply(build("bert"), dt.OFTConfig(oft_block_size=8, block_share=True))
    assert dt.parameter_report(shared).trainable == LAYERS * 2 * 28


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_merges():
    assert_fresh_is_base_and_trained_merges(dt.OFTConfig(oft_block_size=4, target_modules="all-linear"),
                                            lambda m: m.model.layers[0].mlp.down_proj.base_layer.weight, scale=0.2)


def test_module_dropout_replaces_that_fraction_of_the_blocks_by_the_identity():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.OFTConfig(oft_block_size=2, target_modules=["proj"], module_dropout=0.5))
    perturb(model, scale=0.5)
    delta = model.proj.deltas["default"]
    blocks = delta.rotations().detach()
    model.train()
    for _ in range(5):
        dropped = delta._dropped(blocks)
        identity = [torch.equal(block, torch.eye(2)) for block in dropped]
        assert sum(identity) == 1  # int(0.5 * 3) of the 3 blocks
        assert all(torch.equal(d, b) for d, b, i in zip(dropped, blocks, identity) if not i)
    model.eval()
    assert torch.equal(delta._dropped(blocks), blocks)


def test_gpt2_conv1d_layers_train_here_and_are_kept_out_of_peft(tmp_path):
    assert_conv1d_trains_here_but_not_in_peft(dt.OFTConfig(oft_block_size=8, target_modules=["c_attn", "c_fc"]),
                                              "peft's OFT has no Conv1D layer", tmp_path, scale=0.3)


def test_block_sizes_that_do_not_divide_the_input_are_refused_with_a_divisor():
    with pytest.raises(dt.ConfigError, match="exactly one of them"):
        dt.OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(dt.ConfigError, match="one of them sets the blocks"):
        dt.OFTConfig(r=0, oft_block_size=0)
    model = build("bert")
    with pytest.raises(dt.ConfigError, match=r"(?s)oft_block_size = 12 does not divide the 32 inputs .*oft_block_size: 8"):
        dt.apply(model, dt.OFTConfig(oft_block_size=12))
    assert not hasattr(model, "_deltatune_state")


@pytest.mark.filterwarnings("ignore")
def test_a_peft_file_of_the_series_before_peft_0_18_is_refused(tmp_path):
    peft.get_peft_model(build("bert"), peft.OFTConfig(oft_block_size=8, target_modules=["query"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.17.1"}))
    with pytest.raises(dt.AdapterFileError, match="saved before peft 0.18.0"):
        dt.load_adapter(build("bert"), tmp_path)
