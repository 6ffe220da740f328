"""Reading a comparison: verdicts from curves, ties with the best, Pareto fronts, picks; and the
successive halving that chooses each method's learning rate, with a stand-in for training."""

from __future__ import annotations

import math

import pytest

from deltatune.compare import halving, noise
from deltatune.compare.answer import answer, convergence, flags, mark_ties, next_steps, pareto, worst
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
             "train_seconds": sizes[m][1], "seeds": [1], "per_seed": {"1": q}, "verdict": "converged",
             "learning_rate": 1e-3, "seconds": {"setup": 1.0, "train": float(sizes[m][1]), "evaluate": 2.0,
                                                "search": {"train": 99.0}, "measure": 3.0}}
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

    def __init__(self, validation_rows=0, fastest=1e-3):
        self.steps: dict[float, list[int]] = {}
        self.rows, self.fastest = validation_rows, fastest

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
                on_evaluate(step, {"eval_accuracy": 0.5 + step / 1000 * (2 if rate == self.fastest else 1)})
            except Pause:
                paused = True
        return RunResult("", {}, ParameterReport(0, 0, 0, 0, 0, 0), 0, 0.0, 0.0, 0.0, "fp32", step, step, paused=paused,
                         seconds={"train": float(step)}, rows={"validation": self.rows})


