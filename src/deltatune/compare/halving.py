"""Successive halving over learning rates, on validation data, without training a step twice.

Every candidate trains to the first rung, the best third (``KEEP``, as in Hyperband) goes on to
a rung three times as long, and the last one left trains to the end: three candidates train a
third of the run each, then the best of them goes on. A candidate pauses right after the evaluation that ends its rung and later resumes from
the checkpoint written there, so the winner's run is one ordinary run: the same steps, the same
schedule, the same curve as if it had been trained alone. Test data is never looked at before
the winner has finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tasks.base import lower_is_better
from ..train.config import RunConfig
from ..train.loop import Pause, RunResult, TrainingError, train

KEEP = 3  # each cut keeps the best third, and the next rung is three times as long


@dataclass
class Candidate:
    learning_rate: float
    folder: Path
    #: (step, validation metric) of every evaluation so far
    scores: list[tuple[int, float]] = field(default_factory=list)
    legs: list[RunResult] = field(default_factory=list)
    failed: str = ""  # why training stopped (a non-finite loss at a too-large learning rate)

    def best(self, metric: str) -> float:
        """The best validation value so far, larger is better (negated for perplexity, loss)."""
        if self.failed or not self.scores:
            return -math.inf
        sign = -1 if lower_is_better(metric) else 1
        return max(sign * value for _, value in self.scores)

    def to_dict(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "scores": [list(s) for s in self.scores],
                "steps": self.legs[-1].steps if self.legs else 0, "failed": self.failed}


def halve(rates: list[float], config_for: Callable[[float, Path], RunConfig], folder: Path,
          evaluations: int, metric: str, echo: Callable[[str], Any] = print) -> tuple[Candidate, list[Candidate]]:
    """Search ``rates`` and train the best to the end.

    Args:
        rates: the learning rates to try (one: no search, just the run).
        config_for: the run config for a learning rate and a run folder.
        folder: where the candidates' run folders go (``lr-<rate>``).
        evaluations: validation passes per run (``training.eval_steps`` is ``1 / evaluations``).
        metric: the validation metric that ranks candidates (``accuracy``, ``perplexity``...).

    Returns:
        The winner (trained to the end, test metrics in its last leg) and every candidate.

    Raises:
        TrainingError: every candidate failed.
    """
    candidates = [Candidate(rate, folder / f"lr-{rate:g}") for rate in rates]
    alive = candidates
    rounds = math.ceil(math.log(len(alive), KEEP) - 1e-9)  # cuts until one is left
    rung = max(1, evaluations // KEEP ** rounds)
    while len(alive) > 1:
        for candidate in alive:
            _leg(candidate, config_for, metric, pause_after=rung)
        alive = sorted(alive, key=lambda c: c.best(metric), reverse=True)[:math.ceil(len(alive) / KEEP)]
        echo("  kept " + ", ".join(f"lr {c.learning_rate:g}" for c in alive) + f" after {rung} evaluations")
        rung *= KEEP
    winner = alive[0]
    _leg(winner, config_for, metric, pause_after=None)
    if winner.failed:
        raise TrainingError(f"every learning rate failed; the last: {winner.failed}",
                            "set a smaller learning_rate for this method in the comparison's entry.")
    return winner, candidates


def _leg(candidate: Candidate, config_for: Callable[[float, Path], RunConfig], metric: str,
         pause_after: int | None) -> None:
    """Train from where the candidate paused until it has ``pause_after`` evaluations (or the end)."""
    if candidate.failed:
        return

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        candidate.scores.append((step, metrics[f"eval_{metric}"]))
        if pause_after is not None and len(candidate.scores) >= pause_after:
            raise Pause

    try:
        result = train(config_for(candidate.learning_rate, candidate.folder), resume=bool(candidate.legs),
                       on_evaluate=on_evaluate)
    except TrainingError as error:  # diverged: this rate loses, the search goes on
        candidate.failed = str(error)
        return
    candidate.legs.append(result)
