"""Hyperparameter search: real trials on a tiny random-init BERT, and the bookkeeping (seeds,
resuming, failures) with a stand-in for training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

from deltatune import ConfigError
from deltatune.cli import main
from deltatune.search import load_tune_config, tune
from deltatune.train.config import load_config
from deltatune.train.loop import TrainingError

SPACE = {"training.learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
         "method.r": {"choices": [2, 4, 8]},
         "training.epochs": {"low": 1, "high": 2}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base(tmp_path: Path, model_dir: Path, csv: Path) -> dict:
    return {"model": {"name_or_path": str(model_dir), "max_length": 32},
            "data": {"train_file": str(csv), "max_train_samples": 48, "max_eval_samples": 32},
            "method": {"method": "lora", "r": 4},
            "training": {"output_dir": str(tmp_path / "search"), "epochs": 1, "batch_size": 16,
                         "warmup_steps": 0, "progress": False}}


def write(tmp_path: Path, data: dict, name: str = "tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def quiet(*_):
    pass


def test_a_search_records_every_trial_and_writes_the_best_config(tmp_path, tiny_model_dir, sentiment_csv):
    run = base(tmp_path, tiny_model_dir, sentiment_csv)
    result = tune(write(tmp_path, {**run, "search": SPACE}), trials=3, echo=quiet)
    folder = tmp_path / "search"
    report = json.loads((folder / "tune.json").read_text())
    assert report["metric"] == "eval_accuracy" and report["direction"] == "maximize"
    assert [t["number"] for t in report["trials"]] == [0, 1, 2]
    for trial in report["trials"]:
        assert trial["state"] == "complete" and trial["seconds"] > 0
        params = trial["params"]
        assert 1e-4 <= params["training.learning_rate"] <= 1e-2
        assert params["method.r"] in (2, 4, 8)
        assert params["training.epochs"] in (1, 2)
        run_report = json.loads((folder / f"trial-{trial['number']:03d}" / "report.json").read_text())
        assert run_report["eval_accuracy"] == trial["value"]  # the objective is the run's own metric
        assert run_report["config"]["method"]["r"] == params["method.r"]
        assert len(trial["intermediate"]) == params["training.epochs"]  # one report per evaluation

    best = max((t for t in report["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert report["best"]["value"] == best["value"] == result.best.value

    # best.yaml is the run config plus the best parameters, ready for `deltatune train`.
    expected = json.loads(json.dumps(run))
    expected["training"]["output_dir"] = str(folder / "best")
    for key, value in report["best"]["params"].items():
        section, name = key.split(".")
        expected[section][name] = value
    assert load_config(folder / "best.yaml").to_dict() == load_config(write(tmp_path, expected, "x.yaml")).to_dict()
    assert "search" not in yaml.safe_load((folder / "best.yaml").read_text())
    table = (folder / "tune.md").read_text()
    assert f"| 1 | trial-{report['best']['number']:03d} | complete |" in table


def test_a_failing_trial_is_recorded_and_a_pruned_one_stops_after_its_first_evaluation(
        tmp_path, tiny_model_dir, sentiment_csv):
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    run = base(tmp_path, tiny_model_dir, sentiment_csv)
    run["training"]["epochs"] = 2
    # The tiny model has 128 positions: 1000 passes the config but fails when the model loads.
    path = write(tmp_path, {**run, "search": {"model.max_length": {"choices": [24, 1000]}}})
    grid = optuna.samplers.GridSampler({"model.max_length": [24, 1000]}, seed=0)
    result = tune(path, trials=2, pruner=AlwaysPrune(), sampler=grid, echo=quiet)
    by_length = {t.params["model.max_length"]: t for t in result.trials}
    failed, pruned = by_length[1000], by_length[24]
    assert failed.state == "failed" and failed.value is None
    assert "longer than this model allows (128 positions)" in failed.message
    assert pruned.state == "pruned" and pruned.intermediate == [pruned.value]
    lines = (Path(pruned.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert sum("eval_accuracy" in line for line in lines) == 1  # stopped after epoch 1 of 2
    assert result.best is None and not (tmp_path / "search" / "best.yaml").exists()
    assert "0 complete, 1 pruned, 1 failed" in (tmp_path / "search" / "tune.md").read_text()


@pytest.fixture
def fake_train(monkeypatch):
    """Training stood in by a score of the parameters: the search's own logic, in milliseconds."""
    calls = {"n": 0, "fail_at": None, "interrupt_at": None}

    def train(config, on_evaluate=None):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise TrainingError("the training loss became nan at step 3 (epoch 1).")
        value = config.training.learning_rate * 10 + config.method.r / 100
        on_evaluate(1, {"eval_accuracy": value, "eval_loss": 1.0})
        return SimpleNamespace(metrics={"eval_accuracy": value}, interrupted=calls["n"] == calls["interrupt_at"])

    monkeypatch.setattr("deltatune.search.runner.train", train)
    return calls


def params_of(result):
    return [t.params for t in result.trials]


def test_the_same_seed_samples_the_same_trials(tmp_path, fake_train):
    data = {**base(tmp_path, "unused", "unused.csv"), "search": SPACE}
    path = write(tmp_path, data)
    first = tune(path, 4, output_dir=tmp_path / "a", echo=quiet)
    again = tune(path, 4, output_dir=tmp_path / "b", echo=quiet)
    data["training"]["seed"] = 7
    other = tune(write(tmp_path, data, "seed7.yaml"), 4, output_dir=tmp_path / "c", echo=quiet)
    assert params_of(first) == params_of(again) != params_of(other)
    assert first.best.value == max(t.value for t in first.trials)


