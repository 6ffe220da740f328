"""Answer spans for extractive QA: character spans to token positions and back, the best span
across the windows of a long context, and SQuAD's exact match and F1.

Exact match and F1 follow the official SQuAD evaluation script: both strings are normalised
(lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed); F1 is
the harmonic mean of precision and recall over the bag of normalised words; each prediction
takes its best score over the gold answers; an unanswerable question (no gold answer) scores
1 only for an empty prediction.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

#: a token's (first, past-last) character in the context; None for question and special tokens.
Offset = tuple[int, int] | None
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Word-overlap F1 of the normalised strings (1.0 when both are empty)."""
    predicted, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not true:
        return float(predicted == true)
    common = sum((Counter(predicted) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (fractions, not percentages), each the best over the gold answers.

    Args:
        predictions: one answer text per question.
        golds: the gold answer texts of each question; an empty list means unanswerable.

    Returns:
        ``{"exact_match": ..., "f1": ...}``
    """
    em = [max(exact_match(p, g) for g in (gold or [""])) for p, gold in zip(predictions, golds)]
    word_f1 = [max(f1(p, g) for g in (gold or [""])) for p, gold in zip(predictions, golds)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(word_f1))}


def token_span(offsets: Sequence[Offset], start_char: int, end_char: int) -> tuple[int, int]:
    """The first and last token of the characters [start_char, end_char) in one window.

    Returns:
        (start, end) token positions, or (0, 0), the [CLS] position, where the answer is not
        wholly inside the window's part of the context.
    """
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in inside if offsets[i][1] > start_char)
    end = next(i for i in reversed(inside) if offsets[i][0] < end_char)
    return start, end


def best_span(windows: Sequence[tuple[np.ndarray, np.ndarray, Sequence[Offset]]], max_answer_length: int,
              n_best: int = 20) -> tuple[int, int, float] | None:
    """The highest-scoring valid answer over all windows of one context.

    A span is valid when both ends are context tokens, end >= start, and it is at most
    ``max_answer_length`` tokens long; its score is start logit + end logit. Only the
    ``n_best`` highest start and end logits of each window are paired.

    Args:
        windows: (start_logits, end_logits, offsets) per window; offsets as in :data:`Offset`.
        max_answer_length: the longest answer, in tokens.
        n_best: candidates per end and window.

    Returns:
        (start_char, end_char, score) in the context, or None where no span is valid.
    """
    best = None
    for start_logits, end_logits, offsets in windows:
        length = len(offsets)
        starts = np.argsort(start_logits[:length])[::-1][:n_best]
        ends = np.argsort(end_logits[:length])[::-1][:n_best]
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if best is None or score > best[2]:
                    best = (offsets[s][0], offsets[e][1], score)
    return best
