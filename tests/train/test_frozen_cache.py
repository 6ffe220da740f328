"""training.cache_frozen: the kept inputs of the lowest trained block give the training the
whole model gives (with dropout below that block off), and runs that cannot keep them say why."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

import deltatune as dt
from deltatune.train import setup as run_setup
from deltatune.train.config import load_config
from deltatune.train.frozen_cache import plan
from deltatune.train.loop import train
from tiny import assert_close_ulps, build, inputs, logged_losses, save_tiny


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory):
    """A tiny 3-block BERT without dropout: a run with the cache and one without must then agree."""
    return save_tiny(tmp_path_factory.mktemp("tiny-bert-3"), lambda tokenizer: BertModel(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)))


def run(folder, model_dir, data, cache: bool, method: list[str]):
    return train(load_config(None, [f"model.name_or_path={model_dir}", "model.max_length=32", *method,
                                    f"data.train_file={data}", "data.max_train_samples=40", "data.max_eval_samples=8",
                                    f"training.output_dir={folder}", "training.epochs=3", "training.batch_size=8",
                                    "training.logging_steps=1", "training.progress=false",
                                    f"training.cache_frozen={str(cache).lower()}"]))


@pytest.mark.parametrize("method", [["method=layer", "method.top_k=1"],
                                    ["method=lora", "method.target_modules=[re:.*layer\\.2\\..*(query|value)]"]],
                         ids=["layer-top-1", "lora-top-block"])
def test_kept_inputs_train_as_the_whole_model_does(method, no_dropout_dir, sentiment_csv, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(run_setup, "plan", lambda *a: made.append(plan(*a)) or made[-1])
    cached = run(tmp_path / "cached", no_dropout_dir, sentiment_csv, True, method)
    whole = run(tmp_path / "whole", no_dropout_dir, sentiment_csv, False, method)
    prefix = made[0]
    assert prefix.first == 2 and len(prefix.kept) == 40  # every training example kept once
    assert prefix.skipped_batches == 10  # epochs 2 and 3: 5 batches each skip blocks 0 and 1
    # the cached run adds the same numbers in another order: the losses agree up to rounding
    assert_close_ulps(logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "whole"))
    saved = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("cached", "whole")]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert_close_ulps(saved[0][key], saved[1][key])
    assert cached.metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    kept_mib = round(sum(t.numel() * 4 for t in prefix.kept.values()) / 2**20, 1)  # float32, real tokens only
    assert cached.frozen_cache == {"first_block": 2, "kept_examples": 40, "kept_mib": kept_mib, "skipped_batches": 10}
    assert whole.frozen_cache is None


def test_what_runs_below_the_lowest_trained_block_runs_in_eval_mode():
    model = build("gpt2")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["h.1.attn.c_attn"]))
    prefix = plan(model, inputs("gpt2"))
    names = {model.get_submodule(n): n for n, _ in model.named_modules()}
    below = {names[m] for m in prefix.below}
    assert {"transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0"} <= below
    assert not below & {"transformer", "transformer.h", "transformer.h.1", "transformer.ln_f", "lm_head"}
    assert prefix.first == 1
    model.train()
    with prefix.forward(inputs("gpt2"), torch.tensor([0, 1])):  # dropout below block 1 off, above it on
        assert not any(m.training for m in prefix.below) and model.transformer.h[1].training


@pytest.mark.parametrize("family,config,phrase", [
    ("bert", dt.PromptTuningConfig(num_virtual_tokens=2), "deltatune_virtual_tokens.* runs before block 0"),
    ("bert", dt.LoraConfig(r=2, target_modules=["word_embeddings", "query"]), "word_embeddings.* runs before block 0"),
    ("bert", dt.LoraConfig(r=2, target_modules=["classifier"]), "no transformer block trains"),
    ("t5", dt.LoraConfig(r=2), "one stack of blocks; T5ForConditionalGeneration has 2"),
])
def test_runs_that_cannot_keep_inputs_say_why(family, config, phrase):
    model = build(family)
    dt.apply(model, config)
    with pytest.raises(dt.ConfigError, match=phrase):
        plan(model, inputs(family))
