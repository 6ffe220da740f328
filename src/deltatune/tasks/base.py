"""The task interface the training loop talks to. The loop never asks which task it runs.

A task owns everything that differs between kinds of problem: the head (``load_model``), the
tokenisation (``prepare``), the batches (``collator``), the evaluation and the predictions.
:class:`TaskBase` gives the defaults most tasks keep: new heads are trained and saved, batches
are padded, and evaluation gathers logits and labels and hands them to ``metrics``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from datasets import DatasetDict
from torch import nn

from ..assets import DEFAULT_MODEL, MODELS
from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.targets import HEAD_NAMES
from ..data.config import DataConfig
from ..hf.quantization import QuantizationConfig, quantization_kwargs
from .batching import chunks, gather_logits, pad_collator

# task.type -> (module in deltatune.tasks, class)
TASKS = {
    "classification": ("classification", "SequenceClassification"),
    "tokens": ("tokens", "TokenClassification"),
    "qa": ("qa", "QuestionAnswering"),
    "causal_lm": ("causal_lm", "CausalLanguageModeling"),
    "seq2seq": ("seq2seq", "SequenceToSequence"),
}
#: metrics where smaller is better; every other metric is better when larger.
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class ModelConfig:
    """The ``model:`` section: which pre-trained model the task loads, and how long its inputs are."""

    name_or_path: str = help_field(DEFAULT_MODEL, f"A bundled model name ({', '.join(MODELS)}) or a local "
                                   "directory that from_pretrained can load.")
    max_length: int = help_field(128, "Tokens per example; longer inputs are truncated.", range="[1, inf)")
    config_overrides: dict = help_field({}, "Values passed to from_pretrained to change the model's "
                                        "config, e.g. {hidden_dropout_prob: 0.0}.")
    dropout: float | None = help_field(
        None, "Set every dropout probability of the pre-trained model (hidden, attention, residual, "
              "embedding, head: whatever its architecture names them) to this value; the method's own "
              "dropout (lora_dropout...) apart. null: the model's own.", range="[0, 1)")
    quantization: QuantizationConfig | None = help_field(
        None, "Load the frozen base quantised by bitsandbytes (QLoRA), with transformers' BitsAndBytesConfig "
              "names, e.g. {load_in_4bit: true, bnb_4bit_quant_type: nf4}; the task head stays unquantised. "
              "Needs deltatune[quant].")


@dataclass
class TaskConfig:
    """The ``task:`` section. Tasks with options of their own subclass it (one level)."""

    type: str = help_field("classification", "The task: classification, tokens (NER), qa (extractive "
                                             "question answering), causal_lm or seq2seq.")


class RunSections(Protocol):
    """The sections of a run config that a task reads (``RunConfig`` has them)."""

    model: ModelConfig
    task: TaskConfig
    data: DataConfig


@dataclass
class Encoded:
    """Raw inputs made ready for the model by ``Task.encode``."""

    #: what ``decode`` gives back of each input: its text, words, prompt or question and context.
    items: list[Any]
    #: one model row each, unpadded: the model's inputs, plus what ``decode`` reads back (a
    #: word's position, a window's offsets); several rows per input where a long QA context is
    #: cut into windows.
    features: list[dict[str, Any]]


class Task(Protocol):
    """What a task provides: a model with its head, tokenised splits, batches, metrics, predictions."""

    name: str
    #: the metric that "better" means for this task (accuracy, f1, exact_match, perplexity, rouge1).
    primary_metric: str
    #: every metric ``evaluate`` returns, ``loss`` included: what ``metric_for_best_model`` may name.
    metric_names: tuple[str, ...]
    #: the attributes ``prepare`` sets from the data (e.g. ``labels``), kept with a cached data set
    derived: tuple[str, ...]
    #: the label set, in head order (classification, tokens): data.labels, or what ``prepare``
    #: read from the data; empty for tasks without one
    labels: list[str]

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        """Check columns and labels, tokenise; keep model inputs, labels and ``length``."""

    def load_model(self, path: str) -> nn.Module:
        """The pre-trained model with this task's head."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """Names of the new head modules, always trained and saved with the adapter."""

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Pads a list of examples into a batch of model inputs (and the labels the model takes)."""

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Metrics and ``loss`` over one loader (in eval mode, without gradients), unprefixed."""

    def predict(self, model: nn.Module, tokenizer: Any, inputs: list[Any]) -> list[dict[str, Any]]:
        """Readable predictions for raw inputs: texts, or rows with the task's columns."""

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """Raw inputs as unpadded model rows; raises ConfigError for inputs the task cannot read."""

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[Any]:
        """One output per feature row (logits, spans' logits, generated ids), the rows padded
        into one batch; rows of other runs of this task may share it."""

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[Any]) -> list[dict[str, Any]]:
        """Readable rows, one per input, from ``forward``'s outputs for ``encoded.features``."""


class TaskBase:
    """Defaults for tasks: heads by name, padding collation, evaluation by logits and labels."""

    name = ""
    primary_metric = ""
    metric_names: tuple[str, ...] = ()
    config_class: type[TaskConfig] = TaskConfig
    #: the batch keys the model takes; the collator drops every other column.
    model_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels")
    #: what ``prepare`` learns from the data and keeps on the task (the label set, the tokenizer
    #: evaluation decodes with): a task built again for the same data takes these over.
    derived: tuple[str, ...] = ()
    #: modules a quantised base keeps in full precision: the heads, and what trains with them
    unquantized: tuple[str, ...] = HEAD_NAMES

    def __init__(self, config: RunSections):
        self.config = config
        self.options = config.task
        self.labels: list[str] = [str(label) for label in config.data.labels or []]

    def pretrained_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` takes beside the path: the config overrides and the quantisation."""
        model = self.config.model
        return {**model.config_overrides, **quantization_kwargs(model.quantization, self.unquantized)}

    def head_modules(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_children() if name in HEAD_NAMES]

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        return pad_collator(tokenizer, self.model_keys)

    def predict(self, model: nn.Module, tokenizer: Any, inputs: list[Any]) -> list[dict[str, Any]]:
        """Readable predictions for raw inputs, ``training.eval_batch_size`` inputs per forward pass."""
        rows = []
        for chunk in chunks(inputs, self.config.training.eval_batch_size):
            encoded = self.encode(tokenizer, list(chunk))
            rows += self.decode(tokenizer, encoded, self.forward(model, tokenizer, encoded.features))
        return rows

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        logits, labels, loss = gather_logits(model, loader, accelerator)
        return {**self.metrics(logits, labels), "loss": loss}

    def baseline(self, train: Any, validation: Any) -> dict[str, float]:
        """Validation metrics of a trivial predictor (none by default); ``compare`` calls a run
        that never beats it "not learning"."""
        return {}

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must define metrics() or override evaluate().")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (``loss``, ``eval_perplexity``...) is better."""
    return metric.endswith(LOWER_IS_BETTER)


def task_class(task_type: str) -> type:
    """The task class registered under ``task_type``.

    Raises:
        ConfigError: no task has that name.
    """
    if task_type not in TASKS:
        raise ConfigError(f"unknown task.type '{task_type}'.", f"choose one of: {', '.join(TASKS)}.")
    module, name = TASKS[task_type]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def task_for(config: RunSections) -> Task:
    """The task object of a run config (``config.task.type``)."""
    return task_class(config.task.type)(config)
