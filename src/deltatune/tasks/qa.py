"""Extractive question answering: start and end logits over the context, scored like SQuAD.

A context longer than ``model.max_length`` is cut into windows that overlap by ``task.stride``
tokens, each paired with the question:

    [CLS] question [SEP] context tokens 0..k   [SEP]
    [CLS] question [SEP] context tokens k-s.. [SEP]      s = stride

In training a window whose context holds the whole answer points at its first and last token;
any other window points at [CLS]. In evaluation and prediction the best valid span over all
windows of a question (end >= start, at most ``max_answer_length`` tokens) is mapped back to
characters of the context. Rows: ``question``, ``context``, ``answers`` as
``{text: [...], answer_start: [...]}`` (SQuAD's layout, also read from SQuAD JSON files), a
single ``{text, answer_start}``, or a list of those.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import AutoModelForQuestionAnswering

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..data.loading import require_columns
from .base import Encoded, RunSections, TaskBase, TaskConfig
from .batching import feature_rows, label_nll, mean_nll, pad_collator, without
from .spans import Offset, best_span, squad_scores, token_span

Answer = tuple[str, int]  # (text, first character in the context)


@dataclass
class QaTaskConfig(TaskConfig):
    question_column: str = help_field("question", "Column with the question.")
    context_column: str = help_field("context", "Column with the passage that holds the answer.")
    answers_column: str = help_field("answers", "Column with the answers: {text: [...], answer_start: [...]}.")
    stride: int = help_field(32, "Tokens shared by neighbouring windows of a long context.", range="[0, inf)")
    max_answer_length: int = help_field(30, "The longest answer predicted, in tokens.", range="[1, inf)")
    n_best: int = help_field(20, "Start and end candidates per window when looking for the best span.",
                             range="[1, inf)")


def answer_list(value: Any) -> list[Answer]:
    """The (text, answer_start) pairs of one row's answers, whatever of the accepted shapes."""
    if not value:
        return []
    if isinstance(value, list):
        return [pair for item in value for pair in answer_list(item)]
    texts, starts = value.get("text"), value.get("answer_start")
    if isinstance(texts, str):
        return [(texts, int(starts))]
    return [(t, int(s)) for t, s in zip(texts or [], starts or [])]


