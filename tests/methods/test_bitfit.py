"""BitFit: which biases train, counts, file keys, a training step, merging by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from tiny import HIDDEN, LAYERS, assert_close_ulps, build, inputs, output, perturb

# embeddings LayerNorm + per layer (q, k, v, attention out, 2 LayerNorms, output: 7 x d; intermediate 64) + pooler
BERT_BIASES = HIDDEN + LAYERS * (7 * HIDDEN + 64) + HIDDEN
# per block ln_1, c_attn (3 d), attn.c_proj, ln_2, mlp.c_fc (4 d), mlp.c_proj; then ln_f
GPT2_BIASES = LAYERS * (HIDDEN + 3 * HIDDEN + HIDDEN + HIDDEN + 4 * HIDDEN + HIDDEN) + HIDDEN


def base_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}


def test_counts_on_tiny_bert_with_the_head_saved():
    model = build("bert")
    base_total = sum(p.numel() for p in model.parameters())
    dt.apply(model, dt.BitFitConfig(modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    head = HIDDEN * 3 + 3
    assert report.trainable == report.stored == BERT_BIASES + head == 739
    assert report.changed == BERT_BIASES + head
    assert report.total == base_total + BERT_BIASES + head


def test_without_modules_to_save_the_head_bias_trains_too():
    report = dt.parameter_report(dt.apply(build("bert"), dt.BitFitConfig()))
    assert report.trainable == report.stored == BERT_BIASES + 3


def test_gpt2_biases_of_conv1d_and_layer_norm():
    model = dt.apply(build("gpt2"), dt.BitFitConfig())
    assert dt.parameter_report(model).trainable == GPT2_BIASES
    assert not isinstance(model.lm_head, DeltaLayer)  # tied to the embedding, no bias


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_architectures_without_biases_are_refused(family):
    model = build(family)
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match="bitfit found no bias to train") as info:
        dt.apply(model, dt.BitFitConfig())
    assert "lora or ia3" in info.value.hint
    assert sorted(model.state_dict()) == keys


def test_biases_not_added_on_the_last_axis_are_skipped():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    dt.apply(model, dt.BitFitConfig())
    assert isinstance(model[2], DeltaLayer) and not isinstance(model[0], DeltaLayer)
    with pytest.raises(dt.ConfigError, match="outside modules_to_save"):
        dt.apply(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(4, 2)),
                 dt.BitFitConfig(modules_to_save=["2"]))


def test_the_file_holds_the_bias_change_under_the_bias_key():
    model = dt.apply(build("bert"), dt.BitFitConfig(modules_to_save=["classifier"]))
    tensors = dt.adapter_state_dict(model)
    assert set(tensors) == set(base_biases(build("bert"))) | {"classifier.weight"}
    assert torch.all(tensors["bert.encoder.layer.0.attention.self.query.bias"] == 0)  # a change, not a bias


def test_a_step_changes_only_the_bias_deltas():
    model = dt.apply(build("bert"), dt.BitFitConfig())
    batch = inputs("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**batch).logits.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".deltas.default.bias") for n in changed)
    assert "bert.pooler.dense.deltas.default.bias" in changed


def test_merge_adds_the_change_to_the_base_bias():
    model = dt.apply(build("gpt2"), dt.BitFitConfig())
    perturb(model)
    batch = inputs("gpt2")
    expected, before = output(model, batch), base_biases(build("gpt2"))
    changes = {k: v.detach().clone() for k, v in dt.adapter_state_dict(model).items()}
    plain = dt.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
    after = base_biases(plain)
    assert set(after) == set(before) == set(changes)
    for key, change in changes.items():
        torch.testing.assert_close(after[key], before[key] + change)
    assert_close_ulps(output(plain, batch), expected)
