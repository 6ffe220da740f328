"""Causal LM on prompt/completion pairs: masking, cutting, packing, perplexity, a run end to end.

The model is a tiny random-init LLaMA saved with the bundled MiniLM WordPiece tokenizer: a real
tokenizer for the code paths (no pre-trained causal LM with safetensors weights ships).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset, DatasetDict

from deltatune.tasks.base import task_class
from deltatune.tasks.causal_lm import CausalLanguageModeling, fit, pack, token_nll
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train
from tiny import CAPITALS, evaluated_metric_names, logged_losses, save_tiny


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Tied input and output embeddings: the 30,522-token vocabulary is most of the model, and one
    # copy of it to train instead of two makes a step a third cheaper.
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), lambda tokenizer: LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)))


def _task_and_tokenizer(folder, *extra):
    from transformers import AutoTokenizer

    config = load_config(None, ["task.type=causal_lm", f"model.name_or_path={folder}", "model.max_length=16", *extra])
    return config, CausalLanguageModeling(config), AutoTokenizer.from_pretrained(folder)


def test_loss_is_on_the_completion_only(tiny_llama_dir):
    config, task, tokenizer = _task_and_tokenizer(tiny_llama_dir)
    rows = [{"prompt": "capital of france ?", "completion": "paris"}]
    row = task.prepare(DatasetDict({"train": Dataset.from_list(rows)}), tokenizer, config)["train"][0]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == [
        "[CLS]", "capital", "of", "france", "?", "[SEP]", "paris", "[SEP]"]  # [SEP] ends the completion too
    paris, sep = tokenizer.convert_tokens_to_ids(["paris", "[SEP]"])
    assert row["labels"] == [-100] * 6 + [paris, sep]


def test_the_chat_template_wraps_the_prompt_when_the_tokenizer_has_one(tiny_llama_dir):
    config, task, tokenizer = _task_and_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = ("{% for m in messages %}user : {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}bot :{% endif %}")
    tokens = tokenizer.convert_ids_to_tokens(task.prompt_ids(tokenizer, "hello"))
    assert tokens == ["user", ":", "hello", "bot", ":"]
    _, plain, _ = _task_and_tokenizer(tiny_llama_dir, "task.chat_template=false")
    assert tokenizer.convert_ids_to_tokens(plain.prompt_ids(tokenizer, "hello")) == ["[CLS]", "hello", "[SEP]"]


def test_fit_keeps_half_for_the_completion_and_the_end_of_the_prompt():
    assert fit([1, 2, 3], [7, 8], 8) == ([1, 2, 3], [7, 8])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8, 9, 10], 6) == ([4, 5, 6], [7, 8, 9])
    assert fit([1, 2], [7, 8, 9, 10, 11, 12], 6) == ([1, 2], [7, 8, 9, 10])
    assert fit(list(range(20)), [7], 4) == ([17, 18, 19], [7])


def test_packing_joins_examples_into_blocks():
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [1] * 3, "length": 3},
                              {"input_ids": [4, 5], "labels": [-100, 5], "attention_mask": [1] * 2, "length": 2}])
    packed = pack(rows, 2).to_list()
    assert [r["input_ids"] for r in packed] == [[1, 2], [3, 4], [5]]
    assert [r["labels"] for r in packed] == [[-100, 2], [3, -100], [5]]
    assert [r["length"] for r in packed] == [2, 2, 1]


def test_token_nll_counts_only_labelled_next_tokens():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: log 4 per scored token
    nll, count = token_nll(logits, torch.tensor([[-100, 2, -100]]))
    assert count.tolist() == [1] and nll.item() == pytest.approx(math.log(4))


@pytest.mark.slow
def test_causal_lm_trains_end_to_end_and_generates(tmp_path, tiny_llama_dir):
    path = tmp_path / "pairs.jsonl"
    pairs = list(CAPITALS.items()) * 12
    path.write_text("\n".join(json.dumps({"prompt": f"capital of {c} ?", "completion": p}) for c, p in pairs))
    config = load_config(None, [
        "task.type=causal_lm", f"model.name_or_path={tiny_llama_dir}", "model.max_length=16",
        f"data.train_file={path}", "data.validation_size=0.1", "data.test_size=0.1",
        f"training.output_dir={tmp_path / 'run'}", "training.batch_size=16", "training.learning_rate=3e-2",
        "training.epochs=10", "training.eval_steps=0.5", "training.warmup_steps=2", "training.logging_steps=2",
        "training.progress=false", "method.method=full", "task.max_new_tokens=3"])
    result = train(config)
    losses = logged_losses(tmp_path / "run")
    assert evaluated_metric_names(tmp_path / "run") == set(task_class("causal_lm").metric_names)
    assert losses[-1] < losses[0] / 2
    # A model that knows nothing is uniform over the 30,522-token vocabulary: perplexity 30,522.
    # One that knows the ten capitals but not which country has which scores ln 10 on the capital
    # and ~0 on the [SEP] that ends it: perplexity sqrt(10) = 3.2. Below 2, it reads the country.
    assert result.metrics["test_perplexity"] < 2
    assert result.metrics["test_loss"] == pytest.approx(math.log(result.metrics["test_perplexity"]))
    rows = predict_texts(tmp_path / "run", [f"capital of {c} ?" for c in CAPITALS] + [{"prompt": "capital of cuba ?"}])
    assert [r["prompt"] for r in rows] == [*(f"capital of {c} ?" for c in CAPITALS), "capital of cuba ?"]
    right = [c for c, r in zip(CAPITALS, rows) if r["completion"].split()[:1] == [CAPITALS[c]]]
    assert len(right) >= 8, rows  # one capital for every country would get one right
