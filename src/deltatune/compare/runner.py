"""The grid of runs: model x train size x method x seed, all in this process.

One process for the whole grid: the libraries are imported once and the data tokenised once
(``train.setup.tokenised``); each run's peak memory is its own (``train.memory``). For each
(model, size, method) the first seed searches the learning rate (``halving``) and the other
seeds train at the rate it chose, so that seeds measure the spread at fixed settings.
A finished cell leaves ``cells/<key>.json``; started again, the comparison skips it.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..env import offline_and_quiet
from ..io.atomic import atomic_write_text
from ..train.config import RunConfig, best_model_metric
from ..train.inference import load_run
from ..train.logs import eta_text, read_metrics
from ..train.loop import PHASES
from ..train.precision import describe
from .config import CompareConfig, entry_name
from .halving import Candidate, halve
from .measure import Reference, measure, validation_baseline
from .report import write_report


@dataclass
class Cell:
    method: dict[str, Any]
    seed: int
    size: int | None
    model: str | None

    @property
    def key(self) -> str:
        parts = [entry_name(self.method), f"seed{self.seed}"]
        if self.size is not None:
            parts.append(f"n{self.size}")
        if self.model is not None:
            parts.append(Path(self.model).name or self.model)
        return "-".join(parts)


def grid(config: CompareConfig) -> list[Cell]:
    return [Cell(method, seed, size, model) for model in config.models for size in config.train_sizes
            for method in config.methods for seed in config.seeds]


def compare(config: CompareConfig, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run every cell not already finished, then write the report (md, json, html, plots).

    Returns:
        The report: ``rows`` (one per model x size x method, seeds aggregated), ``answer``
        (Pareto fronts and picks) and ``seconds`` (where the comparison's time went).
    """
    offline_and_quiet()  # a Python caller gets the command line's environment
    folder = Path(config.output_dir)
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    cells = grid(config)
    done = {c.key for c in cells if _cell_file(folder, c).is_file()}
    todo = [c for c in cells if c.key not in done]
    echo(f"comparison: {len(cells)} runs ({len(done)} already finished) -> {folder}")
    echo(describe(RunConfig.from_dict(copy.deepcopy(config.base)).training.precision))
    started = time.perf_counter()
    # The libraries' objects live as long as the process: keep them out of the garbage
    # collections that each run's memory measurement starts with (0.3 s each otherwise).
    gc.freeze()
    references: dict[str, Reference] = {}
    try:
        for index, cell in enumerate(todo, 1):
            echo(f"[{len(done) + index}/{len(cells)}] {cell.key} {eta_text(started, index - 1, len(todo))}")
            record = run_cell(config, cell, folder, references, echo)
            atomic_write_text(_cell_file(folder, cell), json.dumps(record, indent=1))
    finally:
        gc.unfreeze()
    records = [json.loads(_cell_file(folder, c).read_text()) for c in cells]
    report = write_report(folder, records, wall_seconds=time.perf_counter() - started, ran=len(todo))
    echo(f"comparison finished in {time.perf_counter() - started:.0f} s: {folder / 'report.md'}")
    return report


def run_cell(config: CompareConfig, cell: Cell, folder: Path, references: dict[str, Reference],
             echo: Callable[[str], Any]) -> dict[str, Any]:
    """Search (first seed) or reuse the learning rate, train, measure; a JSON-ready record."""
    rates = _rates(config, cell, folder)
    metric = _metric(config)
    def config_for(rate: float, run_folder: Path) -> RunConfig:
        return config.run_config(cell.method, cell.seed, cell.size, cell.model, run_folder, rate)

    searching = len(rates) > 1
    baseline = validation_baseline(config_for(rates[0], folder)).get(metric)
    search = halve(rates, config_for, folder / "runs" / cell.key, config.evaluations, metric, echo,
                   wait_out_noise=searching, baseline=baseline, widen=config.widen if searching else 0)
    winner, candidates = search.winner, search.candidates
    result = winner.legs[-1]
    tick = time.perf_counter()
    run_config, task, tokenizer, adapted = load_run(result.output_dir)
    model_key = run_config.model.name_or_path
    if model_key not in references:
        references[model_key] = Reference(run_config, task, tokenizer, config.latency_batches,
                                          config.forgetting_texts)
    measured = measure(references[model_key], adapted)
    return {"key": cell.key, "method": entry_name(cell.method), "seed": cell.seed,
            "train_size": cell.size, "model": model_key, "metric": metric, "learning_rate": winner.learning_rate,
            "candidates": [c.to_dict() for c in candidates], "search": search.to_dict(), "result": result.to_dict(),
            "base_params": sum(p.numel() for p in references[model_key].model.parameters()),
            "peak_memory_mb": max(leg.peak_memory_mb for leg in winner.legs),
            "train_seconds": sum(leg.seconds["train"] for leg in winner.legs),
            "seconds": {**_phases(winner.legs), "search": _search_seconds(candidates, winner),
                        "measure": round(time.perf_counter() - tick, 3)},
            "curve": _curve(result.output_dir, metric), "baseline": baseline,
            **measured}


def _rates(config: CompareConfig, cell: Cell, folder: Path) -> list[float]:
    """The first seed's candidates; later seeds take the rate the first seed chose."""
    first = Cell(cell.method, config.seeds[0], cell.size, cell.model)
    if cell.seed != first.seed and _cell_file(folder, first).is_file():
        return [json.loads(_cell_file(folder, first).read_text())["learning_rate"]]
    return config.learning_rates(cell.method)


def _metric(config: CompareConfig) -> str:
    return best_model_metric(RunConfig.from_dict(copy.deepcopy(config.base)))


def _phases(legs: list) -> dict[str, float]:
    return {phase: round(sum(leg.seconds.get(phase, 0.0) for leg in legs), 3) for phase in PHASES}


def _search_seconds(candidates: list[Candidate], winner: Candidate) -> dict[str, float]:
    """What the losing candidates cost, by phase (their legs; the winner's are its own run's)."""
    return _phases([leg for c in candidates if c is not winner for leg in c.legs])


def _curve(run_dir: str, metric: str) -> list[list[float]]:
    """(training seconds, step, validation metric) at each evaluation of the winner's run."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [[r["train_seconds"], r["step"], r[f"eval_{metric}"]] for r in rows if f"eval_{metric}" in r]


def _cell_file(folder: Path, cell: Cell) -> Path:
    return folder / "cells" / f"{cell.key}.json"

