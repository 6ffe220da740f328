"""Batches in and out: padding examples into tensors, gathering outputs across processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

#: what each padded key is padded with (input_ids: the tokenizer's pad id).
PAD_VALUES = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; its end-of-text id where it has none (GPT-2, LLaMA)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if value is not None:
            return value
    return 0


def pad_collator(tokenizer: Any, keys: Sequence[str], side: str = "right") -> Callable[[list[dict]], dict]:
    """A collate function keeping ``keys`` (where present): lists are padded, scalars stacked.

    Args:
        tokenizer: gives the pad id of ``input_ids``.
        keys: the columns that go into the batch; all others (``length``, offsets) are dropped.
        side: ``right`` for training, ``left`` where generation continues the sequence.

    Returns:
        A function from a list of examples to a dict of tensors.
    """
    values = {**PAD_VALUES, "input_ids": pad_id(tokenizer)}

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        return {key: stack([e[key] for e in examples], values.get(key, 0), side)
                for key in keys if key in examples[0]}

    return collate


def feature_rows(encoding: Any) -> list[dict[str, Any]]:
    """One dict per row of a tokenizer's batch output (``{key: [row 0, row 1, ...]}``)."""
    keys = list(encoding.keys())
    return [dict(zip(keys, values)) for values in zip(*(encoding[k] for k in keys))]


def stack(values: list[Any], pad: int, side: str = "right") -> torch.Tensor:
    """One tensor from scalars, or from lists padded with ``pad`` to the longest."""
    if not isinstance(values[0], (list, tuple)):
        return torch.tensor(values)
    width = max(len(v) for v in values)
    rows = [[pad] * (width - len(v)) + list(v) if side == "left" else list(v) + [pad] * (width - len(v))
            for v in values]
    return torch.tensor(rows)


def concat_padded(arrays: list[np.ndarray], pad: float) -> np.ndarray:
    """Concatenate along axis 0, padding axis 1 (the sequence) to the longest first."""
    if arrays[0].ndim == 1:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=pad)
              for a in arrays]
    return np.concatenate(padded)


def gather_logits(model: torch.nn.Module, loader: Any, accelerator: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """The logits and labels of every example of ``loader``, in order, from all processes.

    Token-level outputs are padded to one length (logits with 0, labels with -100).

    Returns:
        (logits, labels, the split's mean cross-entropy over its scored labels)
    """
    logits, labels = [], []
    for batch in loader:
        batch_logits, batch_labels = model(**without(batch, "labels")).logits, batch["labels"]
        if batch_labels.ndim > 1:  # per token: processes may hold batches of different lengths
            batch_logits = accelerator.pad_across_processes(batch_logits, dim=1)
            batch_labels = accelerator.pad_across_processes(batch_labels, dim=1, pad_index=-100)
        batch_logits, batch_labels = accelerator.gather_for_metrics((batch_logits, batch_labels))
        logits.append(batch_logits.float().cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
    logits, labels = concat_padded(logits, 0.0), concat_padded(labels, -100)
    nll, scored = label_nll(torch.from_numpy(logits), torch.from_numpy(labels))
    return logits, labels, mean_nll(nll.sum().item(), scored.sum().item())


def without(batch: dict[str, torch.Tensor], *targets: str) -> dict[str, torch.Tensor]:
    """The model's inputs without ``targets``: the model then computes no loss that would go unused."""
    return {key: value for key, value in batch.items() if key not in targets}


def label_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and the number of scored labels, per row (labels -100 skipped).

    The loss is computed here, per row, rather than taken from the model: a model's loss is its
    batch's mean, and the last batch of an evaluation split spread over processes is filled up
    with repeated rows, which would count twice.

    Args:
        logits: ``rows x classes``, or ``rows x tokens x classes``.
        labels: ``rows``, or ``rows x tokens``.
    """
    logits = logits.float()
    if labels.ndim > 1:
        logits = logits.transpose(1, 2)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    scored = labels != -100
    if labels.ndim > 1:
        return loss.sum(1), scored.sum(1)
    return loss, scored.long()


def mean_nll(total: float, scored: int) -> float:
    """The mean loss per scored label (0 where nothing was scored)."""
    return total / scored if scored else 0.0


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
