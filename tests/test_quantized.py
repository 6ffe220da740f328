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
from deltatune.core.layer import DeltaLayer
from deltatune.core.quantized import weight_values
from tiny import VOCAB, assert_close_ulps, inputs, output, perturb, snapshot

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
                                    dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_rslora=True),
                                    dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]),
                                    dt.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    dt.AdapterConfig(bottleneck=8), dt.PromptTuningConfig(num_virtual_tokens=3),
                                    dt.PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["lora", "rslora", "ia3", "vera", "adapter", "prompt", "prefix"])
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
def test_merge_and_unload_of_a_quantised_base_is_the_merged_model_without_wrappers(llama_dir, kind):
    model, batch = dt.apply(quantized(llama_dir, kind), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), inputs("llama")
    perturb(model)
    dt.merge(model)
    merged = output(model, batch)
    dt.unmerge(model)
    plain = dt.merge_and_unload(model)  # the same re-quantisation, then the wrappers removed
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert torch.equal(output(plain, batch), merged)
    # trainable as a loaded model is, except the integer codes, which cannot require gradients
    assert all(p.requires_grad == p.is_floating_point() for p in plain.parameters())


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


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_the_report_counts_the_quantised_bytes_with_their_scales(llama_dir, kind):
    model = dt.apply(quantized(llama_dir, kind), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    linears = [m for n, m in llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    values = sum(m.weight.numel() for m in linears)
    if kind == "nf4":  # half a byte a value, a float32 absmax per 64 values, the 16-level code table per layer
        expected = sum(m.weight.numel() // 2 + m.weight.numel() // 64 * 4 + 16 * 4 for m in linears)
    else:  # a byte a value and a float32 scale per row
        expected = sum(m.weight.numel() + m.out_features * 4 for m in linears)
    report = dt.parameter_report(model)
    assert (report.quantized, report.quantized_bytes) == (values, expected)
    floats = sum(p.numel() * 4 for n, p in llama().named_parameters() if "proj" not in n)  # embeddings, norms, head
    assert report.frozen_bytes == expected + floats
    assert report.changed == 64 * 64 * 2  # values of the two q_proj weights a merge changes, not their packed bytes
    assert f"quantised: {values:,} values" in str(report)
    plain = dt.parameter_report(dt.apply(llama(), dt.LoraConfig(r=2, target_modules=["q_proj"])))
    assert (plain.quantized, plain.quantized_bytes) == (0, 0) and "quantised" not in str(plain)
    assert plain.frozen_bytes == sum(p.numel() * 4 for p in llama().parameters())


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_adapters_share_a_quantised_base_row_by_row(llama_dir, kind):
    model, batch = quantized(llama_dir, kind), inputs("llama", batch=3)
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    dt.apply(model, dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
             adapter_name="b")
    perturb(model)
    alone = {}
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        alone[name] = output(model, batch)
    with dt.disable_adapters(model):
        alone["__base__"] = output(model, batch)
    names = ["b", "__base__", "a"]
    with dt.mixed_batch(model, names):
        mixed = output(model, batch)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=0, atol=1e-6)


def test_model_quantization_reads_bitsandbytes_names_and_refuses_what_it_cannot_be():
    from deltatune.tasks.base import task_for
    from deltatune.train.config import RunConfig, load_config

    config = load_config(None, ["model.quantization.load_in_4bit=true", "model.quantization.bnb_4bit_quant_type=nf4",
                                "model.quantization.bnb_4bit_use_double_quant=true"])
    assert RunConfig.from_dict(config.to_dict()) == config  # run.yaml reads back as the same run
    quantization = task_for(config).pretrained_kwargs()["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert (quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant) == ("nf4", True)
    assert quantization.bnb_4bit_compute_dtype == torch.float32
    assert {"classifier", "score", r".*\.pooler"} <= set(quantization.llm_int8_skip_modules)  # the head trains
    for overrides, message in [
            (["model.quantization.load_in_3bit=true"], r"unknown key 'model.quantization.load_in_3bit'.*did you mean 'load_in_8bit'"),
            (["model.quantization.load_in_4bit=true", "model.quantization.load_in_8bit=true"], "both load_in_4bit and load_in_8bit"),
            (["model.quantization.bnb_4bit_quant_type=nf4"], "neither load_in_4bit nor load_in_8bit"),
            (["model.quantization.load_in_4bit=true", "model.quantization.bnb_4bit_quant_type=int4"],
             r"model.quantization.bnb_4bit_quant_type = 'int4' has the wrong type.*'fp4' \| 'nf4'"),
            (["model.quantization=4"], r"model.quantization = 4 has the wrong type")]:
        with pytest.raises(dt.ConfigError, match=f"(?s){message}"):
            load_config(None, overrides)


def test_a_missing_bitsandbytes_is_one_line_saying_what_to_install(monkeypatch):
    from deltatune.hf.quantization import QuantizationConfig, quantization_kwargs

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    with pytest.raises(dt.ConfigError, match=r"(?s)needs bitsandbytes, which is not installed.*pip install 'deltatune\[quant\]'"):
        quantization_kwargs(QuantizationConfig(load_in_4bit=True))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_qlora_adapter_exports_merged_into_the_unquantised_base(llama_dir, dtype, tmp_path):
    from deltatune.io.export import export_merged

    model = dt.apply(quantized(llama_dir, "nf4"), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    dt.save_adapter(model, tmp_path / "adapter")
    assert dt.read_adapter(tmp_path / "adapter")[0]["base_quantization"] == {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32"}
    from deltatune.io.convert import inspect_adapter

    assert "base held:   4-bit nf4, compute float32 (bitsandbytes)" in inspect_adapter(tmp_path / "adapter").splitlines()
    export_merged(tmp_path / "adapter", tmp_path / "merged", dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16 if dtype else torch.float32}
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    full = dt.load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    batch = inputs("llama")
    if dtype is None:  # the adapter merged into the full-precision weights: the unquantised base with the adapter
        assert_close_ulps(output(merged, batch), output(full, batch))
    else:
        dt.merge(full)
        for name, param in merged.named_parameters():
            assert torch.equal(param, full.get_parameter(name.replace("q_proj.", "q_proj.base_layer.").replace(
                "v_proj.", "v_proj.base_layer.")).to(torch.bfloat16))  # merged in float32, rounded once


@pytest.mark.slow
def test_a_qlora_run_of_the_bundled_model_resumes_reloads_quantised_and_says_so(tmp_path, sentiment_csv, monkeypatch):
    """deltatune train with model.quantization on the real MiniLM: the run resumes to the same adapter
    as a straight run, records and reloads its 4-bit base, and its report counts the quantised base."""
    import json

    from safetensors.torch import load_file

    from deltatune.train.config import load_config
    from deltatune.train.inference import evaluate_run, load_run
    from deltatune.train.loop import train
    from tiny import interrupt_at_step

    def config(folder):
        return load_config(None, [
            "model.name_or_path=minilm-l6", "model.max_length=32", f"data.train_file={sentiment_csv}",
            "data.validation_size=0.15", "data.test_size=0.15", f"training.output_dir={folder}",
            "training.batch_size=16", "training.learning_rate=5e-3", "training.max_steps=10", "training.save_steps=3",
            "training.progress=false", "method.r=4", "method.lora_dropout=0.1", "training.precision=fp32",
            "training.eval_steps=4",  # training goes on after an evaluation (bitsandbytes repacks in eval)
            "model.quantization.load_in_4bit=true", "model.quantization.bnb_4bit_quant_type=nf4"])

    straight = train(config(tmp_path / "a"))
    assert straight.metrics["test_accuracy"] > 0.6  # it learns on the 4-bit base (chance: 0.5)
    restore_step = interrupt_at_step(monkeypatch, 7)
    assert train(config(tmp_path / "b")).interrupted
    restore_step()
    train(config(tmp_path / "b"), resume=True)
    a, b = (load_file(tmp_path / x / "adapter" / "adapter_model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same kernels, same order: bitwise
    report = json.loads((tmp_path / "a" / "report.json").read_text())["parameters"]
    assert report["quantized"] > 20_000_000 * 0.5 and 4 < 8 * report["quantized_bytes"] / report["quantized"] < 5
    described = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert described["base_quantization"]["bnb_4bit_quant_type"] == "nf4"
    *_, model = load_run(tmp_path / "a")
    assert type(model.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"
    assert type(model.classifier.deltas["default"].copy).__name__ == "Linear"  # the head in full precision
    assert evaluate_run(tmp_path / "a")["test_accuracy"] == pytest.approx(straight.metrics["test_accuracy"])

    from fastapi.testclient import TestClient

    from deltatune.serve.app import Settings, create_app
    from deltatune.serve.registry import Registry
    from deltatune.train.inference import predict_texts

    texts = ["a wonderful film", "dull and far too long", "superb"]
    registry = Registry(tmp_path / "a", precision="fp32")
    registry.load("a", tmp_path / "a")
    registry.load("b", tmp_path / "b")  # the same base settings: one quantised instance holds both
    (instance,) = registry.instances.values()
    assert type(instance.model.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"
    with TestClient(create_app(registry, Settings(max_wait_ms=200))) as http:
        served = http.post("/v1/predict", json={"adapter": "a", "inputs": texts}).json()["outputs"]
    alone = predict_texts(tmp_path / "a", texts, precision="fp32")
    assert [row["label"] for row in served] == [row["label"] for row in alone]
    assert all(abs(got["probabilities"][k] - want["probabilities"][k]) <= 1e-5
               for got, want in zip(served, alone) for k in want["probabilities"])


def test_lora_plus_groups_a_quantised_base_s_adapter_and_leaves_the_codes_out(llama_dir):
    model = dt.apply(quantized(llama_dir, "nf4"), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    groups = dt.loraplus_param_groups(model, lr=1e-3, ratio=16)
    grouped = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grouped) == {id(p) for p in trainable.values()}  # every trained tensor once, no quantised one
    assert {grouped[id(p)] for n, p in trainable.items() if "lora_B" in n} == {16e-3}
    assert {grouped[id(p)] for n, p in trainable.items() if "lora_A" in n} == {1e-3}


def test_the_values_of_a_4bit_layer_read_the_same_after_bitsandbytes_repacks_it_for_the_cpu(llama_dir):
    """At the first inference forward on an AVX-512 BF16 CPU, bitsandbytes repacks 4-bit codes and
    stores each block's absmax transposed, in bf16. down_proj has 128 inputs: two blocks a row, so a
    transposed absmax would scale the wrong values."""
    model, batch = quantized(llama_dir, "nf4"), inputs("llama")
    layer = model.model.layers[0].mlp.down_proj
    before = weight_values(layer).float().clone()
    output(model, batch)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU's bitsandbytes kernel does not repack (no AVX-512 BF16)")
    after = weight_values(layer).float()
    assert_close_ulps(after, before, ulps=2 ** 16)  # absmax rounded to bf16: 2^-8 relative, 2^15 float32 ulps
    assert (after - before).abs().max() <= before.abs().max() * 2.0 ** -8