def test_a_failure_does_not_stop_the_search_and_a_rerun_resumes(tmp_path, fake_train):
    path = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": SPACE})
    fake_train["fail_at"] = 2  # a NaN loss
    result = tune(path, 3, echo=quiet)
    assert [t.state for t in result.trials] == ["complete", "failed", "complete"]
    assert "became nan" in result.trials[1].message
    assert "became nan" in (tmp_path / "search" / "tune.md").read_text()

    lines = []
    assert len(tune(path, 3, echo=lines.append).trials) == 3  # all finished: nothing runs
    assert "(3 already finished)" in lines[0] and len(lines) == 1
    more = tune(path, 4, echo=quiet)
    assert len(more.trials) == 4 and more.trials[3].params not in params_of(result)

    changed = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": {"method.r": {"choices": [2]}}})
    with pytest.raises(ConfigError, match="holds a search of another config"):
        tune(changed, 5, echo=quiet)


def test_an_interrupted_trial_runs_again_with_its_parameters(tmp_path, fake_train):
    path = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": SPACE})
    fake_train["interrupt_at"] = 2  # Ctrl-C during the second trial
    with pytest.raises(KeyboardInterrupt):
        tune(path, 3, echo=quiet)
    result = tune(path, 3, echo=quiet)
    states = [(t.number, t.state) for t in result.trials]
    assert states == [(0, "complete"), (1, "failed"), (2, "complete"), (3, "complete")]
    assert "interrupted" in result.trials[1].message
    assert result.trials[2].params == result.trials[1].params


BAD_SPACES = [
    ({"training.lerning_rate": {"low": 1e-4, "high": 1e-2}},
     r"unknown config path 'training.lerning_rate'.*did you mean 'training.learning_rate'"),
    ({"trainig.epochs": {"low": 1, "high": 3}}, r"unknown config path 'trainig.epochs'.*did you mean 'training.epochs'"),
    ({"training.learning_rate": {"low": 1e-2, "high": 1e-4}}, r"learning_rate: low = 0.01 is not below high = 0.0001"),
    ({"training.learning_rate": {"low": 0, "high": 1e-2, "log": True}}, r"a log range needs low > 0"),
    ({"training.learning_rate": {"low": "fast", "high": 1e-2}}, r"learning_rate.low = 'fast' is not a number"),
    ({"training.learning_rate": {"high": 1e-2}}, r"search.training.learning_rate has no low"),
    ({"method.r": {"choices": []}}, r"search.method.r.choices = \[\] is not a non-empty list"),
    ({"method.r": {"choices": [4, 8], "low": 1}}, r"search.method.r mixes choices with low"),
    ({"method.r": {"lo": 1, "high": 8}}, r"unknown key 'search.method.r.lo'.*did you mean 'low'"),
    ({"method.r": [4, 8]}, r"search.method.r = \[4, 8\] is neither a range nor a list of choices"),
    ({"method.r": {"low": 2.0, "high": 16.0}}, r"search.method.r: the value 2.0 is refused.*integer bounds"),
    ({"method.r": {"choices": [0, 8]}}, r"search.method.r: the value 0 is refused: lora.r = 0 is out of range"),
    ({"training.epochs": {"low": -1, "high": 3}}, r"the value -1 is refused: training.epochs = -1 is out of range"),
    ({"training.epochs": {"low": 1, "high": 3, "step": 0}}, r"search.training.epochs.step = 0 is out of range"),
    ({"model.config_overrides.hidden_dropout_prob": {"low": float("nan"), "high": 0.1}}, r"\.low = nan is out of range"),
    ({"training.lr_scheduler": {"choices": ["linear", "cosin"]}}, r"training.lr_scheduler: the value 'cosin' is refused"),
    ({"training.output_dir": {"choices": ["a", "b"]}}, r"training.output_dir cannot be searched"),
    ({}, r"has no search space"),
]


@pytest.mark.parametrize("space, message", BAD_SPACES, ids=[str(list(s)[:1]) + str(i) for i, (s, _) in enumerate(BAD_SPACES)])
def test_a_bad_search_space_is_refused_naming_the_key_and_the_fix(tmp_path, space, message):
    path = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": space})
    with pytest.raises(ConfigError, match="(?s)" + message) as error:
        load_tune_config(path)
    assert error.value.hint
    assert not (tmp_path / "search").exists()


def test_set_reaches_the_search_space(tmp_path):
    path = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": SPACE})
    config = load_tune_config(path, ["search.method.r={choices: [16, 32]}", "training.batch_size=8"])
    assert [p.key for p in config.space] == list(SPACE)
    assert {p.key: p for p in config.space}["method.r"].choices == (16, 32)
    assert config.run_config({}).training.batch_size == 8


def test_the_command_line_reports_errors_and_train_refuses_a_search_file(tmp_path, capsys):
    bad = write(tmp_path, {**base(tmp_path, "unused", "unused.csv"), "search": {"method.rank": {"choices": [4]}}})
    assert main(["tune", str(bad), "--trials", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: search: unknown config path 'method.rank'.")
    assert main(["train", str(bad)]) == 2
    assert "deltatune tune" in capsys.readouterr().err


@pytest.mark.slow
def test_the_example_search_runs_on_a_small_slice(tmp_path):
    slice_ = ["data.max_train_samples=48", "data.max_eval_samples=24", "training.max_steps=2",
              "training.batch_size=16", "model.max_length=32", "training.progress=false"]
    config = load_tune_config(Path(__file__).parents[2] / "examples" / "tune.yaml", slice_)
    result = tune(config, trials=2, output_dir=tmp_path, echo=quiet)
    assert [t.state for t in result.trials] == ["complete", "complete"]
    assert load_config(result.best_config).method.r == result.best.params["method.r"]
