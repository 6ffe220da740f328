"""LN tuning: which layers train, counts by hand, the layers peft picks, merging, the file's keys."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from tiny import HIDDEN, LAYERS, assert_close_ulps, build, inputs, output, perturb

pytestmark = pytest.mark.filterwarnings("ignore")  # peft warns about the tiny models

# BERT: the embeddings' LayerNorm and two per layer, each a scale and a shift of width d
BERT_NORMS = (1 + 2 * LAYERS) * 2 * HIDDEN


def adapted(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, DeltaLayer))


def test_counts_on_tiny_bert_with_the_head_saved():
    model = dt.apply(build("bert"), dt.LNTuningConfig(modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    head = HIDDEN * 3 + 3
    assert report.trainable == report.stored == BERT_NORMS + head
    assert report.changed == BERT_NORMS + head  # merged, the norms and the head differ from the base


def test_rms_norms_train_their_scale_alone():
    """LLaMA's RMSNorm has a scale and no shift: d per norm, two per layer and the final one."""
    model = dt.apply(build("llama"), dt.LNTuningConfig())
    assert dt.parameter_report(model).trainable == (2 * LAYERS + 1) * HIDDEN


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_the_default_layers_are_the_ones_peft_picks(family):
    ours = adapted(dt.apply(build(family), dt.LNTuningConfig()))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in
                    peft.get_peft_model(build(family), peft.LNTuningConfig()).named_modules()
                    if type(m).__name__ == "LNTuningLayer")
    assert ours == theirs and ours


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_merges_exactly():
    model, batch = build("bert"), inputs("bert")
    base_out = output(model, batch)
    dt.apply(model, dt.LNTuningConfig())
    torch.testing.assert_close(output(model, batch), base_out, rtol=0, atol=0)  # copies of the base values
    perturb(model)
    expected = output(model, batch)
    assert (expected - base_out).abs().max() > 1e-3
    norm = model.bert.encoder.layer[0].output.LayerNorm
    original = norm.base_layer.weight.detach().clone()
    dt.merge(model)
    torch.testing.assert_close(norm.base_layer.weight.detach(), norm.deltas["default"].copy.weight.detach(),
                               rtol=0, atol=0)
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    torch.testing.assert_close(norm.base_layer.weight.detach(), original, rtol=0, atol=0)


def test_the_file_holds_the_copies_under_the_norms_own_keys_and_peft_reads_them(tmp_path):
    model, batch = dt.apply(build("bert"), dt.LNTuningConfig(modules_to_save=["classifier"])), inputs("bert")
    perturb(model)
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {"bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias", "classifier.weight"} <= keys
    dt.save_adapter(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(build("bert"), tmp_path / "peft").eval()
    assert "base_model.model.bert.embeddings.LayerNorm.ln_tuning_layers.weight" in load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert (output(theirs, batch) - expected).abs().max() <= 1e-5


def test_no_norm_outside_modules_to_save_is_refused():
    model = build("bert")
    with pytest.raises(dt.TargetError, match="matches no module"):
        dt.apply(model, dt.LNTuningConfig(target_modules=["layernorm_that_is_not_there"]))
    with pytest.raises(dt.ConfigError, match="target_modules is empty"):
        dt.LNTuningConfig(target_modules=[])