def test_successive_halving_trains_no_step_twice_and_keeps_the_best(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(halving, "train", fake)
    search = halving.halve([3e-4, 1e-3, 3e-3, 1e-2], lambda rate, folder: rate, tmp_path, 8,
                           "accuracy", echo=lambda *_: None)
    winner, candidates = search.winner, search.candidates
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
    winner = halving.halve([3e-4, 1e-3, 3e-3], lambda rate, folder: rate, tmp_path, 6, "accuracy",
                           echo=lambda *_: None).winner
    assert winner.learning_rate == 1e-3
    assert (fake.steps[3e-4], fake.steps[3e-3]) == ([10, 20], [10, 20])  # 2 of 6 evaluations
    assert fake.steps[1e-3] == [10, 20, 30, 40, 50, 60, 70, 80]


def test_a_pinned_rate_is_one_plain_run(tmp_path, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(halving, "train", fake)
    candidates = halving.halve([3e-4], lambda rate, folder: rate, tmp_path, 8, "accuracy").candidates
    assert len(candidates) == 1 and fake.steps[3e-4] == list(range(10, 81, 10))


def test_every_rate_failing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(halving, "train", FakeTraining())
    with pytest.raises(TrainingError, match="every learning rate failed"):
        halving.halve([1e-2, 3e-2], lambda rate, folder: rate, tmp_path, 8, "accuracy", echo=lambda *_: None)


def test_a_cut_within_noise_waits_one_evaluation_at_a_time(tmp_path, monkeypatch):
    # 4,000 validation rows: a standard error of 0.0079 at 0.54, so two scores differ beyond
    # 1.96 sqrt(2) x 0.0079 = 0.022. After 2 of 8 evaluations (step 20) the best leads by 0.020:
    # noise, so all three go on to 3 evaluations, where the lead is 0.030.
    fake = FakeTraining(validation_rows=4000)
    monkeypatch.setattr(halving, "train", fake)
    search = halving.halve([3e-4, 1e-3, 3e-3], lambda rate, folder: rate, tmp_path, 8, "accuracy",
                           echo=lambda *_: None, wait_out_noise=True, baseline=0.5)
    assert search.winner.learning_rate == 1e-3 and search.waited == [2] and search.noisy_cuts == []
    assert fake.steps[3e-4] == fake.steps[3e-3] == [10, 20, 30]
    assert fake.steps[1e-3] == list(range(10, 81, 10)) and search.flags() == []


def test_a_cut_still_within_noise_at_half_the_run_is_marked(tmp_path, monkeypatch):
    # 400 rows: differences need 0.068; the lead is 0.030 at 3 evaluations and 0.040 at 4, half
    # of the 8: the search waits no longer and cuts there, marked
    fake = FakeTraining(validation_rows=400)
    monkeypatch.setattr(halving, "train", fake)
    search = halving.halve([3e-4, 1e-3, 3e-3], lambda rate, folder: rate, tmp_path, 8, "accuracy",
                           echo=lambda *_: None, wait_out_noise=True, baseline=0.5)
    assert search.waited == [2, 3] and search.noisy_cuts == [4] and search.flags() == ["cut by noise"]
    assert fake.steps[3e-4] == [10, 20, 30, 40] and search.winner.learning_rate == 1e-3


def test_without_noise_estimate_cuts_are_made_as_before(tmp_path, monkeypatch):
    fake = FakeTraining(validation_rows=0)  # no rows known: no estimate, every difference counts
    monkeypatch.setattr(halving, "train", fake)
    search = halving.halve([3e-4, 1e-3, 3e-3], lambda rate, folder: rate, tmp_path, 6, "accuracy",
                           echo=lambda *_: None, wait_out_noise=True, baseline=0.5)
    assert search.waited == [] and fake.steps[3e-4] == [10, 20]


class PeakedTraining(FakeTraining):
    """Validation accuracy grows fastest at lr 3e-4 and slower the further a rate is from it
    (by the log of their ratio)."""

    def __call__(self, config, resume=False, on_evaluate=None):
        rate = config
        done = self.steps.setdefault(rate, [])
        step, paused = (done[-1] if done else 0), False
        while step < 60 and not paused:
            step += 10
            done.append(step)
            try:
                on_evaluate(step, {"eval_accuracy": 0.5 + step / 1000 / (1 + abs(math.log(rate / 3e-4)))})
            except Pause:
                paused = True
        return RunResult("", {}, ParameterReport(0, 0, 0, 0, 0, 0), 0, 0.0, 0.0, 0.0, "fp32", step, step,
                         paused=paused)


def test_an_edge_winner_widens_the_grid_and_a_remaining_edge_is_flagged(tmp_path, monkeypatch):
    fake = PeakedTraining()
    monkeypatch.setattr(halving, "train", fake)
    # [1e-3, 3e-3, 9e-3]: 1e-3 wins at the grid's smallest; one step below (1e-3^2 / 3e-3 =
    # 3.33e-4) is closer to the peak and takes over, at the edge again with no widening left
    search = halving.halve([1e-3, 3e-3, 9e-3], lambda rate, folder: rate, tmp_path, 6, "accuracy",
                           echo=lambda *_: None, widen=1)
    assert search.widened == [3.33e-4] and search.winner.learning_rate == 3.33e-4
    assert search.edge == "smallest" and search.flags() == ["rate at the grid's smallest"]
    assert fake.steps[3.33e-4] == [10, 20, 30, 40, 50, 60]  # a whole run, trained once


def test_widening_stops_where_the_rate_beyond_loses(tmp_path, monkeypatch):
    monkeypatch.setattr(halving, "train", PeakedTraining())
    # two steps allowed: 3.33e-4 wins, 1.11e-4 (further from the peak) loses: 3.33e-4 is inside
    search = halving.halve([1e-3, 3e-3, 9e-3], lambda rate, folder: rate, tmp_path, 6, "accuracy",
                           echo=lambda *_: None, widen=2)
    assert search.widened == [3.33e-4, 1.11e-4] and search.winner.learning_rate == 3.33e-4
    assert search.edge == "" and search.flags() == []
    # the largest edge likewise: a grid below the peak widens upwards
    monkeypatch.setattr(halving, "train", PeakedTraining())
    search = halving.halve([3e-5, 1e-4], lambda rate, folder: rate, tmp_path / "up", 6, "accuracy",
                           echo=lambda *_: None, widen=1)
    assert search.widened == [3.33e-4] and search.edge == "largest"


def test_noise_estimates_by_hand():
    # Agresti-Coull: p = (0.5 * 128 + 2) / 132 = 0.5, error sqrt(0.25 / 132) = 0.043519
    assert noise.standard_error("accuracy", 0.5, 128) == pytest.approx(0.0435194, rel=1e-6)
    assert noise.standard_error("f1", 0.5, 128) is None and noise.standard_error("accuracy", 0.5, 0) is None
    # 0.75 on 400: center 302 / 404 = 0.747525, error sqrt(0.747525 x 0.252475 / 404) = 0.0216138
    low, high = noise.proportion_interval(0.75, 400)
    assert (low, high) == (pytest.approx(0.747525 - 1.96 * 0.0216138, abs=1e-6),
                           pytest.approx(0.747525 + 1.96 * 0.0216138, abs=1e-6))
    assert noise.proportion_interval(1.0, 10)[1] == 1.0  # clipped to [0, 1]
    # three seeds, mean 0.82, sd 0.02: t(0.975, 2) = 4.302653 x 0.02 / sqrt(3)
    low, high = noise.seed_interval([0.80, 0.82, 0.84])
    assert high - 0.82 == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6) and low + high == pytest.approx(1.64)
    check = noise.Noise("accuracy", 400, baseline=0.52)
    # errors 0.0199 and 0.0209 at 0.80 and 0.77: a difference needs 1.96 x 0.0289 = 0.0566
    assert not check.differ(0.80, 0.77) and check.differ(0.80, 0.72)
    assert check.beats_baseline(0.60) and not check.beats_baseline(0.55) and not check.beats_baseline(0.40)
    assert noise.Noise("perplexity", 400, baseline=30.0).beats_baseline(20.0)  # no estimate: any gain
    assert not noise.Noise("perplexity", 400, baseline=30.0).beats_baseline(31.0)


def test_one_seed_ties_read_from_the_test_rows_noise():
    group = rows(full=0.80, lora=0.77, bitfit=0.72, prompt=0.60)
    for row in group:
        row["test_rows"] = 400
    mark_ties(group, "accuracy")
    # 0.03 behind on 400 rows is within chance (needs 0.057); 0.08 behind is not
    assert [r["method"] for r in group if r["ties_best"]] == ["full", "lora"]
    assert [flags(r) for r in group] == [[], ["within noise of the best"], [], []]


def test_next_steps_estimate_minutes_from_the_runs_own_seconds():
    group = rows(full=0.80, lora=0.795, bitfit=0.60, prompt=0.60)
    mark_ties(group, "accuracy")  # no test rows: within one point ties
    group[2]["search"] = {"edge": "largest", "flags": ["rate at the grid's largest"]}
    group[2]["learning_rate"] = 3e-3
    # full's run: 1 + 50 + 2 + 3 = 56 s, lora's 1 + 20 + 2 + 3 = 26 s (the search's seconds are not
    # a run's); two more seeds each: 2 x 82 s = 164 s, about 3 minutes; bitfit's run 24 s
    assert next_steps(group) == [
        "to separate full, lora, run them with `seeds: [1, 2, 3]` (about 3 minutes: 2 more runs each at the "
        "rates chosen here)",
        "to place bitfit's learning rate, run it with a larger `widen:` or its `learning_rate` pinned beyond 0.003 "
        "(about 24 s a rate)"]
