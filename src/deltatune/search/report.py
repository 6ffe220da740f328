"""A search's results: ``tune.json`` (every trial), ``tune.md`` (best first) and ``best.yaml``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.yaml12 import dumps
from ..io.atomic import atomic_write_text

STATE_ORDER = {"complete": 0, "pruned": 1, "failed": 2}


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]  # {config path: value}
    #: the metric of the best checkpoint; for a pruned trial, its last evaluation; None when failed.
    value: float | None
    state: str  # complete, pruned or failed
    seconds: float | None
    intermediate: list[float]  # the metric at each evaluation, as the pruner saw it
    message: str | None = None  # why a trial failed
    run_dir: str = ""


@dataclass
class TuneResult:
    output_dir: str
    metric: str  # eval_accuracy, eval_perplexity, ...
    direction: str  # maximize or minimize
    trials: list[TrialRecord]
    best: TrialRecord | None  # the best complete trial; None while no trial completed
    best_config: str | None  # best.yaml: the run config with the best parameters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def best_trial(trials: list[TrialRecord], direction: str) -> TrialRecord | None:
    """The complete trial with the best value; the earliest among equals."""
    ranked = ranked_trials(trials, direction)
    return ranked[0] if ranked and ranked[0].state == "complete" else None


def ranked_trials(trials: list[TrialRecord], direction: str) -> list[TrialRecord]:
    """Complete trials best first, then pruned ones (by their last value), then failed ones."""
    sign = 1 if direction == "minimize" else -1
    return sorted(trials, key=lambda t: (STATE_ORDER[t.state], 0 if t.value is None else sign * t.value, t.number))


def write_report(folder: Path, result: TuneResult, space: dict[str, Any], best_config: dict[str, Any] | None) -> None:
    """Write tune.json, tune.md and (once a trial completed) best.yaml into ``folder``."""
    atomic_write_text(folder / "tune.json", json.dumps({**result.to_dict(), "search": space}, indent=2) + "\n")
    atomic_write_text(folder / "tune.md", markdown(result, list(space)) + "\n")
    if best_config is not None and result.best is not None:
        header = (f"# The best of {len(result.trials)} trials in {folder}: {result.metric} = {result.best.value:.4f} "
                  f"(trial-{result.best.number:03d}).\n# Train it: deltatune train {folder / 'best.yaml'}\n")
        atomic_write_text(folder / "best.yaml", header + dumps(best_config))


def markdown(result: TuneResult, keys: list[str]) -> str:
    """The trials as a Markdown table, best first, and why any failed."""
    counts = {state: sum(t.state == state for t in result.trials) for state in STATE_ORDER}
    better = "lower" if result.direction == "minimize" else "higher"
    lines = [f"# Hyperparameter search: {result.metric} ({better} is better)", "",
             f"{len(result.trials)} trials: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + "."]
    if result.best is not None:
        lines.append(f"Best: trial-{result.best.number:03d}, {result.metric} = {result.best.value:.4f}. "
                     f"Train it: `deltatune train {result.best_config}`")
    lines += ["", "| rank | trial | state | " + " | ".join([result.metric, *keys]) + " | seconds |",
              "|---" * (len(keys) + 5) + "|"]
    for rank, t in enumerate(ranked_trials(result.trials, result.direction), 1):
        cells = [str(rank), f"trial-{t.number:03d}", t.state, format_cell(t.value), *(format_cell(t.params.get(k)) for k in keys),
                 "-" if t.seconds is None else f"{t.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [t for t in result.trials if t.message]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- trial-{t.number:03d}: {t.message.splitlines()[0]}" for t in failed]
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
