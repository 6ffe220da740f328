"""Sequence to sequence (summarisation, translation) on encoder-decoder models, scored by ROUGE.

The source is encoded; the target is the decoder's labels (the model shifts them right to make
its inputs). Evaluation generates greedily for every example, so it costs more than a forward
pass: ROUGE-1, ROUGE-2 and ROUGE-L F-measures (``rouge-score``, Porter stemming) against the
target, and the loss per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from torch import nn
from transformers import AutoModelForSeq2SeqLM

from ..core.fields import help_field
from ..data.loading import require_columns
from .base import Encoded, RunSections, TaskBase, TaskConfig
from .batching import feature_rows, label_nll, mean_nll, pad_collator

ROUGE = ("rouge1", "rouge2", "rougeL")


@dataclass
class Seq2SeqTaskConfig(TaskConfig):
    source_column: str = help_field("source", "Column with the input text.")
    target_column: str = help_field("target", "Column with the output text the model learns.")
    max_target_length: int = help_field(64, "Target tokens kept for training; longer targets are cut.",
                                        range="[1, inf)")
    max_new_tokens: int = help_field(64, "Tokens generated per input in evaluation and predict.", range="[1, inf)")


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (fractions), with Porter stemming.

    Args:
        predictions: one generated text per example.
        references: the target text of each example.

    Returns:
        ``{"rouge1": ..., "rouge2": ..., "rougeL": ...}``
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {name: float(np.mean([s[name].fmeasure for s in scores])) for name in ROUGE}


class SequenceToSequence(TaskBase):
    name = "seq2seq"
    primary_metric = "rouge1"
    metric_names = (*ROUGE, "loss")
    derived = ("tokenizer",)
    config_class = Seq2SeqTaskConfig
    model_keys = ("input_ids", "attention_mask", "labels")

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        o = self.options
        require_columns(splits, {"task.source_column": o.source_column, "task.target_column": o.target_column})
        self.tokenizer = tokenizer  # evaluation decodes with the tokenizer that made the data

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer([s or "" for s in batch[o.source_column]], truncation=True,
                            max_length=config.model.max_length)
            out["labels"] = tokenizer(text_target=[t or "" for t in batch[o.target_column]], truncation=True,
                                      max_length=o.max_target_length)["input_ids"]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        return DatasetDict({name: split.map(encode, batched=True, remove_columns=split.column_names)
                            for name, split in splits.items()})

    def load_model(self, path: str) -> nn.Module:
        return AutoModelForSeq2SeqLM.from_pretrained(path, **self.pretrained_kwargs())

    def head_modules(self, model: nn.Module) -> list[str]:
        return []  # the LM head is pre-trained, not new

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """ROUGE of greedy generations against the targets, and the mean loss."""
        pad = model.config.pad_token_id or 0
        generated, targets, total, count = [], [], 0.0, 0
        for batch in loader:
            nll, tokens = accelerator.gather_for_metrics(label_nll(model(**batch).logits, batch["labels"]))
            total, count = total + nll.sum().item(), count + int(tokens.sum().item())
            out = self._generate(accelerator.unwrap_model(model), batch["input_ids"], batch["attention_mask"])
            out = accelerator.pad_across_processes(out, dim=1, pad_index=pad)
            labels = accelerator.pad_across_processes(batch["labels"], dim=1, pad_index=-100)
            out, labels = accelerator.gather_for_metrics((out, labels))
            generated += out.tolist()
            targets += labels.masked_fill(labels == -100, pad).tolist()
        texts = [self.tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in (generated, targets)]
        return {**rouge_scores(*texts), "loss": mean_nll(total, count)}

    def _generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=self.options.max_new_tokens)

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """An input is a text, or a row with the source column."""
        sources = [x[self.options.source_column] if isinstance(x, dict) else x for x in inputs]
        encoding = tokenizer(sources, truncation=True, max_length=self.config.model.max_length)
        return Encoded(sources, feature_rows(encoding))

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each row's greedy output ids."""
        batch = pad_collator(tokenizer, ("input_ids", "attention_mask"))(features)
        with torch.no_grad():
            return list(self._generate(model, batch["input_ids"], batch["attention_mask"]))

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Greedy outputs."""
        texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return [{"source": s, "output": text.strip()} for s, text in zip(encoded.items, texts)]
