"""LoRA: config checks, counts and outputs worked out by hand, merging, parity with peft, and
one end-to-end run on the bundled pre-trained MiniLM."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.verbs import merged_adapters
from tiny import HIDDEN, LAYERS, ROUND_TRIP, Net, assert_close_ulps, build, inputs, output, perturb, shown_at


def lora_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    delta = layer.deltas["default"]
    return delta.lora_A.weight.detach(), delta.lora_B.weight.detach()


def delta_calls(model: nn.Module, batch: dict) -> int:
    """How many modules inside deltas run during one forward pass."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for n, m in model.named_modules() if ".deltas." in n]
    output(model, batch)
    for hook in hooks:
        hook.remove()
    return len(calls)


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "lora.r"), ({"r": -1}, "lora.r"), ({"r": "8"}, "lora.r"), ({"r": True}, "lora.r"),
    ({"lora_dropout": 1.0}, "lora.lora_dropout"), ({"lora_dropout": -0.1}, "lora.lora_dropout"),
    ({"target_modules": []}, "lora.target_modules"), ({"target_modules": 3}, "lora.target_modules"),
    ({"bias": "some"}, "lora.bias"), ({"lora_alpha": "16"}, "lora.lora_alpha"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.LoraConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} ") and "\n  fix: " in message, message


def test_type_errors_say_what_is_expected():
    with pytest.raises(dt.ConfigError, match="expected int"):
        dt.LoraConfig(r="8")
    with pytest.raises(dt.ConfigError, match=re.escape("expected 'none' | 'all' | 'lora_only'")):
        dt.LoraConfig(bias="some")


def test_config_round_trips_through_plain_data():
    config = dt.LoraConfig(r=4, lora_alpha=8.5, target_modules=["query"], use_rslora=True,
                           modules_to_save=["classifier"])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "lora" and data["r"] == 4
    assert dt.config_from_dict(data) == config == dt.LoraConfig.from_dict(data)


@pytest.mark.parametrize("use_rslora,scaling", [(False, 8 / 4), (True, 8 / 2)])
def test_scaling(use_rslora, scaling):
    assert dt.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora).scaling == scaling


@pytest.mark.parametrize("saved", [["query"], ["attention"], ["bert.encoder.layer.0.attention.self.query"]])
def test_a_module_cannot_be_both_adapted_and_saved(saved):
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match="overlaps"):
        dt.apply(model, dt.LoraConfig(target_modules=["query"], modules_to_save=saved))
    assert sorted(model.state_dict()) == keys


def test_all_linear_skips_modules_trained_in_full():
    """A task's head and pooler are trained in full; "all-linear" adapts every other linear."""
    model = dt.apply(build("bert"), dt.LoraConfig(target_modules="all-linear",
                                                  modules_to_save=["bert.pooler", "classifier"]))
    adapted = {n.removesuffix(".deltas.default.lora_A") for n, _ in model.named_modules()
               if n.endswith(".deltas.default.lora_A")}
    assert "bert.pooler.dense" not in adapted and "bert.encoder.layer.0.attention.self.query" in adapted
    assert len(adapted) == 6 * model.config.num_hidden_layers


# --- counts ------------------------------------------------------------------------------

def test_counts_on_tiny_bert():
    model = build("bert")
    base_total = sum(p.numel() for p in model.parameters())
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    report = dt.parameter_report(model)
    lora = LAYERS * 2 * 4 * (HIDDEN + HIDDEN)  # 2 layers x {query, value} x r (d_in + d_out) = 1024
    head = HIDDEN * 3 + 3  # the trainable copy of the classifier (the frozen original is not stored)
    assert report.trainable == report.stored == lora + head == 1123
    assert report.total == base_total + lora + head
    assert report.stored_bytes == 4 * 1123
    assert report.changed == LAYERS * 2 * HIDDEN * HIDDEN + head
    assert report.trainable_percent == pytest.approx(100 * 1123 / report.total)
    assert f"trainable params: 1,123 || all params: {report.total:,} || trainable%: " in str(report)


# embeddings LayerNorm + per layer (q, k, v, attention out, 2 LayerNorms, output: 7 x d; intermediate 64) + pooler
ALL_BIASES = HIDDEN + LAYERS * (7 * HIDDEN + 64) + HIDDEN


@pytest.mark.filterwarnings("ignore:lora bias")
@pytest.mark.parametrize("bias,biases", [("all", ALL_BIASES), ("lora_only", LAYERS * 2 * HIDDEN)])
def test_trained_biases_beside_a_copied_head_are_counted_and_saved(bias, biases, tmp_path):
    with pytest.warns(UserWarning, match=f"lora bias='{bias}' trains base biases in place") as caught:
        model = dt.apply(build("bert"), dt.LoraConfig(r=4, target_modules=["query", "value"], bias=bias,
                                                      modules_to_save=["classifier"]))
    assert shown_at(caught[0], __file__)  # at the user's call, not inside deltatune
    perturb(model)  # the frozen original head's bias must not train: the copy's bias is saved
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == 1123 + biases
    expected = output(model, inputs("bert"))
    loaded = dt.load_adapter(build("bert"), dt.save_adapter(model, tmp_path / "adapter"))
    assert_close_ulps(output(loaded, inputs("bert")), expected)


