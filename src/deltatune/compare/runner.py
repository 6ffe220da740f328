"""The grid of runs: model x train size x method x seed, each in its own fresh process.

A finished cell leaves ``cells/<key>.json``; started again, the comparison skips it.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text
from .config import CompareConfig
from .measure import run_cell
from .report import write_report


@dataclass
class Cell:
    method: dict[str, Any]
    seed: int
    size: int | None
    model: str | None

    @property
    def key(self) -> str:
        parts = [self.method["method"], f"seed{self.seed}"]
        if self.size is not None:
            parts.append(f"n{self.size}")
        if self.model is not None:
            parts.append(Path(self.model).name or self.model)
        return "-".join(parts)


def grid(config: CompareConfig) -> list[Cell]:
    return [Cell(method, seed, size, model) for model in config.models for size in config.train_sizes
            for method in config.methods for seed in config.seeds]


def compare(config: CompareConfig, echo=print) -> list[dict[str, Any]]:
    """Run every cell not already finished, then write report.md, report.json and the plots.

    Returns:
        The report rows (one per model x size x method, seeds aggregated).
    """
    folder = Path(config.output_dir)
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    cells = grid(config)
    done = {c.key for c in cells if (folder / "cells" / f"{c.key}.json").is_file()}
    todo = [c for c in cells if c.key not in done]
    echo(f"comparison: {len(cells)} runs ({len(done)} already finished) -> {folder}")
    started = time.perf_counter()
    for index, cell in enumerate(todo, 1):
        echo(f"[{len(done) + index}/{len(cells)}] {cell.key} {eta_text(started, index - 1, len(todo))}")
        run = config.run_config(cell.method, cell.seed, cell.size, cell.model, folder / "runs" / cell.key)
        job = (run.to_dict(), config.latency_batches, config.forgetting_texts)
        measured = _in_fresh_process(*job) if config.isolate else run_cell(*job)
        record = {"key": cell.key, "method": cell.method["method"], "seed": cell.seed,
                  "train_size": cell.size, "model": run.model.name_or_path, **measured}
        atomic_write_text(folder / "cells" / f"{cell.key}.json", json.dumps(record, indent=1))
    records = [json.loads((folder / "cells" / f"{c.key}.json").read_text()) for c in cells]
    rows = write_report(folder, records)
    echo(f"comparison finished in {time.perf_counter() - started:.0f} s: {folder / 'report.md'}")
    return rows


def _in_fresh_process(run: dict[str, Any], latency_batches: int, forgetting_texts: int) -> dict[str, Any]:
    """Peak RSS is per process and never goes down: each run gets a process of its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_cell, run, latency_batches, forgetting_texts).result()


def eta_text(started: float, finished: int, total: int) -> str:
    if not finished:
        return ""
    left = (time.perf_counter() - started) / finished * (total - finished)
    return f"(ETA {int(left // 60)}:{int(left % 60):02d})"
