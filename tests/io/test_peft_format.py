"""peft-format adapters both ways, checked against the real peft package."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import deltatune as dt
from deltatune.cli import main
from deltatune.io.convert import convert
from tiny import assert_close_ulps, build, inputs, output, perturb, shown_at

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
    "prefix-gpt2": ("gpt2", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "ln-tuning-bert-head": ("bert", lambda: peft.LNTuningConfig(target_modules=["LayerNorm"],
                                                                modules_to_save=["classifier"])),
    "ln-tuning-gpt2": ("gpt2", lambda: peft.LNTuningConfig()),  # peft's default targets: ln_1, ln_2, ln_f
    "ln-tuning-llama": ("llama", lambda: peft.LNTuningConfig()),
    # (ranks cut by peft's own allocator: tests/methods/test_adalora.py)
    "adalora-bert-head": ("bert", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=16,
                                                             target_modules=["query", "value", "dense"],
                                                             modules_to_save=["classifier"])),
    "adalora-gpt2-conv1d": ("gpt2", lambda: peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10,
                                                               target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "adalora-llama": ("llama", lambda: peft.AdaLoraConfig(init_r=2, target_r=1, total_step=10,
                                                          target_modules=["q_proj", "v_proj", "down_proj"])),
    "oft-bert-head": ("bert", lambda: peft.OFTConfig(oft_block_size=8, target_modules=["query", "value", "dense"],
                                                     modules_to_save=["classifier"])),
    "oft-llama-exact-r": ("llama", lambda: peft.OFTConfig(r=2, oft_block_size=0, use_cayley_neumann=False,
                                                          target_modules=["q_proj", "v_proj", "down_proj"])),
    "oft-bert-shared-3-terms": ("bert", lambda: peft.OFTConfig(oft_block_size=4, block_share=True,
                                                               num_cayley_neumann_terms=3, target_modules=["key"])),
    "loha-bert-head": ("bert", lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["query", "value", "dense"],
                                                       modules_to_save=["classifier"])),
    "loha-llama": ("llama", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # r = 2 against factors of 4 x 8: W2 a low-rank product, W1 whole; decompose_both splits W1 too
    "lokr-bert-head": ("bert", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["query", "value", "dense"],
                                                       modules_to_save=["classifier"])),
    "lokr-llama-both-lycoris": ("llama", lambda: peft.LoKrConfig(
        r=1, alpha=2, target_modules=["q_proj", "v_proj", "down_proj"], decompose_both=True, init_weights="lycoris",
        rank_dropout_scale=True)),
    "lokr-bert-factor-4": ("bert", lambda: peft.LoKrConfig(r=16, target_modules=["query", "intermediate.dense"],
                                                           decompose_factor=4)),
    # grouped-query attention (d_kv = 2 heads x 8), and a projection: the file holds its output
    "prefix-llama-projection": ("llama", lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
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
    written = json.loads((tmp_path / "to-peft" / "adapter_config.json").read_text())
    assert written["inference_mode"] is True and "revision" in written and written["revision"] is None  # as peft
    saved = written["modules_to_save"] or []
    assert len(saved) == len(set(saved))  # peft lists a SEQ_CLS head twice; we keep it once
    again = peft.PeftModel.from_pretrained(build(family), tmp_path / "to-peft").eval()
    assert (output(again, batch) - expected).abs().max() <= 1e-5
    peft_file = load_file(tmp_path / "from-peft" / "adapter_model.safetensors")
    assert dt.parameter_report(ours).stored == sum(t.numel() for t in peft_file.values())


def test_unsupported_peft_features_are_refused_not_dropped(tmp_path):
    model = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                               rank_pattern={"value": 2}))
    model.save_pretrained(tmp_path)
    fresh = build("bert")
    with pytest.raises(dt.AdapterFileError, match="rank_pattern"):
        dt.load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "_deltatune_state")


def test_fields_of_a_newer_peft_are_ignored_with_a_warning(tmp_path):
    model = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # unknown and set: named, sorted; unknown but empty or off: nothing to ignore
    config = {**config, "quantum_rank": 3, "alpha_mode": "x", "future_flag": False, "future_list": []}
    for optional in ("lora_dropout", "bias", "use_rslora", "modules_to_save"):  # an older peft may leave them out
        del config[optional]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = build("bert")
    with pytest.warns(UserWarning) as caught:
        dt.load_adapter(model, tmp_path)
    assert [str(w.message) for w in caught] == ["ignoring peft config fields deltatune does not know: alpha_mode, "
                                                "quantum_rank"]
    assert shown_at(caught[0], __file__)  # at the user's call, not inside deltatune
    loaded = dt.core.state.require_state(model).configs["default"]
    assert (loaded.lora_dropout, loaded.bias, loaded.use_rslora) == (0.0, "none", False)  # the defaults peft uses


def test_a_gpt2_peft_adapter_converted_to_peft_again_keeps_its_layout(tmp_path):
    """GPT-2's Conv1D stores weights (in, out): peft's fan_in_fan_out travels through a conversion."""
    model = peft.get_peft_model(build("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    perturb(model)
    model.save_pretrained(tmp_path / "peft")
    expected = output(model.eval(), inputs("gpt2"))
    convert(tmp_path / "peft", tmp_path / "again", "peft")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_close_ulps(output(peft.PeftModel.from_pretrained(build("gpt2"), tmp_path / "again").eval(),
                                      inputs("gpt2")), expected)


def test_methods_without_a_peft_layout_are_refused(tmp_path):
    model = build("bert")
    dt.apply(model, dt.LayerTuningConfig(top_k=1))
    with pytest.raises(dt.AdapterFileError) as info:
        dt.save_adapter(model, tmp_path / "peft", format="peft")
    assert str(info.value) == "'layer' adapters have no peft format that deltatune writes.\n  fix: keep the deltatune format."
    assert not (tmp_path / "peft").exists()


# --- prefix tuning -----------------------------------------------------------------------

def in_peft(family: str, path) -> torch.Tensor:
    return output(peft.PeftModel.from_pretrained(build(family), path).eval(), inputs(family))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trained_prefixes_give_the_same_outputs_in_peft(family, tmp_path):
    """Through the MLP (folded into the file), with the input's positions after the prefixes."""
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=3, hidden=16))
    perturb(model, scale=1.0)
    expected = output(model, inputs(family))
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = ("peft_type", "task_type", "prefix_projection", "num_layers")
    assert [config[f] for f in fields] == ["PREFIX_TUNING", "CAUSAL_LM", False, 2]
    assert (in_peft(family, tmp_path) - expected).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_prefix_conversion_on_the_command_line_both_ways(tmp_path):
    """peft -> deltatune without a model (prefixes stacked in layer order) -> peft, and back."""
    peft_model = peft.get_peft_model(build("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=3))
    perturb(peft_model, scale=1.0)
    expected = output(peft_model.eval(), inputs("llama"))
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "native"), "--to", "deltatune"]) == 0
    loaded = dt.load_adapter(build("llama"), tmp_path / "native")
    assert (output(loaded, inputs("llama")) - expected).abs().max() <= 1e-5
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "again"), "--to", "peft"]) == 0
    assert (in_peft("llama", tmp_path / "again") - expected).abs().max() <= 1e-5
    dt.save_adapter(loaded, tmp_path / "saved")
    assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "third"), "--to", "peft"]) == 0
    assert (in_peft("llama", tmp_path / "third") - expected).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family,config", [
    ("gpt2", dt.PrefixTuningConfig(num_virtual_tokens=3, hidden=16)),
    ("bert", dt.PromptTuningConfig(num_virtual_tokens=3, init="random")),
])
def test_models_without_a_head_are_written_for_feature_extraction(family, config, tmp_path):
    """Without a task_type peft would load a prompt or prefix into a plain PeftModel, which ignores it."""
    model = dt.apply(build(family).base_model, config)
    perturb(model, scale=1.0)
    with torch.no_grad():
        expected = model(**inputs(family)).last_hidden_state
    dt.save_adapter(model, tmp_path, format="peft")
    again = peft.PeftModel.from_pretrained(build(family).base_model, tmp_path).eval()
    with torch.no_grad():
        got = again(**inputs(family)).last_hidden_state
    assert type(again).__name__ == "PeftModelForFeatureExtraction"
    got = got[:, -expected.shape[1]:]  # peft's prompt tuning returns the prompt's positions too
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_prefix_layers_keep_their_order_past_ten(tmp_path):
    """A file's keys come back sorted as text (h.10 before h.2); peft's layers are in model order."""
    def gpt2_11_layers():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=16, n_layer=11, n_head=2, n_positions=32)).eval()

    model = dt.apply(gpt2_11_layers(), dt.PrefixTuningConfig(num_virtual_tokens=2, reparameterize=False))
    perturb(model, scale=1.0)
    batch = inputs("gpt2")
    dt.save_adapter(model, tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    again = peft.PeftModel.from_pretrained(gpt2_11_layers(), tmp_path / "peft").eval()
    assert (output(again, batch) - output(model, batch)).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family,match", [
    ("bert", "no peft format with the same outputs"),  # peft shifts positions; encoders here do not
    ("t5", "no peft format with the same outputs"),  # prefixes in its encoder; peft prefixes the decoder only
])
def test_prefixes_peft_would_run_differently_are_not_written(family, match, tmp_path):
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family,task,match", [
    ("bert", "SEQ_CLS", "would not give peft's outputs"), ("t5", "SEQ_2_SEQ_LM", "encoder-decoder"),
])
def test_peft_prefixes_that_would_run_differently_are_not_loaded(family, task, match, tmp_path):
    peft.get_peft_model(build(family), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)
                        ).save_pretrained(tmp_path)
    fresh = build(family)
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "_deltatune_state") and not any(m._forward_pre_hooks for m in fresh.modules())


@pytest.mark.filterwarnings("ignore")
def test_a_peft_prefix_config_that_does_not_fit_its_weights_is_refused(tmp_path):
    peft.get_peft_model(build("gpt2"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
                        ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(dt.AdapterFileError, match="does not belong to these weights"):
        dt.load_adapter(build("gpt2"), tmp_path)
