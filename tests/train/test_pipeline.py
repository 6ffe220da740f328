"""The training pipeline end to end: the bundled pre-trained MiniLM on an easy synthetic task."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune import DeltatuneError
from deltatune.train.config import load_config
from deltatune.train.loop import TrainingError, train
from deltatune.train.precision import resolve
from tiny import assert_close_ulps, interrupt_at_step, logged_losses


def tiny_config(tmp_path, csv, *extra):
    return load_config(None, [
        "model.name_or_path=minilm-l6", "model.max_length=32", f"data.train_file={csv}",
        "data.validation_size=0.15", "data.test_size=0.15", f"training.output_dir={tmp_path / 'run'}",
        "training.batch_size=16", "training.learning_rate=5e-3", "training.epochs=1",
        "training.logging_steps=5", "training.progress=false", "method.method=lora", "method.r=4",
        *extra])


def test_training_beats_chance_and_writes_the_run_folder(tmp_path, sentiment_csv):
    result = train(tiny_config(tmp_path, sentiment_csv, "training.epochs=2"))
    assert result.metrics["test_accuracy"] > 0.8  # chance is 0.5 on this balanced task
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert report["parameters"]["stored"] == sum(
        t.numel() for t in load_file(run / "adapter" / "adapter_model.safetensors").values())
    assert report["adapter_bytes"] == (run / "adapter" / "adapter_model.safetensors").stat().st_size
    losses = logged_losses(run)
    assert losses[-1] < losses[0]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_accuracy" in line for line in lines) == 2  # one evaluation per epoch
    assert (run / "curves.png").stat().st_size > 0 and (run / "run.yaml").is_file()


def test_a_run_leaves_its_config_as_given_and_records_what_it_derived(tmp_path, sentiment_csv):
    import yaml

    config = tiny_config(tmp_path, sentiment_csv, "training.max_steps=1")
    given = config.to_dict()
    train(config)
    assert config.to_dict() == given and config.data.labels is None
    recorded = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert {k: v for k, v in recorded.items() if k != "resolved"} == given  # the config, as given
    assert recorded["resolved"] == {"labels": ["negative", "positive"], "metric_for_best_model": "accuracy",
                                    "precision": resolve("auto")}
    train(config, resume=True)  # the recorded run and the given config are the same run


def test_a_run_yaml_written_before_the_resolved_section_still_reads(tmp_path, sentiment_csv):
    """Runs written before run.yaml kept a ``resolved:`` section filled labels, metric and
    precision into the config itself; they load as they did."""
    import yaml

    from deltatune.train.inference import read_run

    train(tiny_config(tmp_path, sentiment_csv, "training.max_steps=1", "data.labels=[negative, positive]"))
    path = tmp_path / "run" / "run.yaml"
    recorded = yaml.safe_load(path.read_text())
    resolved = recorded.pop("resolved")
    recorded["training"].update(precision="fp32", metric_for_best_model="f1")
    path.write_text(yaml.safe_dump(recorded))
    _, _, task, old = read_run(tmp_path / "run")
    assert (old.precision, old.metric_for_best_model, old.labels) == ("fp32", "f1", resolved["labels"])
    assert task.labels == ["negative", "positive"]


def test_the_task_head_always_trains_and_is_saved(tmp_path, sentiment_csv):
    train(tiny_config(tmp_path, sentiment_csv, "training.max_steps=2", "method.target_modules=[query]"))
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").keys()
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= set(keys)


def test_resume_finishes_with_the_same_weights(tmp_path, sentiment_csv, monkeypatch):
    extra = ["training.epochs=2", "training.save_steps=3", "method.lora_dropout=0.1"]
    straight = train(tiny_config(tmp_path / "a", sentiment_csv, *extra))

    restore_step = interrupt_at_step(monkeypatch, 7)
    config = tiny_config(tmp_path / "b", sentiment_csv, *extra)
    assert train(config).interrupted
    restore_step()
    resumed = train(config, resume=True)
    assert resumed.steps == straight.steps
    a = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    for key in a:
        assert_close_ulps(a[key], b[key])


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, sentiment_csv):
    train(tiny_config(tmp_path, sentiment_csv, "training.max_steps=2"))
    other = tiny_config(tmp_path, sentiment_csv, "training.max_steps=2", "method.r=8")
    with pytest.raises(DeltatuneError, match="another config"):
        train(other, resume=True)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path,
                                                                     sentiment_csv, monkeypatch):
    import deltatune.train.loop as loop

    real_check, calls = loop._check_finite, {"n": 0}

    def nan_at_batch_5(loss, progress, folder):
        calls["n"] += 1
        real_check(loss * float("nan") if calls["n"] == 5 else loss, progress, folder)

    monkeypatch.setattr(loop, "_check_finite", nan_at_batch_5)
    config = tiny_config(tmp_path, sentiment_csv, "training.save_steps=2")
    with pytest.raises(TrainingError, match=r"became nan at step 5 .*step-00000004"):
        train(config)
    # the kept checkpoint is whole and finite: it loads into the run's model and optimizer
    from deltatune.train.checkpoint import list_checkpoints, load_checkpoint
    from deltatune.train.config import config_hash
    from deltatune.train.setup import setup

    [kept] = list_checkpoints(tmp_path / "run" / "checkpoints")
    run = setup(config)
    assert load_checkpoint(kept, run.model, run.optimizer, config_hash(run.config))["step"] == 4
    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert load_file(kept / "trainable.safetensors").keys() == trainable.keys()
    for name, param in trainable.items():
        moments = run.optimizer.state[param]
        assert {"exp_avg", "exp_avg_sq"} <= moments.keys(), name
        assert all(torch.isfinite(t).all() for t in (param, moments["exp_avg"], moments["exp_avg_sq"])), name


def test_a_paused_run_resumes_to_the_same_weights_as_one_run(tmp_path, sentiment_csv):
    """compare's successive halving pauses candidates after an evaluation and resumes them:
    the winner must be exactly the run it would have been alone (no step repeated or lost)."""
    from deltatune.train.loop import Pause

    whole = train(tiny_config(tmp_path / "whole", sentiment_csv, "training.eval_steps=0.25"))

    def pause_after_two(step, metrics, seen=[]):
        seen.append(step)
        if len(seen) == 2:
            raise Pause

    config = tiny_config(tmp_path / "legs", sentiment_csv, "training.eval_steps=0.25")
    first = train(config, on_evaluate=pause_after_two)
    assert first.paused and first.metrics == {} and 0 < first.steps < whole.steps
    rest = train(tiny_config(tmp_path / "legs", sentiment_csv, "training.eval_steps=0.25"), resume=True)
    assert rest.steps == whole.steps and not rest.paused
    assert rest.metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    a = load_file(tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "legs" / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # as the interrupted resume above: equal up to float summation order
        assert_close_ulps(a[key], b[key])
    evals = [json.loads(line) for line in (tmp_path / "legs" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in evals if "eval_accuracy" in e]
    assert steps == sorted(set(steps)) and len(steps) == 4  # one curve, every evaluation once
    seconds = [e["train_seconds"] for e in evals if "eval_accuracy" in e]
    assert seconds == sorted(seconds) and seconds[0] > 0
