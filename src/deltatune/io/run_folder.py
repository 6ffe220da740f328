"""A training run's folder, the one place its layout is known.

``deltatune train`` writes::

    RUN/run.yaml        the run's config, with what it derived (labels, metric, precision)
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


@dataclass
class RunRecord:
    """What a run folder recorded, as plain data: its ``run.yaml`` and ``report.json``."""

    folder: Path
    config: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in (self.config.get("data") or {}).get("labels") or []]


def read_record(run: Path) -> RunRecord:
    """A run folder's run.yaml and report.json (the report may not be written yet).

    Raises:
        AdapterFileError: either file exists but cannot be read.
    """
    report = run / RUN_REPORT
    return RunRecord(run, _read(run / RUN_CONFIG, loads), _read(report, json.loads) if report.is_file() else {})


def _read(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise AdapterFileError(f"'{path}' cannot be read ({error}).",
                               "restore it, or use a copy of the adapter folder without its run.") from error
    return data if isinstance(data, dict) else {}
