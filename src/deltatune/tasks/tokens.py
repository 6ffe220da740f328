"""Token classification (named entities): a tag per word, scored per entity with seqeval.

Words are tokenised into sub-words; each word's tag goes to its first sub-word and the others
get -100, so the loss, the metrics and the predictions all count each word once:

    words      Empire      State    Building
    sub-words  em  ##pire  state    building
    labels     B   -100    I        I

Precision, recall and F1 are entity-level (an entity counts when its type and every word
boundary match), as conlleval reports them; ``accuracy`` is per word. Words cut off by
``model.max_length`` are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from torch import nn
from transformers import AutoModelForTokenClassification

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..data.loading import require_columns
from .base import Encoded, RunSections, TaskBase, TaskConfig
from .batching import feature_rows, pad_collator

PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


@dataclass
class TokensTaskConfig(TaskConfig):
    tokens_column: str = help_field("tokens", "Column with each sentence's words (a list of strings).")
    tags_column: str = help_field("tags", "Column with one BIO tag per word (B-person, I-person, O).")


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Word labels moved onto sub-word tokens: the first sub-word of a word gets its label,
    later sub-words and special tokens (word id None) get -100.

    Args:
        word_ids: the word index of each token, as a fast tokenizer's ``word_ids()`` gives it.
        word_labels: one label id per word.

    Returns:
        One label per token.
    """
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def entity_scores(true: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, conlleval rules) and per-word accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"precision": float(precision_score(true, predicted, zero_division=0)),
            "recall": float(recall_score(true, predicted, zero_division=0)),
            "f1": float(f1_score(true, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(true, predicted))}


def tag_order(tag: str) -> tuple:
    """O first, then by entity type, B- before I-."""
    return (0, "", "") if tag == "O" else (1, tag[2:], tag[:2])


class TokenClassification(TaskBase):
    name = "tokens"
    primary_metric = "f1"
    metric_names = ("precision", "recall", "f1", "accuracy", "loss")
    derived = ("labels",)
    config_class = TokensTaskConfig

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("token classification needs a fast tokenizer (word_ids()).",
                              "use a model folder with a tokenizer.json.")
        words, tags = self.options.tokens_column, self.options.tags_column
        require_columns(splits, {"task.tokens_column": words, "task.tags_column": tags})
        named = {name: [self._tag_names(row, name, i) for i, row in enumerate(split[tags])]
                 for name, split in splits.items()}
        if not self.labels:
            self.labels = sorted({t for row in named["train"] for t in row}, key=tag_order)
        self._check_tags(named)
        index = {tag: i for i, tag in enumerate(self.labels)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(batch[words], is_split_into_words=True, truncation=True,
                            max_length=config.model.max_length)
            out["labels"] = [align_labels(out.word_ids(i), [index[t] for t in row])
                             for i, row in enumerate(batch["_tags"])]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        return DatasetDict({name: split.add_column("_tags", named[name]).map(
            encode, batched=True, remove_columns=split.column_names + ["_tags"])
            for name, split in splits.items()})

    def _tag_names(self, row: Any, split: str, i: int) -> list[str]:
        if not isinstance(row, list):
            raise ConfigError(f"the {split} data's {self.options.tags_column} in row {i} is {row!r}, not a list.",
                              "give one list of tags per sentence.")
        if row and isinstance(row[0], int):  # integer tags (as in HF datasets) are named by data.labels
            if not self.labels:
                raise ConfigError(f"the {split} data has integer tags.", "name them in order with data.labels.")
            return [self.labels[t] for t in row]
        return [str(t) for t in row]

    def _check_tags(self, named: dict[str, list[list[str]]]) -> None:
        for split, rows in named.items():
            for tag in {t for row in rows for t in row}:
                if tag != "O" and not tag.startswith(PREFIXES):
                    raise ConfigError(f"the {split} data has tag '{tag}', which is not a BIO tag.",
                                      "tag entities B-TYPE / I-TYPE and everything else O.")
                if tag not in self.labels:
                    raise ConfigError(f"the {split} data has tag '{tag}', which is not in the tag set "
                                      f"{self.labels}.", "add it to data.labels, or fix the data.")

    def load_model(self, path: str) -> nn.Module:
        return AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
            **self.pretrained_kwargs())

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        predictions = logits.argmax(-1)
        true, predicted = [], []
        for row_predictions, row_labels in zip(predictions, labels):
            scored = row_labels != -100
            true.append([self.labels[i] for i in row_labels[scored]])
            predicted.append([self.labels[i] for i in row_predictions[scored]])
        return entity_scores(true, predicted)

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """An input is a text (split on spaces), a list of words, or a row with the words column."""
        sentences = [self._words(x) for x in inputs]
        encoding = tokenizer(sentences, is_split_into_words=True, truncation=True,
                             max_length=self.config.model.max_length)
        features = [{**row, "word_ids": encoding.word_ids(i)} for i, row in enumerate(feature_rows(encoding))]
        return Encoded(sentences, features)

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[list[int]]:
        """Each row's predicted label id per token."""
        with torch.no_grad():
            return model(**pad_collator(tokenizer, self.model_keys)(features)).logits.argmax(-1).tolist()

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[list[int]]) -> list[dict[str, Any]]:
        """A tag per word and the entities found."""
        return [self._readable(words, row["word_ids"], predicted)
                for words, row, predicted in zip(encoded.items, encoded.features, outputs)]

    def _words(self, item: Any) -> list[str]:
        if isinstance(item, dict):
            return list(item[self.options.tokens_column])
        return item.split() if isinstance(item, str) else list(item)

    def _readable(self, words: list[str], word_ids: list[int | None], predictions: list[int]) -> dict[str, Any]:
        from seqeval.metrics.sequence_labeling import get_entities

        tags = ["O"] * len(words)  # words past max_length keep O
        for position, label in zip(align_labels(word_ids, list(range(len(words)))), predictions):
            if position != -100:
                tags[position] = self.labels[label]
        entities = [{"type": kind, "text": " ".join(words[start:end + 1]), "start": start, "end": end + 1}
                    for kind, start, end in get_entities(tags)]
        return {"tokens": words, "tags": tags, "entities": entities}
