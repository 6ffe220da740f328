"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard, and a curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..io.run_folder import METRICS_LOG


class MetricsLog:
    """Appends one JSON line per logging step or evaluation, mirrored to TensorBoard."""

    def __init__(self, folder: Path, enabled: bool = True, resume: bool = False):
        self.path = folder / METRICS_LOG
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if not resume:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time; metrics.jsonl is the record
            self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(folder: Path, metric: str) -> Path | None:
    """Training loss and the validation metric against the step, as ``curves.png``."""
    rows = read_metrics(folder / METRICS_LOG)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r[f"eval_{metric}"]) for r in rows if f"eval_{metric}" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    if train:
        left.plot(*zip(*train), color="tab:blue", label="training loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss", color="tab:blue")
    if evals:
        right = left.twinx()
        right.plot(*zip(*evals), "o-", color="tab:orange", label=f"validation {metric}")
        right.set_ylabel(f"validation {metric}", color="tab:orange")
    fig.tight_layout()
    path = folder / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eta_text(started: float, finished: int, total: int) -> str:
    """``(ETA m:ss)`` for the ``total - finished`` items left, at the pace since ``started``
    (a ``time.perf_counter()`` reading); empty before the first item is done."""
    if not finished:
        return ""
    left = (time.perf_counter() - started) / finished * (total - finished)
    return f"(ETA {int(left // 60)}:{int(left % 60):02d})"
