"""The comparison's report: one row per method (seeds aggregated), with its verdict and the
answer in words, as ``report.json``, ``report.md``, ``report.html`` and plots."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text
from ..tasks.base import lower_is_better
from ..train.loop import PHASES
from .answer import answer, answer_text, convergence, flags, mark_ties, worst
from .noise import Noise, proportion_interval, seed_interval


def rows_from_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group seed runs of the same (model, train size, method) into one row: mean and std."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["model"], record["train_size"], record["method"])].append(record)
    return [_row(runs) for runs in groups.values()]


def _row(runs: list[dict]) -> dict[str, Any]:
    first, results = runs[0], [r["result"] for r in runs]
    params, metric = results[0]["parameters"], first["metric"]
    row: dict[str, Any] = {"method": first["method"], "model": first["model"], "train_size": first["train_size"],
                           "seeds": [r["seed"] for r in runs], "metric": metric,
                           "learning_rate": first["learning_rate"], "candidates": first["candidates"]}
    for key in sorted(k for k in results[0]["metrics"] if k.startswith("test_") and k != "test_loss"):
        values = [r["metrics"][key] for r in results]
        name = key[len("test_"):]
        row[name] = statistics.fmean(values)
        row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["per_seed"] = {str(r["seed"]): r["result"]["metrics"][f"test_{metric}"] for r in runs}
    row["test_rows"] = results[0].get("rows", {}).get("test", 0)  # cells written before rows existed: 0
    row["interval"] = _interval(list(row["per_seed"].values()), metric, row["test_rows"])
    row["search"] = first.get("search", {})
    row["verdict"] = worst([convergence(r["curve"], metric, r.get("baseline")) for r in runs])
    row.update(trainable_params=params["trainable"], stored_params=params["stored"],
               not_stored_params=params["not_stored"], changed_params=params["changed"],
               base_params=first["base_params"], adapter_bytes=results[0]["adapter_bytes"])
    for key in ("train_seconds", "peak_memory_mb"):
        row[key] = statistics.median(r[key] for r in runs)
    row["step_seconds"] = statistics.median(r["step_seconds"] for r in results)
    for key in ("latency_ratio", "merged_latency_ratio", "forgetting"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["notes"] = _notes(runs)
    row["curve"] = first["curve"]
    row["seconds"] = _summed([r["seconds"] for r in runs])
    return row


def _interval(values: list[float], metric: str, rows: int) -> list[float] | None:
    """The 95% interval of the row's test metric: across seeds, else from its test rows where
    the metric has a noise estimate (accuracy); None where neither is known."""
    if len(values) > 1:
        return list(seed_interval(values))
    if Noise(metric, rows).known:
        return list(proportion_interval(values[0], rows))
    return None


def _notes(runs: list[dict]) -> dict[str, str]:
    """Why a measurement is missing, per key: ``"failed: <error>"`` or ``"not measured: ..."``,
    with the seed where seeds differ."""
    notes: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        for key, note in run.get("notes", {}).items():  # cells written before notes existed have none
            notes[key].append(note if len(runs) == 1 else f"seed {run['seed']}: {note}")
    return {key: "; ".join(texts) for key, texts in notes.items()}


def _summed(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds by phase summed over seed runs (nested: the search's own phases)."""
    return {k: _summed([i[k] for i in items]) if isinstance(v, dict) else round(sum(i[k] for i in items), 3)
            for k, v in items[0].items()}


def write_report(folder: Path, records: list[dict[str, Any]], wall_seconds: float, ran: int) -> dict[str, Any]:
    """Write report.json, report.md, report.html and the plots; return the report."""
    started = time.perf_counter()
    rows = rows_from_records(records)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["train_size"])].append(row)
    answers = []
    for (model, size), group in groups.items():
        mark_ties(group, group[0]["metric"])
        for row in group:
            row["flags"] = flags(row)
        answers.append({"model": model, "train_size": size, **answer(group, group[0]["metric"])})
    report = {"rows": rows, "answers": answers, "seconds": _seconds(rows, wall_seconds, ran)}
    previous = folder / "report.json"
    if not ran and previous.is_file():  # nothing ran: the time record stays that of the run that did
        report["seconds"] = json.loads(previous.read_text()).get("seconds", report["seconds"])
    from .page import write_page
    from .plots import plot_all

    plot_all(folder, rows)
    write_page(folder / "report.html", report)
    report["seconds"]["report"] = round(time.perf_counter() - started, 3)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(folder / "report.md", markdown(report) + "\n")
    return report


