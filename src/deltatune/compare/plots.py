"""Comparison plots (matplotlib, PNG): quality against storage, learning curves, cost bars,
low-data curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_all(folder: Path, rows: list[dict[str, Any]]) -> list[Path]:
    if not rows:
        return []
    metric = rows[0]["metric"]
    paths = [_quality_vs_storage(folder, rows, metric), _learning_curves(folder, rows, metric),
             _costs(folder, rows)]
    if len({r["train_size"] for r in rows}) > 1:
        paths.append(_low_data(folder, rows, metric))
    return paths


def _learning_curves(folder: Path, rows: list[dict[str, Any]], metric: str) -> Path:
    """Validation metric against training seconds, one line per method (its first seed's run)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    largest = max(r["train_size"] or 0 for r in rows)
    for r in (r for r in rows if (r["train_size"] or 0) == largest):
        seconds, _, values = zip(*r["curve"])
        ax.plot(seconds, values, "o-", markersize=3, label=f"{r['method']} (lr {r['learning_rate']:g})")
    ax.set_xlabel("training seconds")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("learning curves at the chosen learning rates")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, folder / "learning_curves.png")


def _quality_vs_storage(folder: Path, rows: list[dict[str, Any]], metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    largest = max(r["train_size"] or 0 for r in rows)
    for r in (r for r in rows if (r["train_size"] or 0) == largest):
        ax.errorbar(r["stored_params"], r[metric], yerr=r[f"{metric}_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["stored_params"], r[metric]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"test {metric} against storage")
    ax.grid(alpha=0.3)
    return _save(fig, folder / "quality_vs_storage.png")


def _costs(folder: Path, rows: list[dict[str, Any]]) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    names = [r["method"] for r in rows]
    for ax, key, label in zip(axes, ("step_seconds", "peak_memory_mb", "latency_ratio"),
                              ("seconds per training step", "peak memory (MB)", "inference latency / base")):
        ax.bar(names, [r[key] or 0 for r in rows], color="tab:gray")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, folder / "costs.png")


def _low_data(folder: Path, rows: list[dict[str, Any]], metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list] = defaultdict(list)
    for r in rows:
        curves[r["method"]].append((r["train_size"] or 0, r[metric]))
    for method, points in curves.items():
        ax.plot(*zip(*sorted(points)), "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, folder / "low_data.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