# --- the formula -------------------------------------------------------------------------

def test_golden_output_of_a_two_by_two_layer():
    model = dt.apply(Net(2, 2), dt.LoraConfig(r=1, lora_alpha=2, target_modules=["proj"]))
    layer = model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.eye(2))
        layer.base_layer.bias.copy_(torch.tensor([0.5, -1.0]))
        layer.deltas["default"].lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.deltas["default"].lora_B.weight.copy_(torch.tensor([[1.0], [0.0]]))
    # W0 x + b + (alpha/r) B A x = [1, 1] + [0.5, -1] + 2 * [3, 0]
    expected = torch.tensor([[7.5, 0.0]])
    torch.testing.assert_close(model(torch.ones(1, 2)).detach(), expected)
    dt.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    torch.testing.assert_close(model(torch.ones(1, 2)).detach(), expected)


@pytest.mark.parametrize("use_rslora,scaling", [(False, 2.0), (True, 4.0)])
def test_linear_output_is_w0x_plus_b_plus_scaled_bax(use_rslora, scaling):
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["proj"]))
    perturb(model)
    A, B = lora_weights(model.proj)
    W0, b = model.proj.weight.detach(), model.proj.bias.detach()  # read through the wrapper
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x).detach(), x @ W0.T + b + scaling * (x @ A.T @ B.T))


def test_fresh_adapter_starts_at_zero_update():
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, target_modules=["query", "word_embeddings"]))
    query = model.bert.encoder.layer[0].attention.self.query.deltas["default"]
    embedding = model.bert.embeddings.word_embeddings.deltas["default"]
    assert torch.all(query.lora_B.weight == 0) and torch.all(query.lora_A.weight != 0)
    assert torch.all(embedding.lora_embedding_A == 0) and torch.all(embedding.lora_embedding_B != 0)


def test_conv1d_merge_adds_the_transposed_update():
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    perturb(model)
    batch, layer = inputs("gpt2"), model.transformer.h[0].attn.c_attn
    expected, W0 = output(model, batch), layer.base_layer.weight.detach().clone()  # (in, out)
    A, B = lora_weights(layer)
    dt.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), W0 + 2.0 * (B @ A).T)
    assert_close_ulps(output(model, batch), expected)


def test_embedding_merge_on_an_untied_embedding():
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings"]))
    perturb(model)
    batch, layer = inputs("bert"), model.bert.embeddings.word_embeddings
    expected, W0 = output(model, batch), layer.base_layer.weight.detach().clone()  # (vocab, dim)
    delta = layer.deltas["default"]
    ids = batch["input_ids"]
    update = delta.lora_embedding_A.T[ids] @ delta.lora_embedding_B.T * 2.0
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), W0[ids] + update)
    dt.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(),
                               W0 + 2.0 * (delta.lora_embedding_B @ delta.lora_embedding_A).T.detach())
    assert_close_ulps(output(model, batch), expected)


def test_merging_a_tied_embedding_is_refused():
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=4, target_modules=["wte"]))
    perturb(model)
    W0 = model.lm_head.weight.detach().clone()
    with pytest.raises(dt.MergeError) as info:
        dt.merge(model)
    assert str(info.value) == ("'transformer.wte' shares its weight with 'lm_head.weight' (tied weights): merging would "
                               "change both.\n  fix: serve this adapter unmerged, or untie the weights before applying it.")
    assert merged_adapters(model) == [] and torch.equal(model.lm_head.weight, W0)


def test_merged_forward_runs_no_delta_module():
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    perturb(model)
    batch = inputs("bert")
    expected = output(model, batch)
    assert delta_calls(model, batch) > 0
    dt.merge(model)
    assert delta_calls(model, batch) == 0
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    assert delta_calls(model, batch) > 0


# --- the standalone layer ----------------------------------------------------------------

def test_standalone_lora_linear():
    torch.manual_seed(0)
    layer = dt.LoRALinear(16, 8, rank=4, lora_alpha=8)
    x = torch.randn(3, 16)
    assert layer(x).shape == (3, 8)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "deltas.default.lora_A.weight", "deltas.default.lora_B.weight"}
    with torch.no_grad():
        layer.deltas["default"].lora_B.weight.normal_()
    A, B = lora_weights(layer)
    expected = (layer.base_layer(x) + 2.0 * x @ A.T @ B.T).detach()
    torch.testing.assert_close(layer(x).detach(), expected)
    W0 = layer.weight.detach().clone()
    layer.merge("default")
    torch.testing.assert_close(layer(x).detach(), expected)
    torch.testing.assert_close(layer.weight.detach(), W0 + 2.0 * B @ A)
    layer.unmerge()
    assert_close_ulps(layer.weight.detach(), W0, ROUND_TRIP)


