"""Seq2seq: ROUGE by hand and a tiny random-init T5 (with the MiniLM tokenizer) end to end.

No pre-trained seq2seq model ships in a package: these tests cover the code paths, not quality.
The tiny T5 has no dropout and untied embeddings: it learns several times faster so.
"""

from __future__ import annotations

import json

import pytest

from deltatune.tasks.base import task_class
from deltatune.tasks.seq2seq import rouge_scores
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train
from tiny import CAPITALS, evaluated_metric_names, logged_losses, save_tiny


def test_rouge_by_hand():
    scores = rouge_scores(["the cat sat", "dogs"], ["the cat sat down", "a dog"])
    # 1: p 3/3, r 3/4 -> F 6/7 (ROUGE-1 and -L), bigrams p 2/2 r 2/3 -> 0.8; 2: "dogs" stems to "dog": p 1 r 1/2
    assert scores["rouge1"] == pytest.approx((6 / 7 + 2 / 3) / 2)
    assert scores["rouge2"] == pytest.approx((0.8 + 0) / 2)
    assert scores["rougeL"] == pytest.approx((6 / 7 + 2 / 3) / 2)


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    return save_tiny(tmp_path_factory.mktemp("tiny-t5"), lambda tokenizer: T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id, dropout_rate=0.0, tie_word_embeddings=False)))


@pytest.mark.slow
def test_seq2seq_trains_end_to_end_and_generates(tmp_path, tiny_t5_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"source": f"capital of {c}", "target": p})
                              for c, p in list(CAPITALS.items()) * 12))
    config = load_config(None, [
        "task.type=seq2seq", f"model.name_or_path={tiny_t5_dir}", "model.max_length=16", "task.max_new_tokens=4",
        f"data.train_file={path}", "data.validation_size=0.1", "data.test_size=0.1",
        f"training.output_dir={tmp_path / 'run'}", "training.batch_size=16", "training.learning_rate=1e-2",
        "training.epochs=8", "training.warmup_steps=2", "training.logging_steps=2", "training.progress=false",
        "method.method=full"])
    result = train(config)
    losses = logged_losses(tmp_path / "run")
    assert evaluated_metric_names(tmp_path / "run") == set(task_class("seq2seq").metric_names)
    assert losses[-1] < losses[0] / 2
    assert {"test_rouge1", "test_rouge2", "test_rougeL", "test_loss"} <= set(result.metrics)
    # One constant capital for every country scores ROUGE-1 0.1 (right for one country in ten).
    assert result.metrics["test_rouge1"] > 0.3
    [row] = predict_texts(tmp_path / "run", ["capital of peru"])
    assert row["source"] == "capital of peru" and isinstance(row["output"], str)
