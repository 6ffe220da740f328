"""Forgetting by hand on a tiny case, and a measurement that fails says so in the report."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltatune import DeltatuneError
from deltatune.compare.measure import Reference, embed, measure
from deltatune.compare.report import markdown

# Two texts; the second token of the first is padding, which the mean must leave out.
BATCH = {"input_ids": torch.tensor([[1, 0, 2], [3, 3, 3]]), "attention_mask": torch.tensor([[1, 0, 1], [1, 1, 1]])}


class Table(nn.Module):
    """A model whose last hidden state is a fixed 2-d vector per token id: embeddings by hand."""

    def __init__(self, vectors: dict[int, tuple[float, float]], fail_on_hidden_states: bool = False):
        super().__init__()
        self.vectors = nn.Parameter(torch.tensor([vectors[i] for i in range(4)], dtype=torch.float))
        self.fail_on_hidden_states = fail_on_hidden_states

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        if output_hidden_states and self.fail_on_hidden_states:
            raise RuntimeError("this model keeps its hidden states to itself")
        hidden = self.vectors[input_ids]  # (texts, tokens, 2)
        return SimpleNamespace(logits=hidden.sum(-1), hidden_states=(hidden,))


BASE = Table({0: (100.0, 100.0), 1: (1.0, 0.0), 2: (0.0, 1.0), 3: (2.0, 0.0)})


def reference(base: nn.Module = BASE) -> Reference:
    """A Reference made by hand: the base model, one batch to time, the texts already embedded."""
    made = Reference.__new__(Reference)
    made.model, made.batches, made.notes = base, [BATCH], {}
    made.general = BATCH, embed(base, BATCH)
    return made


def test_forgetting_by_hand():
    # base: text 1 = mean((1, 0), (0, 1)) = (0.5, 0.5); text 2 = (2, 0)
    # adapted: only token 3 (and the padding) moved: text 1 = (0.5, 0.5), cosine 1;
    # text 2 = (1, 1), cosine to (2, 0) = 2 / (2 sqrt 2) = 1 / sqrt 2.
    adapted = Table({0: (-50.0, 7.0), 1: (1.0, 0.0), 2: (0.0, 1.0), 3: (1.0, 1.0)})
    measured = measure(reference(), adapted)
    assert measured["forgetting"] == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2, abs=1e-5)  # 0.14645
    assert measured["notes"] == {} and measured["latency_ratio"] is not None
    assert measure(reference(), BASE)["forgetting"] == 0.0


def test_a_measurement_that_fails_is_named_with_its_error_in_the_report():
    measured = measure(reference(), Table({0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (2, 0)}, fail_on_hidden_states=True))
    assert measured["forgetting"] is None and measured["latency_ratio"] is not None
    assert measured["notes"] == {"forgetting": "failed: RuntimeError: this model keeps its hidden states to itself"}
    text = markdown({"rows": [row("lora", measured["forgetting"], measured["notes"])], "answers": []})
    assert text.split("\n")[2].endswith("| 1.00 | - | failed |")  # latency, merged (cannot merge), forgetting
    assert "| lora | forgetting | failed: RuntimeError: this model keeps its hidden states to itself |" in text


def test_general_text_that_cannot_be_read_is_a_failure_not_a_missing_number(monkeypatch):
    """Only a bundled set that is not installed leaves forgetting unmeasured without an error
    (and says so); a reader that breaks is a failure with its message."""
    def broken(name):
        raise DeltatuneError(f"'{name}' line 3 has no label.")

    monkeypatch.setattr("deltatune.compare.measure.read_bundled", broken)
    made = reference()
    made.general, made.tokenizer, made.max_length, made.forgetting_texts = None, None, 32, 8
    measured = measure(made, BASE)
    assert measured["forgetting"] is None
    assert measured["notes"]["forgetting"].startswith("failed: DeltatuneError: 'bbc-news' line 3 has no label.")


def row(method: str, forgetting: float | None, notes: dict[str, str]) -> dict:
    """A report row with a latency of 1.00 and no merged latency (a method that cannot merge)."""
    return {"method": method, "model": "minilm-l6", "train_size": None, "seeds": [42], "metric": "accuracy",
            "accuracy": 0.8, "accuracy_std": 0.0, "learning_rate": 1e-3, "verdict": "converged",
            "candidates": [], "trainable_params": 10, "stored_params": 10, "not_stored_params": 0,
            "base_params": 1000, "adapter_bytes": 40, "train_seconds": 1.0, "step_seconds": 0.1,
            "peak_memory_mb": 900.0, "latency_ratio": 1.0, "merged_latency_ratio": None,
            "forgetting": forgetting, "notes": notes}
