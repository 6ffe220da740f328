"""Prompt tuning: config checks, counts by hand, the hooks' bookkeeping (masks, labels, trimmed
outputs), generation, several prompts at once, and parity with peft."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification, T5ForConditionalGeneration

import deltatune as dt
from tiny import HIDDEN, LAYERS, VOCAB, assert_close_ulps, build, inputs, output, perturb

N = 4


def prompt_of(model: nn.Module, adapter: str = "default") -> torch.Tensor:
    return model.deltatune_virtual_tokens.deltas[adapter].prompt


def token_model(kind: type, labels: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return kind(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                           num_labels=labels)).eval()


def greedy_scores(model: nn.Module, batch: dict, steps: int) -> torch.Tensor:
    """Next-token logits of greedy decoding, recomputing everything at each step (no cache)."""
    ids, scores = batch["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        scores.append(logits[:, -1])
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return torch.stack(scores, dim=1)


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"num_virtual_tokens": 0}, "prompt.num_virtual_tokens"),
    ({"init": "text"}, "prompt.init_text"),
    ({"init": "text", "init_text": ""}, "prompt.init_text"),
    ({"init_text": "hello"}, "prompt.init"),
    ({"init": "text", "init_text": "hi", "init_token_ids": []}, "prompt.init_token_ids"),
    ({"init": "text", "init_text": "hi", "init_token_ids": [3, -1]}, "prompt.init_token_ids"),
    ({"init": "words"}, "prompt.init"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.PromptTuningConfig(**kwargs)
    assert str(info.value).startswith(f"{field} ") and "\n  fix: " in str(info.value)


def test_a_model_without_an_input_embedding_is_refused():
    with pytest.raises(dt.ConfigError, match="input embedding"):
        dt.apply(nn.Sequential(nn.Linear(2, 2)), dt.PromptTuningConfig())


# --- counts and initialisation -----------------------------------------------------------

@pytest.mark.parametrize("family,heads", [("bert", HIDDEN * 3 + 3), ("llama", 0), ("t5", 0)])
def test_counts_are_n_times_d(family, heads):
    saved = ["classifier"] if heads else []
    model = dt.apply(build(family), dt.PromptTuningConfig(num_virtual_tokens=N, modules_to_save=saved))
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == N * HIDDEN + heads  # 4 x 32 = 128
    assert report.not_stored == 0 and report.changed == heads


def test_vocab_init_copies_rows_of_the_embedding_matrix():
    model = dt.apply(build("bert"), dt.PromptTuningConfig(num_virtual_tokens=N))
    weight = model.get_input_embeddings().weight
    for row in prompt_of(model):
        assert (weight == row).all(dim=1).any()


def test_text_init_repeats_the_token_embeddings():
    config = dt.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="two words",
                                   init_token_ids=[7, 9])
    model = dt.apply(build("llama"), config)
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt_of(model).detach(), weight[[7, 9, 7, 9, 7]].detach())


def test_text_init_tokenizes_with_the_local_tokenizer_and_the_saved_config_records_the_ids(tiny_model_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    text = "classify the review"
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text, add_special_tokens=False)["input_ids"]
    config = dt.PromptTuningConfig(num_virtual_tokens=N, init="text", init_text=text)
    model = dt.apply(AutoModel.from_pretrained(tiny_model_dir), config)
    assert config.init_token_ids is None  # the caller's config is never written
    assert dt.read_adapter(dt.save_adapter(model, tmp_path / "adapter"))[0]["config"]["init_token_ids"] == ids
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt_of(model).detach(), weight[(ids * N)[:N]].detach())
    elsewhere = AutoModel.from_pretrained(tiny_model_dir)
    elsewhere.config._name_or_path = str(tmp_path / "no-tokenizer-here")
    dt.load_adapter(elsewhere, tmp_path / "adapter")  # the saved config carries the ids
    torch.testing.assert_close(prompt_of(elsewhere), prompt_of(model))


def test_text_init_without_a_tokenizer_or_ids_is_refused():
    with pytest.raises(dt.ConfigError, match="init_token_ids"):
        dt.apply(build("bert"), dt.PromptTuningConfig(init="text", init_text="hello"))
    with pytest.raises(dt.ConfigError, match="beyond the model's vocabulary"):
        dt.apply(build("bert"), dt.PromptTuningConfig(init="text", init_text="x", init_token_ids=[VOCAB]))


# --- what the hooks do -------------------------------------------------------------------

def test_token_level_outputs_keep_the_input_length():
    batch = inputs("bert")
    for kind, key, labels in [(BertForTokenClassification, "logits", 5), (BertForQuestionAnswering, "start_logits", 2)]:
        model = dt.apply(token_model(kind, labels), dt.PromptTuningConfig(num_virtual_tokens=N))
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        assert out[key].shape[:2] == batch["input_ids"].shape
        assert all(h.shape[1] == batch["input_ids"].shape[1] for h in out.hidden_states)
    for family in ["gpt2", "llama"]:
        model = dt.apply(build(family), dt.PromptTuningConfig(num_virtual_tokens=N))
        assert output(model, inputs(family)).shape == (*inputs(family)["input_ids"].shape, VOCAB)
    model = dt.apply(build("bert"), dt.PromptTuningConfig(num_virtual_tokens=N))
    assert output(model, batch).shape == (2, 3)  # sequence-level logits are not trimmed


def test_token_labels_are_padded_so_the_loss_covers_the_users_positions():
    model = dt.apply(token_model(BertForTokenClassification), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model)
    batch = inputs("bert")
    labels = torch.randint(0, 5, batch["input_ids"].shape)
    labels[batch["attention_mask"] == 0] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)))


def test_lm_labels_are_padded_so_the_loss_covers_the_users_positions():
    model = dt.apply(build("llama"), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model)
    batch = inputs("llama")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 0] = -100  # the last prompt position predicts the first token: leave it out here
    with torch.no_grad():
        out = model(**batch, labels=labels)
    by_hand = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, by_hand)


@pytest.mark.parametrize("family,pad_left", [("bert", False), ("t5", False), ("llama", True)])
def test_the_mask_still_hides_padding(family, pad_left):
    model = dt.apply(build(family), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model)
    batch = inputs(family)
    if pad_left:
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    padded = (batch["attention_mask"][-1] == 0).nonzero()[0, 0]
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][-1, padded] = (batch["input_ids"][-1, padded] + 1) % VOCAB
    real = batch["attention_mask"][-1].bool() if pad_left else slice(None)
    assert_close_ulps(output(model, changed)[-1][real], output(model, batch)[-1][real])


def test_positions_and_token_types_are_moved_past_the_prompt():
    model = dt.apply(build("bert"), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model)
    batch = inputs("bert")
    explicit = {**batch, "position_ids": torch.arange(7)[None], "token_type_ids": torch.zeros_like(batch["input_ids"])}
    assert_close_ulps(output(model, explicit), output(model, batch))


def test_removing_the_adapter_removes_the_hooks():
    model = build("llama")
    base = output(model, inputs("llama"))
    dt.apply(model, dt.PromptTuningConfig(num_virtual_tokens=N), "a")
    dt.apply(model, dt.PromptTuningConfig(num_virtual_tokens=N), "b")
    dt.delete_adapter(model, "a")
    assert model._forward_pre_hooks and model._forward_hooks  # still needed by "b"
    dt.unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "deltatune_virtual_tokens" not in dict(model.named_modules())  # the holder went with the last prompt
    assert torch.equal(output(model, inputs("llama")), base)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_two_active_prompts_act_as_one_concatenated_prompt(family):
    model = build(family)
    for name in ["a", "b"]:
        dt.apply(model, dt.PromptTuningConfig(num_virtual_tokens=N), name)
    dt.set_adapter(model, ["a", "b"])
    single = dt.apply(build(family), dt.PromptTuningConfig(num_virtual_tokens=2 * N))
    with torch.no_grad():
        prompt_of(single).copy_(torch.cat([prompt_of(model, "a"), prompt_of(model, "b")]))
    assert_close_ulps(output(model, inputs(family)), output(single, inputs(family)))


# --- generation --------------------------------------------------------------------------

def test_generate_adds_the_prompt_once_on_a_causal_lm():
    model = dt.apply(build("llama"), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model, scale=1.0)
    batch = {"input_ids": inputs("llama")["input_ids"]}
    result = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    assert_close_ulps(torch.stack(result.scores, 1), greedy_scores(model, batch, 4))
    with dt.disable_adapters(model):
        assert not torch.allclose(greedy_scores(model, batch, 4), torch.stack(result.scores, 1))


def test_generate_puts_the_prompt_in_front_of_the_encoder_input():
    model = dt.apply(build("t5"), dt.PromptTuningConfig(num_virtual_tokens=N))
    perturb(model, scale=1.0)
    batch = inputs("t5")
    result = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    decoded = result.sequences[:, :-1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoded).logits
    assert_close_ulps(torch.stack(result.scores, 1), logits)


# --- parity with Hugging Face peft -------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices
@pytest.mark.parametrize("family,task", [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"),
                                         ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_outputs_match_peft(family, task):
    saved = ["classifier"] if task == "SEQ_CLS" else []
    ours = dt.apply(build(family), dt.PromptTuningConfig(num_virtual_tokens=N, modules_to_save=saved))
    perturb(ours)
    theirs = peft.get_peft_model(build(family), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    prompt = prompt_of(ours).detach()
    rows = theirs.prompt_encoder["default"].embedding.weight.shape[0]  # peft keeps n rows per stack
    tensors = {"prompt_embeddings": torch.cat([prompt, torch.zeros(rows - N, HIDDEN)])}
    tensors.update({f"base_model.{k}": v for k, v in dt.adapter_state_dict(ours).items() if "prompt" not in k})
    peft.set_peft_model_state_dict(theirs.eval(), tensors)
    batch = inputs(family)
    with torch.no_grad():
        expected = theirs(**batch).logits
    if task == "CAUSAL_LM":
        expected = expected[:, N:]  # peft returns the prompt positions too
    assert_close_ulps(output(ours, batch), expected)
    if isinstance(theirs.base_model, T5ForConditionalGeneration):
        return
    assert theirs.get_nb_trainable_parameters()[0] == dt.parameter_report(ours).trainable
