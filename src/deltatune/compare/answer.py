"""Reading the comparison: convergence verdicts, ties with the best, Pareto fronts and picks.

Quality is the task's primary test metric (higher is better; perplexity and loss are negated
here so that the same comparisons hold). Margins: with several seeds, a row "ties" the best when
a paired t-test across seeds cannot tell them apart (p >= 0.05); with one seed, when the two
scores are within chance of each other on the test rows (``noise.Noise``: accuracy), or, for
metrics without a noise estimate, within ``MARGIN`` (one point) of the best.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from scipy.stats import ttest_rel

from ..tasks.base import lower_is_better
from .noise import PROPORTIONS, Noise

MARGIN = 0.01  # one point of accuracy / F1; for unbounded metrics, 1% of the best value
ORDER = {"converged": 0, "too short": 1, "still rising": 2, "not learning": 3}


def convergence(curve: list[list[float]], metric: str, baseline: float | None = None) -> str:
    """A run's verdict from its validation curve (``[seconds, step, value]`` per evaluation).

    - ``not learning``: never beat the trivial baseline (the majority class) by the margin;
    - ``still rising``: over the second half of the run the curve climbs (least-squares slope)
      by more than the margin per half run: more steps would have helped;
    - ``converged``: otherwise; ``too short``: fewer than three evaluations in the second half.
    """
    sign = -1 if lower_is_better(metric) else 1
    values = [sign * value for _, _, value in curve]
    if not values:
        return "too short"
    margin = MARGIN * max(1.0, abs(max(values)))
    if baseline is not None and max(values) <= sign * baseline + margin:
        return "not learning"
    last = curve[-1][1]
    late = [(step, v) for (_, step, _), v in zip(curve, values) if step > last / 2]
    if len(late) < 3:
        return "too short"
    return "still rising" if _slope(late) * last / 2 > margin else "converged"


def _slope(points: list[tuple[float, float]]) -> float:
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def worst(verdicts: list[str]) -> str:
    """A row's verdict over its seeds: the least settled one."""
    return max(verdicts, key=ORDER.__getitem__)


def mark_ties(rows: list[dict[str, Any]], metric: str) -> None:
    """Set ``best`` and ``ties_best`` on each row of one (model, train size) group."""
    sign = -1 if lower_is_better(metric) else 1
    best = max(rows, key=lambda r: sign * r[metric])
    for row in rows:
        row["best"] = row is best
        row["ties_best"] = row is best or _ties(best, row, metric, sign)


def _ties(best: dict[str, Any], row: dict[str, Any], metric: str, sign: int) -> bool:
    seeds = [s for s in best["seeds"] if s in row["seeds"]]
    if len(seeds) < 2:
        noise = Noise(metric, row.get("test_rows", 0))
        if noise.known:
            return not noise.differ(best[metric], row[metric])
        return sign * (best[metric] - row[metric]) <= MARGIN * max(1.0, abs(best[metric]))
    a = [best["per_seed"][str(s)] for s in seeds]
    b = [row["per_seed"][str(s)] for s in seeds]
    if a == b:
        return True
    pvalue = ttest_rel(a, b).pvalue
    return bool(math.isnan(pvalue) or pvalue >= 0.05)  # NaN: no spread at all in the differences


def pareto(rows: list[dict[str, Any]], metric: str, cost: str) -> list[str]:
    """Methods no other method beats on quality without costing more (or costs less at equal quality)."""
    sign = -1 if lower_is_better(metric) else 1

    def dominated(r: dict[str, Any]) -> bool:
        return any(sign * o[metric] >= sign * r[metric] and o[cost] <= r[cost]
                   and (sign * o[metric] > sign * r[metric] or o[cost] < r[cost]) for o in rows)

    return [r["method"] for r in sorted(rows, key=lambda r: r[cost]) if not dominated(r)]


def answer(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The picks for three priorities and the Pareto fronts, for one (model, train size) group."""
    close = [r for r in rows if r["ties_best"]]
    picks = {"best quality": next(r for r in rows if r["best"]),
             "smallest file": min(close, key=lambda r: r["adapter_bytes"]),
             "fastest training": min(close, key=lambda r: r["train_seconds"])}
    return {"pareto_storage": pareto(rows, metric, "stored_params"),
            "pareto_time": pareto(rows, metric, "train_seconds"),
            "picks": {k: r["method"] for k, r in picks.items()},
            "caveats": [f"{r['method']} had not converged ({r['verdict']}): a longer run may rank it higher"
                        for r in rows if r["verdict"] != "converged"] + [_flag_caveat(r) for r in rows if r.get("flags")],
            "next": next_steps(rows)}


def flags(row: dict[str, Any]) -> list[str]:
    """Why a row may move in a longer run: its search's flags, and a tie with the best."""
    return [*row.get("search", {}).get("flags", []), *(["within noise of the best"] if row.get("ties_best")
                                                       and not row.get("best") else [])]


def _flag_caveat(row: dict[str, Any]) -> str:
    return f"{row['method']}: {', '.join(row['flags'])}"


def next_steps(rows: list[dict[str, Any]]) -> list[str]:
    """What would settle the table, with the minutes estimated from this run's own timings."""
    steps = []
    tied = [r for r in rows if r.get("ties_best")]
    if len(tied) > 1:
        seeds = len(tied[0]["seeds"])
        more = max(3, 2 * seeds) - seeds  # seeds to add: to three, or twice as many
        seconds = sum(_run_seconds(r) for r in tied) * more
        listed = sorted(set(tied[0]["seeds"]) | {max(tied[0]["seeds"]) + i + 1 for i in range(more)})
        steps.append(f"to separate {', '.join(r['method'] for r in tied)}, run them with `seeds: {listed}` "
                     f"(about {_duration(seconds)}: {more} more runs each at the rates chosen here)")
    for row in rows:
        if row.get("search", {}).get("edge"):
            steps.append(f"to place {row['method']}'s learning rate, run it with a larger `widen:` or its "
                         f"`learning_rate` pinned beyond {row['learning_rate']:g} "
                         f"(about {_duration(_run_seconds(row))} a rate)")
    return steps


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} minutes"


def _run_seconds(row: dict[str, Any]) -> float:
    """One run of the row's method at its chosen rate, measured: its phases over its seeds, per seed."""
    seconds = row["seconds"]
    return sum(v for k, v in seconds.items() if not isinstance(v, dict)) / len(row["seeds"])


def answer_text(result: dict[str, Any], metric: str, seeds: int) -> str:
    within = ("within the seeds' noise of" if seeds > 1 else "within the test rows' noise of"
              if metric in PROPORTIONS else f"within {MARGIN:g} {metric} of")
    lines = [f"- best {metric}: **{result['picks']['best quality']}**",
             f"- smallest file {within} the best: **{result['picks']['smallest file']}**",
             f"- fastest training {within} the best: **{result['picks']['fastest training']}**",
             f"- Pareto front, {metric} against stored parameters: {', '.join(result['pareto_storage'])}",
             f"- Pareto front, {metric} against training time: {', '.join(result['pareto_time'])}"]
    return "\n".join(lines + [f"- caveat: {c}" for c in result["caveats"]]
                     + [f"- next: {step}" for step in result.get("next", [])])
