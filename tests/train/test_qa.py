"""Extractive QA: SQuAD scores by hand, span mapping, windows, readers, and a run end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForQuestionAnswering

from deltatune import DeltatuneError
from deltatune.data.loading import read_file
from deltatune.tasks.base import task_class
from deltatune.tasks.qa import QuestionAnswering, answer_list, span_nll
from deltatune.tasks.spans import best_span, exact_match, f1, normalize_answer, squad_scores, token_span
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train
from tiny import evaluated_metric_names, logged_losses


def test_squad_normalisation_exact_match_and_f1_by_hand():
    assert normalize_answer("  The Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("a cat", "cats") == 0.0
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # p = 2/2, r = 2/3
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)  # p = 1/2, r = 1/1: counts are clipped
    assert f1("dog", "cat") == 0.0 and f1("", "") == 1.0 and f1("the", "cat") == 0.0


def test_squad_scores_take_the_best_gold_answer_and_handle_unanswerable():
    scores = squad_scores(["Paris", "blue whale", ""], [["London", "paris"], ["the whale"], []])
    assert scores["exact_match"] == pytest.approx(2 / 3)  # Paris yes, whale no, empty for empty yes
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)  # "blue whale" vs "whale": p 1/2, r 1


def test_answer_shapes_are_all_read():
    assert answer_list({"text": ["a", "b"], "answer_start": [1, 5]}) == [("a", 1), ("b", 5)]
    assert answer_list({"text": "a", "answer_start": 3}) == [("a", 3)]
    assert answer_list([{"text": "a", "answer_start": 3}]) == [("a", 3)]
    assert answer_list({"text": [], "answer_start": []}) == [] and answer_list(None) == []


def test_token_span_inside_and_outside_the_window():
    offsets = [None, None, None, (0, 3), (4, 9), (10, 14), (14, 15), None]  # [CLS] q q [SEP] ctx... [SEP]
    assert token_span(offsets, 4, 14) == (4, 5)
    assert token_span(offsets, 10, 15) == (5, 6)
    assert token_span(offsets, 12, 20) == (0, 0)  # runs past the window: point at [CLS]


def test_best_span_across_two_windows():
    window_a = (np.array([9.0, 0, 1, 0, 5.0]), np.array([9.0, 5.0, 1, 0, 0]),  # [CLS] and an end before start
                [None, (0, 4), (5, 8), (9, 12), (13, 17)])
    window_b = (np.array([0, 0, 3.0, 0]), np.array([0, 0, 1.0, 2.5]), [None, (9, 12), (13, 17), (18, 22)])
    # a: [CLS] is not context; (4, 1) ends before it starts; best valid (4, 4) = 5 + 0 = 5 < b's (2, 3) = 5.5
    assert best_span([window_a, window_b], max_answer_length=5) == (13, 22, 5.5)
    assert best_span([window_a, window_b], max_answer_length=1) == (13, 17, 5.0)  # b's 2-token span too long
    assert best_span([(np.zeros(2), np.zeros(2), [None, None])], 5) is None


def test_a_long_context_is_cut_into_windows_that_point_at_the_answer():
    from transformers import AutoTokenizer

    from deltatune import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path())
    config = load_config(None, ["task.type=qa", "model.max_length=32", "task.stride=8"])
    context = " ".join(f"word{i}" for i in range(30)) + " the answer is Zanzibar ."
    row = {"question": "what is it?", "context": context,
           "answers": {"text": ["Zanzibar"], "answer_start": [context.index("Zanzibar")]}}
    features = QuestionAnswering(config).prepare(DatasetDict({"test": Dataset.from_list([row])}),
                                                 tokenizer, config)["test"]
    assert len(features) > 2 and set(features["example_id"]) == {0}
    hits = [f for f in features if f["start_positions"] > 0]
    assert len(hits) >= 1 and all(f["start_positions"] == 0 for f in features if f not in hits)
    for f in hits:
        text = tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1])
        assert text == "zanzibar"
        start, end = f["offset_mapping"][f["start_positions"]][0], f["offset_mapping"][f["end_positions"]][1]
        assert context[start:end] == "Zanzibar"


def test_squad_json_layout_is_read_and_a_broken_one_refused(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    assert read_file(str(tmp_path / "dev.json")).to_list() == [
        {"id": "q1", "question": "Where is Paris?", "context": "Paris is in France.",
         "answers": {"text": ["France"], "answer_start": [12]}}]
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q"}]}]}]}))
    with pytest.raises(DeltatuneError, match="not a SQuAD file"):
        read_file(str(tmp_path / "bad.json"))


def test_an_answer_that_is_not_at_its_answer_start_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from deltatune import assets

    config = load_config(None, ["task.type=qa"])
    row = {"question": "q?", "context": "Paris is in France.", "answers": {"text": ["France"], "answer_start": [3]}}
    with pytest.raises(DeltatuneError, match="answer 'France' at character 3"):
        QuestionAnswering(config).prepare(DatasetDict({"train": Dataset.from_list([row])}),
                                          AutoTokenizer.from_pretrained(assets.model_path()), config)


FILLER = ["The weather was mild that week.", "Many people visited the old market.",
          "A small river runs through the valley.", "Local schools opened a new library.",
          "The train arrived later than usual.", "Farmers sold apples and pears."]
NAMES = ["Tomas", "Greta", "Oskar", "Helga", "Marta", "Pavel", "Ingrid", "Bruno", "Lena", "Viktor"]
CITIES = ["Lyon", "Porto", "Bergen", "Krakow", "Ghent", "Turin", "Malmo", "Leeds", "Graz", "Bilbao"]
#: (question, the sentence of the context that answers it); both questions are 8 tokens long, so
#: a context is cut into the same windows whichever is asked
QUESTIONS = [("Who is the mayor of the town?", "The mayor of the town is {}."),
             ("Where did the town festival move to?", "The festival moved to {} last year.")]


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic QA: a mayor and a city among filler sentences, each context asked both
    questions: only a model that reads the question can answer both."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n // 2):
        answers = [rng.choice(NAMES), rng.choice(CITIES)]
        facts = [sentence.format(answer) for (_, sentence), answer in zip(QUESTIONS, answers)]
        sentences = rng.sample(FILLER, 3) + facts
        rng.shuffle(sentences)
        context = " ".join(sentences)
        for (question, _), fact, answer in zip(QUESTIONS, facts, answers):
            rows.append({"question": question, "context": context,
                         "answers": {"text": answer, "answer_start": context.index(fact) + fact.index(answer)}})
    return rows


@pytest.mark.slow
def test_qa_trains_end_to_end_over_windows_and_predicts_spans(tmp_path):
    rows = qa_rows(160)
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(row) for row in qa_rows(40, seed=1)))
    config = load_config(None, [
        "task.type=qa", "model.name_or_path=minilm-l6", "model.max_length=48", "task.stride=16",
        f"data.train_file={tmp_path / 'qa.jsonl'}", "data.validation_size=0.1", f"data.test_file={tmp_path / 'test.jsonl'}",
        f"training.output_dir={tmp_path / 'run'}", "training.batch_size=16", "training.learning_rate=8e-3",
        "training.epochs=4", "training.warmup_steps=2", "training.logging_steps=2", "training.progress=false",
        # the key too: matching the question's words to the context's is what this task asks
        "method.method=lora", "method.r=8", "method.target_modules=[query,key,value]"])
    result = train(config)
    losses = logged_losses(tmp_path / "run")
    assert evaluated_metric_names(tmp_path / "run") == set(task_class("qa").metric_names)
    assert losses[-1] < losses[0] * 0.8
    # Every test context is asked both questions, whose answers differ: a model that ignores the
    # question gives both the same answer and scores at most 0.5. (Always answering with the
    # first context token scores 0: no context starts with an answer.)
    assert result.metrics["test_exact_match"] > 0.5
    assert result.metrics["test_f1"] >= result.metrics["test_exact_match"]
    [answer] = predict_texts(tmp_path / "run", [{"question": rows[0]["question"], "context": rows[0]["context"]}])
    assert answer["answer"] and rows[0]["context"][answer["start"]:answer["end"]] == answer["answer"]


def test_span_losses_per_feature_add_up_to_the_heads_loss_skipping_positions_past_the_window():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32)).eval()
    starts, ends = torch.tensor([1, 3, 9, 0]), torch.tensor([2, 5, 9, 7])  # 9: past a window of 8
    with torch.no_grad():
        out = model(input_ids=torch.randint(1, 50, (4, 8)), start_positions=starts, end_positions=ends)
    (start, start_scored), (end, end_scored) = span_nll(out.start_logits, starts), span_nll(out.end_logits, ends)
    assert start_scored.tolist() == end_scored.tolist() == [1, 1, 0, 1]
    loss = (start.sum() / start_scored.sum() + end.sum() / end_scored.sum()) / 2
    assert loss.item() == pytest.approx(out.loss.item(), rel=16 * torch.finfo(torch.float32).eps)