def _seconds(rows: list[dict[str, Any]], wall: float, ran: int) -> dict[str, Any]:
    """Where the comparison's time went, summed over every run and candidate."""
    total = {phase: round(sum(r["seconds"][phase] for r in rows), 1) for phase in (*PHASES, "measure")}
    search = {phase: round(sum(r["seconds"]["search"].get(phase, 0.0) for r in rows), 1) for phase in PHASES}
    training = total["train"] + search["train"]
    return {"wall": round(wall, 1), "runs_this_time": ran, "final_runs": total, "search": search,
            "training": round(training, 1),
            "training_share": round(training / wall, 3) if ran and wall else None}


def markdown(report: dict[str, Any]) -> str:
    """The table, the learning-rate search, then the answer in words (what a reader wants last)."""
    rows = report["rows"]
    parts = [markdown_table(rows), *([missing_table(rows)] if any(r.get("notes") for r in rows) else []),
             search_table(rows)]
    seeds = max(len(r["seeds"]) for r in rows) if rows else 1
    for result in report["answers"]:
        where = ", ".join(str(v) for v in (result["model"], result["train_size"]) if v is not None)
        parts.append(f"**The answer** ({where}):\n\n{answer_text(result, rows[0]['metric'], seeds)}")
    return "\n\n".join(parts)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    metrics = [rows[0]["metric"], *sorted(k[:-4] for k in rows[0] if k.endswith("_std") and k[:-4] != rows[0]["metric"])]
    header = ["method", *(["model"] if len({r["model"] for r in rows}) > 1 else []),
              *(["train size"] if any(r["train_size"] for r in rows) else []), "lr", "verdict", *metrics[:1],
              "95% interval", "may move because", *metrics[1:],
              "trainable", "stored (% of base)", "trained, not stored", "adapter file", "train s", "s/step",
              "peak MB", "latency x", "merged x", "forgetting"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        quality = _mean_std(r[metrics[0]], r[f"{metrics[0]}_std"], len(r["seeds"]))
        quality = f"**{quality}**" if r.get("best") else f"{quality} ≈" if r.get("ties_best") else quality
        cells = [r["method"], *([r["model"]] if "model" in header else []),
                 *([str(r["train_size"])] if "train size" in header else []),
                 f"{r['learning_rate']:g}", r["verdict"], quality, interval_text(r),
                 ", ".join(r.get("flags", [])) or "-",
                 *[_mean_std(r[m], r[f"{m}_std"], len(r["seeds"])) for m in metrics[1:]],
                 f"{r['trainable_params']:,}", f"{r['stored_params']:,} ({100 * r['stored_params'] / r['base_params']:.2f}%)",
                 f"{r['not_stored_params']:,}", _bytes(r["adapter_bytes"]), f"{r['train_seconds']:.0f}",
                 f"{r['step_seconds']:.3f}", f"{r['peak_memory_mb']:.0f}", _measured(r, "latency_ratio", "{:.2f}"),
                 _measured(r, "merged_latency_ratio", "{:.2f}"), _measured(r, "forgetting", "{:.4f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_table(rows: list[dict[str, Any]]) -> str:
    """Each measurement the table lacks, and why."""
    lines = ["Measurements missing from the table:", "", "| method | measurement | why |", "|---|---|---|"]
    for r in rows:
        lines += [f"| {r['method']} | {key} | {' '.join(note.split()).replace('|', '/')} |"
                  for key, note in r.get("notes", {}).items()]
    return "\n".join(lines)


def search_table(rows: list[dict[str, Any]]) -> str:
    """Every candidate learning rate's best validation score and how far it trained."""
    lines = ["Learning-rate search (validation, best so far; steps trained before the cut):", "",
             "| method | candidates |", "|---|---|"]
    for r in rows:
        cells, sign = [], -1 if lower_is_better(r["metric"]) else 1
        for c in r["candidates"]:
            best = max((sign * v for _, v in c["scores"]), default=None)
            best = None if best is None else sign * best
            score = "failed" if c["failed"] else "-" if best is None else f"{best:.3f}"
            chosen = " (chosen)" if c["learning_rate"] == r["learning_rate"] else ""
            cells.append(f"{c['learning_rate']:g}: {score} @ {c['steps']}{chosen}")
        lines.append(f"| {r['method']} | {'; '.join(cells)} |")
    return "\n".join(lines)


def interval_text(row: dict[str, Any]) -> str:
    interval = row.get("interval")
    return "-" if interval is None else f"{interval[0]:.3f} to {interval[1]:.3f}"


def _mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def _measured(row: dict[str, Any], key: str, form: str) -> str:
    """The value, or why it is missing ("failed", "not measured"; the reason is listed below the
    table); "-" where nothing was to measure (the merged latency of a method that cannot merge)."""
    if row[key] is not None:
        return form.format(row[key])
    note = row.get("notes", {}).get(key)
    return note.split(":")[0] if note else "-"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
