"""A base model loaded quantised by bitsandbytes (4-bit NF4 and 8-bit) through transformers: the
adapters that leave it frozen train, save and load; what would train or merge into its packed
weights is refused before anything changes; the report counts values, not packed bytes."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.quantized import weight_values
from tiny import VOCAB, inputs, output, perturb, snapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes looks for a hub kernel on import
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

QUANTIZATIONS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


def llama():
    """A small LLaMA whose layers are as wide as bitsandbytes' CPU kernels need (64 inputs: a block)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    llama().save_pretrained(path)
    return path


def quantized(path, kind: str):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATIONS[kind]).eval()


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_the_report_counts_the_values_a_quantised_base_holds(llama_dir, kind):
    model = quantized(llama_dir, kind)
    packed = sum(p.numel() for p in model.parameters())
    unquantised = sum(p.numel() for p in llama().parameters())
    assert dt.parameter_report(model).total == unquantised
    if kind == "nf4":
        assert packed < unquantised  # two 4-bit values per stored byte


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("config", [dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                    dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]),
                                    dt.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    dt.AdapterConfig(bottleneck=8), dt.PromptTuningConfig(num_virtual_tokens=3),
                                    dt.PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["lora", "ia3", "vera", "adapter", "prompt", "prefix"])
def test_frozen_base_methods_train_save_and_load_on_a_quantised_base(llama_dir, kind, config, tmp_path):
    model, batch = dt.apply(quantized(llama_dir, kind), config), inputs("llama")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # the adapter in full precision
    frozen = snapshot(model)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    model.eval()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), frozen[n])]
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)  # only the adapter moved
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path)
    again = dt.load_adapter(quantized(llama_dir, kind), tmp_path)
    torch.testing.assert_close(output(again, batch), expected, rtol=0, atol=0)
    # the same base unquantised takes it too (the fingerprint hashes the shapes of the values)
    full = dt.load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path)
    ours, theirs = dt.adapter_state_dict(again), dt.adapter_state_dict(full)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("config", [dt.FullFineTuningConfig(), dt.LayerTuningConfig(top_k=1)], ids=["full", "layer"])
def test_methods_that_train_the_packed_weights_are_refused_before_anything_changes(llama_dir, config):
    model = quantized(llama_dir, "nf4")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.ConfigError, match=r"(?s)is stored quantised \(Params4bit, torch.uint8.*cannot take gradients.*"
                                             r"without quantization_config"):
        dt.apply(model, config)
    assert not hasattr(model, "_deltatune_state")
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters() if not p.is_floating_point())


