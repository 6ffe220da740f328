"""The task interface as the pipeline sees it: options per task, the best model by the task's
metric, predictions and evaluation from a finished run, padding and gathering helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from deltatune import DeltatuneError
from deltatune.core.errors import ConfigError
from deltatune.tasks.base import lower_is_better, task_class, task_for
from deltatune.tasks.batching import concat_padded, gather_logits, label_nll, pad_collator
from deltatune.train.config import load_config
from deltatune.train.inference import evaluate_run, predict_texts, read_texts
from deltatune.train.loop import train
from tiny import evaluated_metric_names


def test_each_task_has_its_own_options_and_refuses_the_others():
    assert load_config(None, ["task.type=qa", "task.stride=16"]).task.stride == 16
    with pytest.raises(DeltatuneError, match="unknown key 'task.stride'"):
        load_config(None, ["task.type=tokens", "task.stride=16"])
    with pytest.raises(DeltatuneError, match="unknown task.type 'ner'"):
        load_config(None, ["task.type=ner"])
    assert [task_for(load_config(None, [f"task.type={t}"])).primary_metric
            for t in ("classification", "tokens", "qa", "causal_lm")] == ["accuracy", "f1", "exact_match", "perplexity"]


def test_smaller_is_better_only_for_losses_and_perplexity():
    assert lower_is_better("eval_loss") and lower_is_better("eval_perplexity")
    assert not lower_is_better("eval_f1") and not lower_is_better("eval_exact_match")


def test_padding_keeps_only_model_keys_and_pads_labels_with_minus_100():
    class Tokenizer:
        pad_token_id, eos_token_id, sep_token_id = 0, None, 102

    collate = pad_collator(Tokenizer(), ["input_ids", "labels", "start_positions"])
    batch = collate([{"input_ids": [5, 6, 7], "labels": [1, 2, 3], "start_positions": 2, "context": "x"},
                     {"input_ids": [8], "labels": [4], "start_positions": 0, "context": "y"}])
    assert set(batch) == {"input_ids", "labels", "start_positions"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["start_positions"].tolist() == [2, 0]
    left = pad_collator(Tokenizer(), ["input_ids"], side="left")([{"input_ids": [5, 6]}, {"input_ids": [8]}])
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]]


def test_token_outputs_of_different_lengths_concatenate():
    out = concat_padded([np.ones((2, 3)), np.zeros((1, 5))], -100)
    assert out.shape == (3, 5) and out[0, 3] == -100 and out[2, 4] == 0


def test_label_nll_sums_each_rows_cross_entropy_and_skips_minus_100():
    rows, scored = label_nll(torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]), torch.tensor([1, -100]))
    assert rows.tolist() == pytest.approx([-math.log(3 / 4), 0.0]) and scored.tolist() == [1, 0]
    tokens, counted = label_nll(torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [5.0, 1.0]]]),
                                torch.tensor([[1, 1, -100]]))
    assert tokens.tolist() == pytest.approx([-math.log(3 / 4) - math.log(1 / 3)]) and counted.tolist() == [2]


@pytest.mark.parametrize("head", [BertForSequenceClassification, BertForTokenClassification])
def test_a_splits_loss_is_the_models_loss_over_all_its_rows_in_any_batches(head):
    torch.manual_seed(0)
    model = head(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=3)).eval()
    ids = torch.randint(1, 50, (7, 6))
    labels = torch.randint(0, 3, (7,) if head is BertForSequenceClassification else (7, 6))
    if labels.ndim > 1:  # rows score unequal numbers of tokens: a mean of batch means would be off
        labels[:4, 2:] = -100
    with torch.no_grad():
        whole = model(input_ids=ids, labels=labels).loss.item()
        batches = [{"input_ids": ids[i:i + 3], "labels": labels[i:i + 3]} for i in range(0, 7, 3)]
        _, gathered, loss = gather_logits(model, batches, Accelerator(cpu=True))
    assert gathered.shape == tuple(labels.shape)
    # the same logits up to a few ulps (other batch shapes), summed in another order
    assert loss == pytest.approx(whole, rel=64 * torch.finfo(torch.float32).eps)


def test_a_classification_run_predicts_from_texts_and_rows_and_evaluates(tmp_path, tiny_model_dir, sentiment_csv):
    train(load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.max_length=32",
                             f"data.train_file={sentiment_csv}", "data.max_train_samples=32",
                             "data.max_eval_samples=16", f"training.output_dir={tmp_path}", "training.max_steps=1",
                             "training.batch_size=16", "training.progress=false"]))
    rows = predict_texts(tmp_path, ["a great film", {"text": "an awful film", "label": "negative"}])
    assert [r["text"] for r in rows] == ["a great film", "an awful film"]
    assert all(r["label"] in ("negative", "positive") and sum(r["probabilities"].values()) == pytest.approx(1)
               for r in rows)
    assert read_texts(str(sentiment_csv))[0].keys() == {"text", "label"}
    assert isinstance(read_texts(str(sentiment_csv), "text")[0], str)
    metrics = evaluate_run(tmp_path, str(sentiment_csv))
    assert set(metrics) == {"test_accuracy", "test_f1", "test_loss"}


def test_the_best_checkpoint_follows_a_smaller_is_better_metric(tmp_path, tiny_model_dir, sentiment_csv):
    result = train(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.max_length=32", f"data.train_file={sentiment_csv}",
        "data.max_train_samples=64", "data.max_eval_samples=16", f"training.output_dir={tmp_path}",
        "training.max_steps=4", "training.eval_steps=1", "training.batch_size=16", "training.progress=false",
        "training.metric_for_best_model=loss", "training.learning_rate=1e-2"]))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}
    assert result.best_step == min(losses, key=losses.get)
    assert evaluated_metric_names(tmp_path) == set(task_class("classification").metric_names)


def test_a_metric_the_task_does_not_report_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="(?s)'acuracy' is not a metric of task 'classification'.*did you mean 'accuracy'"):
        load_config(None, ["training.metric_for_best_model=acuracy"])
    with pytest.raises(ConfigError, match="choose one of: perplexity, loss"):
        load_config(None, ["task.type=causal_lm", "training.metric_for_best_model=accuracy"])


def test_a_task_built_again_for_cached_data_takes_over_what_prepare_derived(tiny_model_dir, sentiment_csv):
    from transformers import AutoTokenizer

    from deltatune.train.setup import tokenised

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={sentiment_csv}",
                                "data.max_train_samples=40"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first, second = task_for(config), task_for(config)
    assert tokenised(config, first, tokenizer, str(tiny_model_dir)) is tokenised(config, second, tokenizer,
                                                                                 str(tiny_model_dir))
    assert first.derived == ("labels",) and second.labels == first.labels == ["negative", "positive"]
    assert set(vars(first)) - {"config", "options"} <= set(first.derived)  # nothing prepare set is left out
