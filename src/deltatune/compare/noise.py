"""How far a score moves by chance, so that the comparison says when a difference is noise.

A proportion (accuracy) measured on n rows has a standard error of about sqrt(p (1 - p) / n):
0.044 at p = 0.5 on 128 validation rows, 0.025 at p = 0.75 on 400 test rows. The estimate is
Agresti and Coull's (two successes and two failures added), so that a score of 0 or 1 on few
rows still has an error. Two scores differ when they are more than ``Z`` standard errors of
their difference apart, the errors taken as independent: on the same rows the true error of a
difference is smaller, so this errs towards "cannot tell" (never calls noise a difference
more often than 5% of the time). Metrics that are not proportions of rows (F1, ROUGE,
perplexity) have no estimate here; across seeds every metric has one (``seed_interval``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

from ..tasks.base import lower_is_better

Z = 1.96  # two-sided 95%
#: metrics that are a fraction of rows scored right
PROPORTIONS = ("accuracy",)


def standard_error(metric: str, value: float, rows: int) -> float | None:
    """The standard error of ``value`` measured on ``rows`` rows; None where there is no estimate."""
    if metric not in PROPORTIONS or rows < 1:
        return None
    p = (value * rows + 2) / (rows + 4)
    return math.sqrt(p * (1 - p) / (rows + 4))


def proportion_interval(value: float, rows: int) -> tuple[float, float]:
    """The 95% interval of a proportion measured on ``rows`` rows (Agresti-Coull), within [0, 1]."""
    error = standard_error(PROPORTIONS[0], value, rows)
    center = (value * rows + 2) / (rows + 4)
    return max(0.0, center - Z * error), min(1.0, center + Z * error)


def seed_interval(values: list[float]) -> tuple[float, float]:
    """The 95% interval of the mean of per-seed values (Student's t; two seeds or more)."""
    mean, spread = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = student_t.ppf(0.975, len(values) - 1) * spread
    return mean - half, mean + half


@dataclass(frozen=True)
class Noise:
    """The chance variation of one metric measured on one split: ``rows`` rows, and the score of
    the trivial predictor (the majority class) where the task has one."""

    metric: str
    rows: int
    baseline: float | None = None

    @property
    def known(self) -> bool:
        return standard_error(self.metric, 0.5, self.rows) is not None

    def differ(self, a: float, b: float) -> bool:
        """Whether scores ``a`` and ``b`` are further apart than chance; True where noise is unknown."""
        error_a, error_b = standard_error(self.metric, a, self.rows), standard_error(self.metric, b, self.rows)
        if error_a is None or error_b is None:
            return a != b
        return abs(a - b) > Z * math.hypot(error_a, error_b)

    def beats_baseline(self, value: float) -> bool:
        """Whether ``value`` is better than the trivial predictor by more than chance."""
        if self.baseline is None:
            return True
        better = value < self.baseline if lower_is_better(self.metric) else value > self.baseline
        return better and self.differ(value, self.baseline)
