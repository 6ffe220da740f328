"""Successive halving over learning rates, on validation data, without training a step twice.

Every candidate trains to the first rung, the best third (``KEEP``, as in Hyperband) goes on to
a rung three times as long, and the last one left trains to the end: three candidates train a
third of the run each, then the best of them goes on. A candidate pauses right after the evaluation that ends its rung and later resumes from
the checkpoint written there, so the winner's run is one ordinary run: the same steps, the same
schedule, the same curve as if it had been trained alone. Test data is never looked at before
the winner has finished.

Two things make a search's choice unreliable, and both are checked. A cut between candidates
whose validation scores are within chance of each other (or all within chance of the majority
class: none has learned yet) is put off by one evaluation at a time, up to half the run (waiting
costs every candidate's training); a cut made anyway is recorded. A winner at the smallest or largest rate of the grid may be beaten by a rate beyond it:
one grid step further out is trained (``widen`` times at most), and a winner still at the edge is
recorded.
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
from .noise import Noise

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


@dataclass
class Search:
    """What the search did: its winner (trained to the end) and every candidate, and where its
    choice may be noise or may lie beyond the grid."""

    winner: Candidate
    candidates: list[Candidate]
    #: evaluations at which a cut was put off because the candidates on both sides of it were
    #: within noise of each other (or all of them within noise of the majority class)
    waited: list[int] = field(default_factory=list)
    #: evaluations at which a cut was made although it was within noise (no rung left to wait for)
    noisy_cuts: list[int] = field(default_factory=list)
    #: rates tried beyond the grid's edge because the grid's smallest or largest had won
    widened: list[float] = field(default_factory=list)
    #: "smallest" or "largest": the winner is still at that edge of every rate tried
    edge: str = ""

    def flags(self) -> list[str]:
        """Why the row may move in a longer run, in words (empty: no reason known)."""
        flags = [f"rate at the grid's {self.edge}"] if self.edge else []
        if self.noisy_cuts:
            flags.append("cut by noise")
        return flags

    def to_dict(self) -> dict[str, Any]:
        return {"waited": self.waited, "noisy_cuts": self.noisy_cuts, "widened": self.widened,
                "edge": self.edge, "flags": self.flags()}


def halve(rates: list[float], config_for: Callable[[float, Path], RunConfig], folder: Path,
          evaluations: int, metric: str, echo: Callable[[str], Any] = print, wait_out_noise: bool = False,
          baseline: float | None = None, widen: int = 0) -> Search:
    """Search ``rates`` and train the best to the end.

    Args:
        rates: the learning rates to try (one: no search, just the run).
        config_for: the run config for a learning rate and a run folder.
        folder: where the candidates' run folders go (``lr-<rate>``).
        evaluations: validation passes per run (``training.eval_steps`` is ``1 / evaluations``).
        metric: the validation metric that ranks candidates (``accuracy``, ``perplexity``...).
        wait_out_noise: a cut within the validation metric's noise (``noise.Noise``) waits one
            more evaluation, up to half the run's evaluations.
        baseline: the trivial predictor's validation score (the majority class), where known.
        widen: how many rates beyond the grid's edge may be tried when an edge rate wins: each
            is a whole run, one grid step further out.

    Returns:
        The search: its winner, trained to the end (test metrics in its last leg), and every candidate.

    Raises:
        TrainingError: every candidate failed.
    """
    search = Search(winner=None, candidates=[Candidate(rate, folder / f"lr-{rate:g}") for rate in rates])
    alive = search.candidates
    rounds = math.ceil(math.log(len(alive), KEEP) - 1e-9)  # cuts until one is left
    rung = max(1, evaluations // KEEP ** rounds)
    while len(alive) > 1:
        for candidate in alive:
            _leg(candidate, config_for, metric, pause_after=rung)
        ranked = sorted(alive, key=lambda c: c.best(metric), reverse=True)
        keep = math.ceil(len(alive) / KEEP)
        noise = Noise(metric, ranked[0].legs[-1].rows.get("validation", 0) if ranked[0].legs else 0, baseline)
        if wait_out_noise and _within_noise(ranked, keep, metric, noise):
            if rung + 1 <= evaluations // 2:  # waiting costs every candidate's training: half a run at most
                echo(f"  no cut after {rung} evaluations: within noise of each other or of the majority class")
                search.waited.append(rung)
                rung += 1
                continue
            search.noisy_cuts.append(min(rung, evaluations))
        alive = ranked[:keep]
        echo("  kept " + ", ".join(f"lr {c.learning_rate:g}" for c in alive)
             + f" after {min(rung, evaluations)} evaluations")
        rung *= KEEP
    search.winner = alive[0]
    _leg(search.winner, config_for, metric, pause_after=None)
    if search.winner.failed:
        raise TrainingError(f"every learning rate failed; the last: {search.winner.failed}",
                            "set a smaller learning_rate for this method in the comparison's entry.")
    _widen(search, config_for, metric, widen, echo)
    return search


def _within_noise(ranked: list[Candidate], keep: int, metric: str, noise: Noise) -> bool:
    """Whether cutting after the first ``keep`` of ``ranked`` would be chance: the last kept and
    the best cut cannot be told apart, or the best of all cannot be told from the majority class."""
    sign = -1 if lower_is_better(metric) else 1
    scores = [sign * c.best(metric) for c in ranked]  # best() is signed: the metric's own values again
    if any(math.isinf(score) for score in scores[:keep + 1]):
        return False  # a failed candidate is cut for its failure, not its score
    return not noise.beats_baseline(scores[0]) or not noise.differ(scores[keep - 1], scores[keep])


def _widen(search: Search, config_for: Callable[[float, Path], RunConfig], metric: str, widen: int,
           echo: Callable[[str], Any]) -> None:
    """While the winner is the smallest or largest rate tried, train one grid step beyond it
    (at most ``widen`` times); a better result there becomes the winner."""
    while True:
        rates = sorted(c.learning_rate for c in search.candidates)
        search.edge, beyond = _beyond_edge(search.winner.learning_rate, rates)
        if not search.edge or len(search.widened) == widen:
            return
        echo(f"  lr {search.winner.learning_rate:g} is the grid's {search.edge}: trying lr {beyond:g}")
        extra = Candidate(beyond, search.winner.folder.with_name(f"lr-{beyond:g}"))
        _leg(extra, config_for, metric, pause_after=None)
        search.candidates.append(extra)
        search.widened.append(beyond)
        if extra.best(metric) <= search.winner.best(metric):
            search.edge = ""  # the winner now has a worse rate on both sides
            return
        search.winner = extra


def _beyond_edge(rate: float, rates: list[float]) -> tuple[str, float]:
    """("smallest", the next rate below) or ("largest", the next above) where ``rate`` is at the
    edge of the sorted ``rates``, one step of the grid's own ratio out; ("", 0) inside it."""
    if len(rates) < 2:
        return "", 0.0
    if rate == rates[0]:
        return "smallest", float(f"{rates[0] ** 2 / rates[1]:.3g}")
    if rate == rates[-1]:
        return "largest", float(f"{rates[-1] ** 2 / rates[-2]:.3g}")
    return "", 0.0


def _leg(candidate: Candidate, config_for: Callable[[float, Path], RunConfig], metric: str,
         pause_after: int | None) -> None:
    """Train from where the candidate paused until it has ``pause_after`` evaluations (or the end)."""
    if candidate.failed or (candidate.legs and not candidate.legs[-1].paused):
        return  # diverged, or trained to the end already

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
