"""The task interface the training loop talks to. The loop never asks which task it runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from datasets import DatasetDict
from torch import nn

from ..core.errors import ConfigError


class Task(Protocol):
    """What a task provides: a model with its head, tokenised splits, batches and metrics."""

    name: str
    #: the metric that "better" means for this task (e.g. accuracy).
    primary_metric: str

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: Any) -> DatasetDict:
        """Check columns and labels, tokenise; keep model inputs, ``labels`` and ``length``."""

    def load_model(self, path: str) -> nn.Module:
        """The pre-trained model with this task's head."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """Names of the head modules, always trained and saved with the adapter."""

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Pads a list of examples into a batch."""

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics under their usual names (without the eval_ prefix)."""

    def predict(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """Readable predictions: label names and probabilities."""


def task_for(config: Any) -> Task:
    from .classification import SequenceClassification

    tasks = {"classification": SequenceClassification}
    if config.task.type not in tasks:
        raise ConfigError(f"unknown task.type '{config.task.type}'.", f"choose one of: {', '.join(tasks)}.")
    return tasks[config.task.type](config)