def span_nll(logits: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature, the cross-entropy of one end of the answer and whether it was scored: as in
    transformers' question-answering heads, a position past the window is not scored."""
    width = logits.shape[1]
    positions = positions.clamp(0, width)
    return label_nll(logits, positions.masked_fill(positions == width, -100))


class QuestionAnswering(TaskBase):
    name = "qa"
    primary_metric = "exact_match"
    metric_names = ("exact_match", "f1", "loss")
    config_class = QaTaskConfig
    model_keys = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        o = self.options
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("qa needs a fast tokenizer (offset mappings).", "use a folder with a tokenizer.json.")
        if not 0 <= o.stride < config.model.max_length // 2:
            raise ConfigError(f"task.stride = {o.stride} is invalid for model.max_length {config.model.max_length}.",
                              f"use a stride of at least 0 and below {config.model.max_length // 2}.")
        require_columns(splits, {"task.question_column": o.question_column, "task.context_column": o.context_column,
                                 "task.answers_column": o.answers_column})
        return DatasetDict({name: self._features(split, tokenizer, name) for name, split in splits.items()})

    def _features(self, split: Dataset, tokenizer: Any, name: str) -> Dataset:
        o = self.options

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            answers = [answer_list(a) for a in batch[o.answers_column]]
            for i, (context, pairs) in enumerate(zip(batch[o.context_column], answers)):
                self._check_answers(context, pairs, name, indices[i])
            out, offsets, samples = self._windows(tokenizer, batch[o.question_column], batch[o.context_column])
            spans = [token_span(w, a[0][1], a[0][1] + len(a[0][0])) if a else (0, 0)
                     for w, a in zip(offsets, (answers[s] for s in samples))]
            out["start_positions"], out["end_positions"] = [s for s, _ in spans], [e for _, e in spans]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            if name != "train":  # what evaluation maps the logits back with
                out["example_id"] = [indices[s] for s in samples]
                out["offset_mapping"] = [[list(x) if x else [-1, -1] for x in w] for w in offsets]
                out["context"] = [batch[o.context_column][s] for s in samples]
                out["answer_texts"] = [[t for t, _ in answers[s]] for s in samples]
            return out

        return split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names)

    @staticmethod
    def _check_answers(context: str, pairs: list[Answer], split: str, row: int) -> None:
        for text, start in pairs:
            if context[start:start + len(text)] != text:
                raise ConfigError(f"the {split} data's row {row} has answer {text!r} at character {start}, but the "
                                  f"context there reads {context[start:start + len(text)]!r}.",
                                  "answer_start must be the answer's first character in the context (0-based).")

    def _windows(self, tokenizer: Any, questions: list[str], contexts: list[str]):
        """Tokenised windows, the context offsets of each token (None elsewhere), each window's row."""
        enc = tokenizer([q.strip() for q in questions], contexts, truncation="only_second",
                        max_length=self.config.model.max_length, stride=self.options.stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        offsets = [[tuple(x) if s == 1 else None for x, s in zip(row, enc.sequence_ids(i))]
                   for i, row in enumerate(enc["offset_mapping"])]
        samples = list(enc["overflow_to_sample_mapping"])
        out = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return out, offsets, samples

    def load_model(self, path: str) -> nn.Module:
        return AutoModelForQuestionAnswering.from_pretrained(path, **self.pretrained_kwargs())

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Exact match and F1 of the best span per question; the features' extra columns
        (example_id, offset_mapping, context, answer_texts) come from ``loader.dataset``, in
        the order the gathered logits come back in."""
        starts, ends = [], []
        totals = torch.zeros(2, 2, dtype=torch.float64)  # (start, end) x (summed loss, scored features)
        for batch in loader:
            out = model(**without(batch, "start_positions", "end_positions"))
            for row, (logits, key) in enumerate(((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))):
                # gathered before padding: the window width decides which positions are scored
                nll, scored = accelerator.gather_for_metrics(span_nll(logits, batch[key]))
                totals[row] += torch.stack([nll.sum().double(), scored.sum().double()]).cpu()
            logits = [accelerator.pad_across_processes(t, dim=1, pad_index=-1e4)
                      for t in (out.start_logits, out.end_logits)]
            start, end = accelerator.gather_for_metrics(tuple(logits))
            starts += list(start.float().cpu().numpy())
            ends += list(end.float().cpu().numpy())
        features = loader.dataset
        offsets = [[None if x[0] < 0 else tuple(x) for x in row] for row in features["offset_mapping"]]
        answers = self._best_answers(starts, ends, offsets, features["example_id"], features["context"])
        golds = dict(zip(features["example_id"], features["answer_texts"]))
        order = sorted(golds)
        return {**squad_scores([answers[k][0] for k in order], [golds[k] for k in order]),
                "loss": sum(mean_nll(loss.item(), int(scored)) for loss, scored in totals) / 2}

    def _best_answers(self, starts: list, ends: list, offsets: list[list[Offset]], examples: list[int],
                      contexts: list[str]) -> dict[int, tuple[str, int, int, float]]:
        """The best answer (text, start, end, score) of each example over its windows."""
        windows, context_of = defaultdict(list), {}
        for s, e, o, example, context in zip(starts, ends, offsets, examples, contexts):
            windows[example].append((s, e, o))
            context_of[example] = context
        answers = {}
        for example, items in windows.items():
            span = best_span(items, self.options.max_answer_length, self.options.n_best)
            a, b, score = span or (0, 0, float("-inf"))
            answers[example] = (context_of[example][a:b], a, b, score)
        return answers

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """Each input is a ``{question, context}`` row; a long context gives several windows."""
        o = self.options
        if not all(isinstance(x, dict) and o.question_column in x and o.context_column in x for x in inputs):
            raise ConfigError(f"qa predicts from rows with '{o.question_column}' and '{o.context_column}'.",
                              "pass --input rows.jsonl with both columns.")
        questions, contexts = [x[o.question_column] for x in inputs], [x[o.context_column] for x in inputs]
        out, offsets, samples = self._windows(tokenizer, questions, contexts)
        features = [{**row, "offsets": offsets[i], "sample": samples[i]} for i, row in enumerate(feature_rows(out))]
        return Encoded(list(zip(questions, contexts)), features)

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[tuple]:
        """Each window's (start logits, end logits)."""
        with torch.no_grad():
            out = model(**pad_collator(tokenizer, self.model_keys)(features))
        return list(zip(out.start_logits.float().numpy(), out.end_logits.float().numpy()))

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[tuple]) -> list[dict[str, Any]]:
        """The answer span of each question, with its characters and score."""
        samples = [row["sample"] for row in encoded.features]
        contexts = [context for _, context in encoded.items]
        answers = self._best_answers([start for start, _ in outputs], [end for _, end in outputs],
                                     [row["offsets"] for row in encoded.features], samples,
                                     [contexts[s] for s in samples])
        return [{"question": question, "answer": answers[i][0], "start": answers[i][1], "end": answers[i][2],
                 "score": round(answers[i][3], 4)} for i, (question, _) in enumerate(encoded.items)]
