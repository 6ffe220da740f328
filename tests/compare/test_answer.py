"""Reading a comparison: verdicts from curves, ties with the best, Pareto fronts, picks; and the
successive halving that chooses each method's learning rate, with a stand-in for training."""

from __future__ import annotations

import pytest

from deltatune.compare import halving
from deltatune.compare.answer import answer, convergence, mark_ties, pareto, worst
from deltatune.core.accounting import ParameterReport
from deltatune.train.loop import Pause, RunResult, TrainingError


def curve(values, every=10):
    """[seconds, step, value] at steps every, 2 every, ..."""
    return [[float(i), every * (i + 1), v] for i, v in enumerate(values)]


def test_verdicts_from_validation_curves():
    # second half (steps 50..80): 0.80 -> 0.86, a slope of 7.6 points per half run
    assert convergence(curve([0.6, 0.7, 0.8, 0.8, 0.8, 0.84, 0.85, 0.86]), "accuracy") == "still rising"
    # second half flat within half a point: settled
    assert convergence(curve([0.6, 0.7, 0.8, 0.81, 0.8, 0.81, 0.8, 0.805]), "accuracy") == "converged"
    # never above the majority class (0.57) by a point
    assert convergence(curve([0.55, 0.57, 0.572, 0.57, 0.57, 0.57]), "accuracy", baseline=0.57) == "not learning"
    assert convergence(curve([0.55, 0.6]), "accuracy") == "too short"
    # rose early, flat since the middle: converged, although the middle third was still rising
    assert convergence(curve([0.60, 0.656, 0.731, 0.731, 0.731, 0.731]), "accuracy") == "converged"
    # perplexity: lower is better, so a falling curve is still improving
    assert convergence(curve([30, 20, 15, 14, 13, 11, 10, 9]), "perplexity") == "still rising"
    assert convergence(curve([30, 20, 14, 14, 14, 14, 14, 14]), "perplexity") == "converged"
    assert worst(["converged", "still rising", "converged"]) == "still rising"


def rows(**quality):
    """Rows named by method with a quality, a file size and a training time."""
    sizes = {"full": (100, 50), "lora": (1, 20), "bitfit": (0.5, 18), "prompt": (0.4, 40)}
    return [{"method": m, "accuracy": q, "adapter_bytes": sizes[m][0], "stored_params": sizes[m][0],
             "train_seconds": sizes[m][1], "seeds": [1], "per_seed": {"1": q}, "verdict": "converged"}
            for m, q in quality.items()]


def test_one_seed_ties_within_a_point_and_picks_follow():
    group = rows(full=0.84, lora=0.835, bitfit=0.82, prompt=0.60)
    mark_ties(group, "accuracy")
    assert [r["method"] for r in group if r["ties_best"]] == ["full", "lora"]
    result = answer(group, "accuracy")
    assert result["picks"] == {"best quality": "full", "smallest file": "lora", "fastest training": "lora"}
    # bitfit is smaller than lora but 2 points behind: still on the storage front, as is prompt
    assert result["pareto_storage"] == ["prompt", "bitfit", "lora", "full"]
    assert result["pareto_time"] == ["bitfit", "lora", "full"]
    assert result["caveats"] == []


def test_several_seeds_tie_by_a_paired_t_test():
    best = {"method": "full", "accuracy": 0.84, "seeds": [1, 2, 3], "per_seed": {"1": 0.84, "2": 0.85, "3": 0.83}}
    # differences 0.010, 0.012, 0.011: always lower, t = 19, p = 0.003 -> different
    steady = {"method": "lora", "accuracy": 0.829, "seeds": [1, 2, 3], "per_seed": {"1": 0.83, "2": 0.838, "3": 0.819}}
    # differences 0.04, -0.03, 0.02 (mean 0.01, sd 0.036): t = 0.48, p = 0.68 -> a tie
    noisy = {"method": "ia3", "accuracy": 0.83, "seeds": [1, 2, 3], "per_seed": {"1": 0.80, "2": 0.88, "3": 0.81}}
    group = [best, steady, noisy]
    mark_ties(group, "accuracy")
    assert [r["ties_best"] for r in group] == [True, False, True]


def test_pareto_with_lower_is_better_metrics():
    group = [{"method": "a", "perplexity": 10.0, "cost": 5}, {"method": "b", "perplexity": 12.0, "cost": 1},
             {"method": "c", "perplexity": 13.0, "cost": 2}]
    assert pareto(group, "perplexity", "cost") == ["b", "a"]


class FakeTraining:
    """Stands in for ``train``: validation accuracy grows with steps, fastest at lr 1e-3; one
    evaluation every 10 steps of 80; records every step trained per learning rate."""

    def __init__(self):
        self.steps: dict[float, list[int]] = {}

    def __call__(self, config, resume=False, on_evaluate=None):
        rate = config
        done = self.steps.setdefault(rate, [])
        assert resume == bool(done), "a candidate resumes exactly when it has trained before"
        if rate >= 1e-2:
            raise TrainingError("the training loss became nan")
        step = done[-1] if done else 0
        paused = False
        while step < 80 and not paused:
            step += 10
            done.append(step)
            try:
                on_evaluate(step, {"eval_accuracy": 0.5 + step / 1000 * (2 if rate == 1e-3 else 1)})
            except Pause:
                paused = True
        return RunResult("", {}, ParameterReport(0, 0, 0, 0, 0, 0), 0, 0.0, 0.0, 0.0, "fp32", step, step, paused=paused,
                         seconds={"train": float(step)})


def test_successive_halving_trains_no_step_twice_and_keeps_the_best(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(halving, "train", fake)
    winner, candidates = halving.halve([3e-4, 1e-3, 3e-3, 1e-2], lambda rate, folder: rate, tmp_path, 8,
                                       "accuracy", echo=lambda *_: None)
    assert winner.learning_rate == 1e-3
    # four candidates, two cuts keeping a third: all to 8 // 9 -> 1 evaluation (10 steps), the
    # best two (ceil(4 / 3)) to 3, the best of those to the end (80)
    assert fake.steps[1e-3] == list(range(10, 81, 10))  # every step once, in order
    assert fake.steps[3e-4] == [10, 20, 30] and fake.steps[3e-3] == [10]
    assert fake.steps[1e-2] == [] and "nan" in candidates[3].failed
    assert [c.to_dict()["steps"] for c in candidates] == [30, 80, 10, 0]


def test_three_rates_are_cut_once_at_a_third_of_the_run(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(halving, "train", fake)
    winner, _ = halving.halve([3e-4, 1e-3, 3e-3], lambda rate, folder: rate, tmp_path, 6, "accuracy",
                              echo=lambda *_: None)
    assert winner.learning_rate == 1e-3
    assert (fake.steps[3e-4], fake.steps[3e-3]) == ([10, 20], [10, 20])  # 2 of 6 evaluations
    assert fake.steps[1e-3] == [10, 20, 30, 40, 50, 60, 70, 80]


def test_a_pinned_rate_is_one_plain_run(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(halving, "train", fake)
    winner, candidates = halving.halve([3e-4], lambda rate, folder: rate, tmp_path, 8, "accuracy")
    assert len(candidates) == 1 and fake.steps[3e-4] == list(range(10, 81, 10))


def test_every_rate_failing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(halving, "train", FakeTraining())
    with pytest.raises(TrainingError, match="every learning rate failed"):
        halving.halve([1e-2, 3e-2], lambda rate, folder: rate, tmp_path, 8, "accuracy", echo=lambda *_: None)
