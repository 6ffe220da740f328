"""peft-format adapters both ways, checked against the real peft package."""

from __future__ import annotations

import json

import peft
import pytest
from safetensors.torch import load_file

import deltatune as dt
from tiny import build, inputs, output, perturb

CASES = {
    "lora-rslora-bias-head": ("bert", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
        bias="lora_only", use_rslora=True)),
    "lora-all-bias": ("bert", lambda: peft.LoraConfig(r=2, target_modules=["key", "dense"], bias="all")),
    "lora-gpt2-conv1d": ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                         fan_in_fan_out=True)),
    "lora-regex": ("llama", lambda: peft.LoraConfig(r=4, target_modules=r".*\.(q_proj|v_proj)")),
    "ia3": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    "prompt-seq-cls": ("bert", lambda: peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=32, num_transformer_submodules=1,
        num_attention_heads=4, num_layers=2)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", CASES)
def test_peft_files_load_in_deltatune_and_back(name, tmp_path):
    family, make_config = CASES[name]
    batch = inputs(family)
    peft_model = peft.get_peft_model(build(family), make_config())
    perturb(peft_model)
    expected = output(peft_model.eval(), batch)
    peft_model.save_pretrained(tmp_path / "from-peft")

    ours = build(family)
    dt.load_adapter(ours, tmp_path / "from-peft")
    assert (output(ours, batch) - expected).abs().max() <= 1e-5

    dt.save_adapter(ours, tmp_path / "to-peft", format="peft")
    again = peft.PeftModel.from_pretrained(build(family), tmp_path / "to-peft").eval()
    assert (output(again, batch) - expected).abs().max() <= 1e-5
    peft_file = load_file(tmp_path / "from-peft" / "adapter_model.safetensors")
    assert dt.parameter_report(ours).stored == sum(t.numel() for t in peft_file.values())


def test_unsupported_peft_features_are_refused_not_dropped(tmp_path):
    model = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    model.save_pretrained(tmp_path)
    fresh = build("bert")
    with pytest.raises(dt.AdapterFileError, match="use_dora"):
        dt.load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "_deltatune_state")


def test_fields_of_a_newer_peft_are_ignored_with_a_warning(tmp_path):
    model = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "quantum_rank": 3}))
    with pytest.warns(UserWarning, match="quantum_rank"):
        dt.load_adapter(build("bert"), tmp_path)


def test_methods_without_a_peft_layout_are_refused(tmp_path):
    model = build("bert")
    dt.apply(model, dt.LayerTuningConfig(top_k=1))
    with pytest.raises(dt.AdapterFileError, match="no peft format"):
        dt.save_adapter(model, tmp_path, format="peft")
