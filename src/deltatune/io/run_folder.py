"""A training run's folder, the one place its layout is known.

``deltatune train`` writes::

    RUN/run.yaml        the run's config as given, and under ``resolved:`` what the run decided
                        that the config left open (precision, metric, labels)
    RUN/report.json     metrics, parameter counts, timings
    RUN/adapter/        the best adapter (adapter_config.json, adapter_model.safetensors)
    RUN/checkpoints/    resumable checkpoints
    RUN/metrics.jsonl   the training and validation log

Every command that takes a run or an adapter (eval, predict, export, serve, inspect, convert)
finds them by :func:`locate`: a run folder means its best adapter; a run's adapter folder knows
its run; any other folder is an adapter on its own (deltatune's or peft's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import AdapterFileError, ConfigError
from ..core.yaml12 import loads
from .adapter_files import CONFIG_NAME, WEIGHTS_NAME

RUN_CONFIG = "run.yaml"
RUN_REPORT = "report.json"
RUN_ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
METRICS_LOG = "metrics.jsonl"


@dataclass(frozen=True)
class Located:
    """What a path names: the adapter folder, and the run that wrote it (None: a bare adapter)."""

    adapter: Path
    run: Path | None


def locate(path: str | Path) -> Located:
    """The adapter and run a RUN or ADAPTER argument names (nothing is read)."""
    path = Path(path)
    if (path / RUN_CONFIG).is_file():
        return Located(path / RUN_ADAPTER, path)
    for folder in (path, path.resolve()):  # as given first, so messages show the user's path
        if folder.name == RUN_ADAPTER and (folder.parent / RUN_CONFIG).is_file():
            return Located(path, folder.parent)
    return Located(path, None)


def find_run(path: str | Path) -> Path:
    """The run folder ``path`` names (the folder, or the run that holds this adapter).

    Raises:
        ConfigError: no run there; for a bare adapter folder the message says how to use it.
    """
    run = locate(path).run
    if run is None:
        bare = any((Path(path) / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))
        hint = " (a bare adapter has no task or labels: load it in Python with deltatune.load_adapter)" if bare else ""
        raise ConfigError(f"'{path}' is not a deltatune run folder (no {RUN_CONFIG}).",
                          f"pass a folder written by 'deltatune train' or its adapter folder{hint}.")
    return run


RESOLVED = "resolved"  # run.yaml's section of what the run decided


@dataclass(frozen=True)
class Resolved:
    """What a run decided that its config left open, recorded in run.yaml beside the config (which
    stays as given), so that a loaded run computes as it trained."""

    #: what it computed in: training.precision with ``auto`` decided for the machine
    precision: str
    #: what chose its best adapter: training.metric_for_best_model, or the task's primary metric
    metric_for_best_model: str
    #: the label set its data gave the head, in head order (data.labels, or read from the data)
    labels: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "metric_for_best_model": self.metric_for_best_model,
                "labels": self.labels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resolved:
        labels = data.get("labels")
        return cls(str(data["precision"]), str(data["metric_for_best_model"]),
                   [str(label) for label in labels] if labels else None)


def run_yaml(config: dict[str, Any], resolved: Resolved) -> dict[str, Any]:
    """run.yaml's content: the config's sections and the resolved one."""
    return {**config, RESOLVED: resolved.to_dict()}


def split_run_yaml(data: dict[str, Any]) -> tuple[dict[str, Any], Resolved | None]:
    """(the config's sections, what the run resolved) of a run.yaml; None for the resolved part of
    a run written before it was recorded apart (its config holds the values).

    Raises:
        AdapterFileError: the resolved section lacks a value.
    """
    config = {k: v for k, v in data.items() if k != RESOLVED}
    if RESOLVED not in data:
        return config, None
    try:
        return config, Resolved.from_dict(data[RESOLVED] or {})
    except (KeyError, TypeError) as error:
        raise AdapterFileError(f"run.yaml's '{RESOLVED}' section lacks {error}.",
                               "restore run.yaml from the run, or train the run again.") from error


@dataclass
class RunRecord:
    """What a run folder recorded, as plain data: its ``run.yaml`` and ``report.json``."""

    folder: Path
    config: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    resolved: Resolved | None = None

    @property
    def labels(self) -> list[str]:
        if self.resolved is not None:
            return self.resolved.labels or []
        return [str(label) for label in (self.config.get("data") or {}).get("labels") or []]


def read_record(run: Path) -> RunRecord:
    """A run folder's run.yaml and report.json (the report may not be written yet).

    Raises:
        AdapterFileError: either file exists but cannot be read.
    """
    report = run / RUN_REPORT
    config, resolved = split_run_yaml(_read(run / RUN_CONFIG, loads))
    return RunRecord(run, config, _read(report, json.loads) if report.is_file() else {}, resolved)


def _read(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise AdapterFileError(f"'{path}' cannot be read ({error}).",
                               "restore it, or use a copy of the adapter folder without its run.") from error
    return data if isinstance(data, dict) else {}
