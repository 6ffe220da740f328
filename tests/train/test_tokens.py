"""Token classification: label alignment, entity scores, CoNLL files, and a run end to end."""

from __future__ import annotations

import json
import random

import pytest
from datasets import Dataset, DatasetDict

from deltatune import DeltatuneError
from deltatune.assets import dist_file
from deltatune.data.bundled import BUNDLED, read_bundled
from deltatune.data.loading import read_file
from deltatune.tasks.base import task_class
from deltatune.tasks.tokens import TokenClassification, align_labels, entity_scores
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train
from tiny import evaluated_metric_names, logged_losses


def test_first_sub_word_takes_the_label_and_the_rest_minus_100():
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100, -100]


def test_a_known_sentence_is_aligned_with_the_real_tokenizer():
    from transformers import AutoTokenizer

    from deltatune import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path())
    config = load_config(None, ["task.type=tokens", "model.max_length=32"])
    task = TokenClassification(config)
    rows = [{"tokens": ["@paulwalk", "visits", "Empire", "State"], "tags": ["O", "O", "B-facility", "I-facility"]}]
    data = task.prepare(DatasetDict({"train": Dataset.from_list(rows)}), tokenizer, config)["train"][0]
    # [CLS] @ paul ##walk visits empire state [SEP]; tags sorted: O, B-facility, I-facility
    assert tokenizer.convert_ids_to_tokens(data["input_ids"])[1:4] == ["@", "paul", "##walk"]
    assert data["labels"] == [-100, 0, -100, -100, 0, 1, 2, -100]
    assert task.labels == ["O", "B-facility", "I-facility"]


def test_entity_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # entities: true {PER, LOC, ORG}, predicted {PER, ORG, LOC@wrong place}: 2 correct of 3 and 3
    scores = entity_scores(true, predicted)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 6)


def test_conll_reader_blank_and_tab_only_separators_docstart_and_four_columns(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\t\n"
                    "Peter\tB-PER\nBlackburn\tI-PER\n\n\n")
    rows = read_file(str(path)).to_list()
    assert rows == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]


def test_conll_line_without_a_tag_is_refused(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Peter\tB-PER\nBlackburn\n")
    with pytest.raises(DeltatuneError, match="line 2 has no tag"):
        read_file(str(path))


def test_tags_that_are_not_bio_are_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"tokens": ["Peter", "runs"], "tags": ["PER", "O"]}) for _ in range(20)))
    config = load_config(None, ["task.type=tokens", f"data.train_file={path}"])
    from transformers import AutoTokenizer

    from deltatune import assets
    from deltatune.data.loading import load_splits

    with pytest.raises(DeltatuneError, match="'PER', which is not a BIO tag"):
        TokenClassification(config).prepare(load_splits(config.data),
                                             AutoTokenizer.from_pretrained(assets.model_path()), config)


def test_bundled_wnut16_is_the_real_set():
    distribution, suffix, pin, _ = BUNDLED["wnut16"]
    if dist_file(distribution, suffix) is None:  # only a missing package skips: a reader's error fails
        pytest.skip(f"{pin} is not installed")
    rows = read_bundled("wnut16")
    assert len(rows) == 2394 and sum(len(r["tokens"]) for r in rows) == 46469
    assert rows[0]["tokens"][14:17] == ["Empire", "State", "Building"]
    assert rows[0]["tags"][14:17] == ["B-facility", "I-facility", "I-facility"]


PEOPLE = [["John", "Smith"], ["Mary", "Jones"], ["Ahmed", "Khan"], ["Li", "Wei"], ["Anna", "Berg"]]
PLACES = [["Paris"], ["New", "York"], ["Tokyo"], ["Cairo"], ["San", "Diego"]]
FRAMES = [("yesterday {P} flew to {L} for work", 1), ("{P} lives in {L} now", 0),
          ("we met {P} near {L} today", 2), ("in {L} {P} bought a car", 1)]


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    """An easy synthetic NER set: person and place names in a few sentence frames."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        frame, _ = rng.choice(FRAMES)
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        tokens, tags = [], []
        for word in frame.split():
            name, kind = {"{P}": (person, "PER"), "{L}": (place, "LOC")}.get(word, ([word], None))
            tokens += name
            tags += ["O"] if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.mark.slow
def test_ner_trains_end_to_end_and_predicts_words(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ner_rows(200)))
    config = load_config(None, [
        "task.type=tokens", "model.name_or_path=minilm-l6", "model.max_length=24", f"data.train_file={path}",
        "data.validation_size=0.1", "data.test_size=0.1", f"training.output_dir={tmp_path / 'run'}",
        "training.batch_size=16", "training.learning_rate=5e-3", "training.epochs=2", "training.warmup_steps=2",
        "training.logging_steps=2", "training.progress=false", "method.method=lora", "method.r=4"])
    result = train(config)
    losses = logged_losses(tmp_path / "run")
    assert evaluated_metric_names(tmp_path / "run") == set(task_class("tokens").metric_names)
    assert losses[-1] < losses[0] / 2
    assert result.metrics["test_f1"] > 0.5  # an all-O tagger scores 0
    [row] = predict_texts(tmp_path / "run", ["yesterday Mary Jones flew to New York for work"])
    assert row["tokens"][1:3] == ["Mary", "Jones"] and len(row["tags"]) == 9
    assert {"type": "PER", "text": "Mary Jones", "start": 1, "end": 3} in row["entities"]