def quantisation_bound(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far from ``values`` quantising them like ``weight`` may round each one: half the widest
    gap between the 4-bit code's levels times its block's absmax, or half an 8-bit step of its row
    (whose values bitsandbytes rounds to float16 first)."""
    if weight.dtype == torch.int8:
        row_max = values.abs().amax(dim=1, keepdim=True)
        return (row_max / 127 / 2 + values.abs() * 2.0**-11 + row_max * 2.0**-11).expand_as(values)
    levels = weight.quant_state.code.float().sort().values
    blocks = values.reshape(-1, weight.quant_state.blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return (absmax * (levels.diff().max() / 2) * (1 + 2.0**-20)).expand_as(blocks).reshape(values.shape)


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_merge_into_a_quantised_base_rounds_once_and_unmerging_gives_the_codes_back(llama_dir, kind, use_dora):
    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    model, batch = dt.apply(quantized(llama_dir, kind), config), inputs("llama")
    perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    delta, base = layer.deltas["default"], layer.base_layer
    before = output(model, batch)
    codes = base.weight.data.clone()  # after a forward: bitsandbytes repacks 4-bit codes for its CPU kernel at the first
    with torch.no_grad():  # what the merged weight should hold before it is quantised again
        w0 = weight_values(base).float()
        exact = w0 + delta.delta_weight()
        if use_dora:
            exact = exact * (delta.lora_magnitude_vector / exact.norm(dim=1))[:, None]
    dt.merge(model)
    assert not torch.equal(base.weight.data, codes)  # quantised again, with the update in it
    error = (weight_values(base).float() - exact).abs()
    assert (error <= quantisation_bound(exact, base.weight)).all()
    assert error.max() > 0  # it did round: the merged model is close to, not equal to, the unmerged one
    dt.unmerge(model)
    assert torch.equal(base.weight.data, codes)
    torch.testing.assert_close(output(model, batch), before, rtol=0, atol=0)


def test_a_failed_merge_leaves_every_quantised_layer_as_it_was(llama_dir, monkeypatch):
    model, batch = dt.apply(quantized(llama_dir, "nf4"), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), inputs("llama")
    perturb(model)
    before = output(model, batch)
    codes = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}
    last, merge = model.model.layers[1].self_attn.v_proj.deltas["default"], type(model.model.layers[1].self_attn.v_proj.deltas["default"]).merge

    def merge_but_the_last(self, base):
        merge(self, base)  # the last layer's weight changes before the failure: the codes must still come back
        if self is last:
            raise RuntimeError("disk full")

    monkeypatch.setattr(type(last), "merge", merge_but_the_last)
    with pytest.raises(RuntimeError, match="disk full"):
        dt.merge(model)
    after = {n: p.detach() for n, p in model.named_parameters() if not p.is_floating_point()}
    assert after.keys() == codes.keys() and all(torch.equal(after[n], codes[n]) for n in codes)
    torch.testing.assert_close(output(model, batch), before, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_qlora_adapter_loads_in_peft_on_its_own_quantised_base_and_back(llama_dir, kind, use_dora, tmp_path):
    import peft

    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    model, batch = dt.apply(quantized(llama_dir, kind), config), inputs("llama")
    perturb(model)
    # in training mode (no dropout here): in eval bitsandbytes repacks 4-bit codes for its CPU kernel at the first
    # forward, and peft 0.21's DoRA then dequantises the repacked codes as if they were not (its outputs go wrong)
    model.train()
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(quantized(llama_dir, kind), tmp_path / "peft").train()
    assert (output(theirs, batch) - expected).abs().max() <= 1e-5
    theirs.save_pretrained(tmp_path / "from-peft")
    again = dt.load_adapter(quantized(llama_dir, kind), tmp_path / "from-peft").train()
    assert (output(again, batch) - expected).abs().max() <= 1e-5


def test_a_quantised_task_head_is_refused_for_modules_to_save_and_one_left_out_trains(llama_dir):
    from transformers import AutoModelForSequenceClassification

    def classifier(**skip):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **skip)
        return AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=2, quantization_config=quantization)

    config = dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"])
    model = classifier(llm_int8_skip_modules=["lm_head"])  # a list of one's own: the head is quantised too
    assert type(model.score).__name__ == "Linear4bit"
    with pytest.raises(dt.ConfigError, match=r"(?s)'score' in modules_to_save is quantised \('score' is a Linear4bit\).*"
                                             r"llm_int8_skip_modules=\['score'\]"):
        dt.apply(model, config)
    assert not hasattr(model, "_deltatune_state")
    model = dt.apply(classifier(llm_int8_skip_modules=["score"]), config)  # (transformers' default skips it too)
    assert model.score.deltas["default"].copy.weight.requires_grad


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_pissa_which_rewrites_w0_is_refused_on_quantised_layers(llama_dir, kind):
    model = quantized(llama_dir, kind)
    with pytest.raises(dt.ConfigError, match=r"(?s)PiSSA rewrites W0.*holds W0 quantised.*unquantised base.*DoRA"):
        dt.apply(model, dt.LoraConfig(r=2, init="pissa", target_modules=["q_proj"]))
    assert not hasattr(model, "_deltatune_state")
