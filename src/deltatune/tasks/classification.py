"""Sequence classification (single sentences or sentence pairs): accuracy and macro-F1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from ..core.errors import ConfigError
from ..core.targets import HEAD_NAMES
from ..data.loading import require_columns
from .base import Encoded, RunSections, TaskBase
from .batching import feature_rows, pad_collator


class SequenceClassification(TaskBase):
    name = "classification"
    primary_metric = "accuracy"
    metric_names = ("accuracy", "f1", "loss")
    derived = ("labels",)
    unquantized = (*HEAD_NAMES, r".*\.pooler")  # the pooler trains with the head (head_modules); a pattern, as transformers matches

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        data = config.data
        pair = {"data.text_pair_column": data.text_pair_column} if data.text_pair_column else {}
        require_columns(splits, {"data.text_column": data.text_column, "data.label_column": data.label_column, **pair})
        if not self.labels:
            self.labels = sorted({str(v) for v in splits["train"][data.label_column]}, key=_natural)
        if len(self.labels) < 2:
            raise ConfigError(f"the training data has {len(self.labels)} label(s): {self.labels}.",
                              "classification needs at least two labels; check data.label_column.")
        index = {label: i for i, label in enumerate(self.labels)}
        for name, split in splits.items():
            unknown = sorted({str(v) for v in split[data.label_column]} - set(index))
            if unknown:
                raise ConfigError(f"the {name} data has label '{unknown[0]}', which is not in the label "
                                  f"set {self.labels}.", "add it to data.labels, or fix the data.")

        def encode(batch: dict[str, list]) -> dict[str, list]:
            pair = batch[data.text_pair_column] if data.text_pair_column else None
            texts = [t or "" for t in batch[data.text_column]]
            out = tokenizer(texts, pair, truncation=True, max_length=config.model.max_length)
            out["labels"] = [index[str(v)] for v in batch[data.label_column]]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        return DatasetDict({name: split.map(encode, batched=True, remove_columns=split.column_names)
                            for name, split in splits.items()})

    def load_model(self, path: str) -> nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
            **self.pretrained_kwargs())

    def head_modules(self, model: nn.Module) -> list[str]:
        """The classifier, and the body's pooler where the head reads it (BERT-style [CLS] pooling).

        The pooler trains with the head: sentence-embedding checkpoints such as all-MiniLM were
        trained with mean pooling and never taught their pooler to summarise [CLS] for a task.
        """
        heads = [name for name, _ in model.named_children() if name in HEAD_NAMES]
        poolers = [name for name, _ in model.named_modules() if name.count(".") == 1 and name.endswith(".pooler")]
        return poolers + heads

    def collator(self, tokenizer: Any):
        pad = DataCollatorWithPadding(tokenizer)

        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            return pad([{k: v for k, v in e.items() if k != "length"} for e in examples])

        return collate

    def baseline(self, train: Any, validation: Any) -> dict[str, float]:
        """Always the most frequent training label."""
        majority = np.bincount(train["labels"]).argmax()
        logits = np.eye(len(self.labels))[np.full(len(validation), majority)]
        return self.metrics(logits, np.asarray(validation["labels"]))

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        predictions = logits.argmax(-1)
        return {"accuracy": float(accuracy_score(labels, predictions)),
                "f1": float(f1_score(labels, predictions, average="macro"))}

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """Each input is a text or a row with the data's text columns."""
        data = self.config.data
        texts = [x[data.text_column] if isinstance(x, dict) else x for x in inputs]
        if data.text_pair_column and not all(isinstance(x, dict) for x in inputs):
            raise ConfigError(f"this run classifies sentence pairs ({data.text_column}, "
                              f"{data.text_pair_column}); a bare text has no pair.",
                              "pass rows with both columns, e.g. --input pairs.jsonl.")
        pairs = [x[data.text_pair_column] for x in inputs] if data.text_pair_column else None
        encoding = tokenizer(texts, pairs, truncation=True, max_length=self.config.model.max_length)
        return Encoded(texts, feature_rows(encoding))

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each row's probabilities over the labels."""
        with torch.no_grad():
            logits = model(**pad_collator(tokenizer, self.model_keys)(features)).logits.float()
        return list(torch.softmax(logits, -1))

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Label names and probabilities."""
        return [{"text": text, **self._readable(p)} for text, p in zip(encoded.items, outputs)]

    def _readable(self, probabilities: torch.Tensor) -> dict[str, Any]:
        return {"label": self.labels[int(probabilities.argmax())],
                "probabilities": {label: round(float(x), 6) for label, x in zip(self.labels, probabilities)}}


def _natural(label: str) -> tuple:
    """Integer labels sort as numbers (2 before 10); names sort alphabetically."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)
