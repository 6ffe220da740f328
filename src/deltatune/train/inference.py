"""Use a finished run: evaluate it on a split or a file, predict for new inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from ..core.errors import ConfigError
from ..core.yaml12 import read_yaml
from ..data.loading import load_splits, read_file
from ..io.adapter_files import load_adapter
from ..io.run_folder import RUN_ADAPTER, RUN_CONFIG, Resolved, find_run, split_run_yaml
from ..tasks import task_for
from .config import RunConfig, best_model_metric
from .loop import evaluate
from .precision import compute_in, resolve
from .setup import resolve_model_path


def read_run(path: str | Path) -> tuple[Path, RunConfig, Any, Resolved]:
    """(run folder, config, task, what the run resolved) of a finished run, without loading any
    model; the task knows the run's labels."""
    folder = find_run(path)
    data, resolved = split_run_yaml(read_yaml(folder / RUN_CONFIG))
    config = RunConfig.from_dict(data)
    # a run written before run.yaml had a resolved section filled these into its config
    resolved = resolved or Resolved(config.training.precision, best_model_metric(config), config.data.labels)
    task = task_for(config)
    task.labels = list(resolved.labels or task.labels)
    return folder, config, task, resolved


def run_precision(resolved: Resolved, precision: str | None = None) -> str:
    """The precision to use a run in: ``precision`` when given, else the one the run trained in
    (an old run.yaml may say ``auto``: decided for this machine)."""
    return resolve(precision or resolved.precision)


def load_run(path: str | Path, precision: str | None = None) -> tuple[RunConfig, Any, Any, torch.nn.Module]:
    """(config, task, tokenizer, model with the run's best adapter loaded), in eval mode, computing
    in ``precision`` (default: the run's own)."""
    folder, config, task, resolved = read_run(path)
    model_path = resolve_model_path(config.model.name_or_path)
    model = compute_in(task.load_model(model_path), run_precision(resolved, precision))
    load_adapter(model, folder / RUN_ADAPTER)
    return config, task, AutoTokenizer.from_pretrained(model_path), model.eval()


def evaluate_run(path: str | Path, data_file: str | None = None, precision: str | None = None) -> dict[str, float]:
    """Metrics of a run's adapter on ``data_file``, or on the run's own test split."""
    config, task, tokenizer, model = load_run(path, precision)
    if data_file:
        splits = DatasetDict({"test": read_file(data_file)})
    else:
        splits = DatasetDict({"test": load_splits(config.data)["test"]})
    data = task.prepare(splits, tokenizer, config)
    loader = DataLoader(data["test"], batch_size=config.training.eval_batch_size,
                        collate_fn=task.collator(tokenizer))
    return evaluate(model, loader, task, Accelerator(cpu=True), "test")


def predict_texts(path: str | Path, inputs: list[Any], precision: str | None = None) -> list[dict[str, Any]]:
    """The run's predictions for raw inputs, each given back with what it was predicted from.

    Args:
        path: a run folder (or its adapter folder).
        inputs: texts, or rows with the task's columns (a question and a context for qa).
        precision: fp32, bf16, fp16 or auto; default: the precision the run trained in.

    Returns:
        One dict per input: label and probabilities (classification), tags and entities
        (tokens), answer and span (qa), completion (causal_lm).
    """
    _, task, tokenizer, model = load_run(path, precision)
    return task.predict(model, tokenizer, list(inputs))


def read_texts(path: str, column: str | None = None) -> list[Any]:
    """Inputs from a plain text file (one per line) or a data file: the values of ``column``,
    or whole rows when no column is named (the task picks its columns)."""
    if Path(path).suffix.lower() == ".txt":
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    table: Dataset = read_file(path)
    if column is None:
        return list(table)
    if column not in table.column_names:
        raise ConfigError(f"'{path}' has no column '{column}'.", f"its columns: {', '.join(table.column_names)}.")
    return list(table[column])