def hand_built() -> tuple[nn.Sequential, torch.Tensor]:
    """Two LoRALinear layers made on their own (no apply), B perturbed, and an input."""
    torch.manual_seed(0)
    model = nn.Sequential(dt.LoRALinear(16, 8, rank=4), nn.ReLU(), dt.LoRALinear(8, 4, rank=2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.deltas["default"].lora_B.weight.normal_()
    return model, torch.randn(3, 16)


def test_a_model_built_from_lora_linear_takes_every_verb(tmp_path):
    model, x = hand_built()
    expected = model(x).detach()
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == 4 * (16 + 8) + 2 * (8 + 4) == 120
    dt.save_adapter(model, tmp_path / "adapter")
    _, tensors = dt.read_adapter(tmp_path / "adapter")
    assert sorted(tensors) == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    torch.testing.assert_close(tensors["2.lora_B.weight"], model[2].deltas["default"].lora_B.weight.detach())
    with dt.disable_adapters(model):
        torch.testing.assert_close(model(x), model[2].base_layer(model[0].base_layer(x).relu()))
    dt.merge(model)
    torch.testing.assert_close(model(x).detach(), expected)
    plain = dt.merge_and_unload(model)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(plain(x).detach(), expected)


def test_the_first_verb_on_hand_built_wrappers_makes_their_states_one():
    """Each LoRALinear starts with its own bookkeeping; the first verb on the model joins them,
    so switching every adapter off turns off both layers' deltas, not one."""
    model, x = hand_built()
    adapted = model(x).detach()
    dt.set_adapter(model, [])
    torch.testing.assert_close(model(x), model[2].base_layer(model[0].base_layer(x).relu()))
    dt.set_adapter(model, "default")
    torch.testing.assert_close(model(x).detach(), adapted)


# --- parity with Hugging Face peft -------------------------------------------------------

PARITY = [
    pytest.param("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}, id="bert"),
    pytest.param("bert", {"target_modules": ["query", "value"], "use_rslora": True}, id="bert-rslora"),
    pytest.param("bert", {"target_modules": ["word_embeddings", "query"]}, id="bert-embedding"),
    pytest.param("gpt2", {"target_modules": ["c_attn"]}, id="gpt2-conv1d"),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices
@pytest.mark.parametrize("family,kwargs", PARITY)
def test_outputs_and_counts_match_peft(family, kwargs):
    ours = dt.apply(build(family), dt.LoraConfig(r=4, lora_alpha=8, **kwargs))
    perturb(ours)
    theirs = peft.get_peft_model(build(family), peft.LoraConfig(r=4, lora_alpha=8, **kwargs)).eval()
    # Native keys are peft's keys without the "base_model.model." prefix.
    tensors = {f"base_model.model.{k}": v for k, v in dt.adapter_state_dict(ours).items()}
    result = peft.set_peft_model_state_dict(theirs, tensors)
    assert not result.unexpected_keys
    batch = inputs(family)
    assert (output(theirs, batch) - output(build(family), batch)).abs().max() > 1e-4  # copied in
    assert_close_ulps(output(theirs, batch), output(ours, batch))
    report = dt.parameter_report(ours)
    assert theirs.get_nb_trainable_parameters() == (report.trainable, report.total)


# --- end to end on the bundled pre-trained model -----------------------------------------

SENTENCES = ["a gripping, beautifully acted film", "dull and far too long",
             "one of the best movies this year", "i want those two hours back",
             "warm, funny and smart", "a mess from start to finish",
             "the cast is wonderful", "lifeless and predictable"]
LABELS = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])


@pytest.mark.slow
def test_minilm_train_merge_save_load(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.assets import model_path

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)

    batch = dict(AutoTokenizer.from_pretrained(model_path())(SENTENCES, padding=True, return_tensors="pt"))
    model = dt.apply(fresh(), dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=[
        "query", "value"], modules_to_save=["classifier"]))
    loss_before = _eval_loss(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(8):
        model(**batch, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert _eval_loss(model, batch) < loss_before
    _, B = lora_weights(model.bert.encoder.layer[0].attention.self.query)
    assert B.abs().sum() > 0
    expected = output(model, batch)

    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    path = dt.save_adapter(model, tmp_path / "minilm-lora")
    loaded = dt.load_adapter(fresh(), path).eval()
    assert_close_ulps(output(loaded, batch), expected)
    stored_bytes = dt.parameter_report(model).stored_bytes
    size = (path / "adapter_model.safetensors").stat().st_size
    assert stored_bytes <= size <= stored_bytes * 1.01 + 16 * 1024
    plain = dt.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
    assert_close_ulps(output(plain, batch), expected)


def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch, labels=LABELS).loss.item()
