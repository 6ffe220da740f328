"""The comparison's report: one row per method (seeds aggregated), as JSON, Markdown and plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text

COLUMNS = ["trainable_params", "stored_params", "not_stored_params", "changed_params", "adapter_bytes",
           "train_seconds", "step_seconds", "peak_memory_mb", "latency_ratio", "merged_latency_ratio",
           "forgetting"]


def rows_from_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group seed runs of the same (model, train size, method) into one row: mean and std."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["model"], record["train_size"], record["method"])].append(record)
    return [_row(model, size, method, runs) for (model, size, method), runs in groups.items()]


def _row(model: str, size: int | None, method: str, runs: list[dict]) -> dict[str, Any]:
    results = [r["result"] for r in runs]
    params = results[0]["parameters"]
    row: dict[str, Any] = {"method": method, "model": model, "train_size": size, "seeds": [r["seed"] for r in runs]}
    for metric in sorted(k for k in results[0]["metrics"] if k.startswith("test_") and k != "test_loss"):
        values = [r["metrics"][metric] for r in results]
        name = metric[len("test_"):]
        row[name] = statistics.fmean(values)
        row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row.update(trainable_params=params["trainable"], stored_params=params["stored"],
               not_stored_params=params["not_stored"], changed_params=params["changed"],
               base_params=runs[0]["base_params"], adapter_bytes=results[0]["adapter_bytes"])
    for key in ("train_seconds", "step_seconds", "peak_memory_mb"):
        row[key] = statistics.median(r[key] for r in results)
    for key in ("latency_ratio", "merged_latency_ratio", "forgetting"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    return row


def write_report(folder: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = rows_from_records(records)
    atomic_write_text(folder / "report.json", json.dumps({"rows": rows}, indent=2) + "\n")
    atomic_write_text(folder / "report.md", markdown_table(rows) + "\n")
    from .plots import plot_all

    plot_all(folder, rows)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    metrics = [k for k in rows[0] if k not in COLUMNS and not k.endswith("_std")
               and k not in ("method", "model", "train_size", "seeds", "base_params")] if rows else []
    header = ["method", *(["model"] if len({r["model"] for r in rows}) > 1 else []),
              *(["train size"] if any(r["train_size"] for r in rows) else []), *metrics,
              "trainable", "stored (% of base)", "adapter file", "train s", "s/step", "peak MB",
              "latency x", "merged x", "forgetting"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], *([r["model"]] if "model" in header else []),
                 *([str(r["train_size"])] if "train size" in header else []),
                 *[_mean_std(r[m], r[f"{m}_std"], len(r["seeds"])) for m in metrics],
                 f"{r['trainable_params']:,}", f"{r['stored_params']:,} ({100 * r['stored_params'] / r['base_params']:.2f}%)",
                 _bytes(r["adapter_bytes"]), f"{r['train_seconds']:.0f}", f"{r['step_seconds']:.3f}",
                 f"{r['peak_memory_mb']:.0f}", _ratio(r["latency_ratio"]), _ratio(r["merged_latency_ratio"]),
                 "-" if r["forgetting"] is None else f"{r['forgetting']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
