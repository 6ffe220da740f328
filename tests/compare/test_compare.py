"""A small comparison end to end: every method, and the report checked against the runs' files."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from deltatune import ConfigError, parameter_report, registered
from deltatune.compare.config import default_methods, load_compare_config
from deltatune.compare.noise import proportion_interval
from deltatune.compare.runner import compare
from deltatune.tasks import task_for
from deltatune.train import setup
from deltatune.train.config import RunConfig
from deltatune.train.setup import build_model, resolve_model_path, tokenised

pytestmark = pytest.mark.slow

SMALL = {
    "model": {"max_length": 32},
    "data": {"source": "rotten-tomatoes", "max_train_samples": 48, "max_eval_samples": 16},
    "training": {"max_steps": 8, "batch_size": 16, "warmup_steps": 0},
    "latency_batches": 1, "forgetting_texts": 8, "evaluations": 4,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(folder / "out")}))
    read = setup.load_splits

    def counted(data):
        READS.append(data)
        return read(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setup, "load_splits", counted)
        report = compare(load_compare_config(path), echo=lambda *_: None)
    return folder, path, report


READS: list = []  # the data configs the comparison read a data set for


def as_trained(method: str) -> dict:
    """The parameter report of a freshly adapted model, as the comparison's runs build it."""
    config = RunConfig.from_dict({"model": SMALL["model"], "data": SMALL["data"], "method": {"method": method}})
    path = resolve_model_path(config.model.name_or_path)
    task = task_for(config)
    tokenised(config, task, AutoTokenizer.from_pretrained(path), path)  # derives the labels
    return parameter_report(build_model(config, task, path)).to_dict()


def test_the_default_methods_compared_and_the_report_matches_the_runs(small):
    folder, _, report = small
    rows = report["rows"]
    assert {r["method"] for r in rows} == set(default_methods())
    assert json.loads((folder / "out" / "report.json").read_text())["rows"] == rows
    for row in rows:
        chosen = folder / "out" / "runs" / f"{row['method']}-seed42" / f"lr-{row['learning_rate']:g}"
        run_report = json.loads((chosen / "report.json").read_text())
        weights = chosen / "adapter" / "adapter_model.safetensors"
        assert row["adapter_bytes"] == weights.stat().st_size
        assert row["stored_params"] == sum(t.numel() for t in load_file(weights).values())
        assert row["accuracy"] == run_report["test_accuracy"]
        assert run_report["steps"] == 8 and not run_report["paused"]
        assert row["notes"] == {}, "every measurement was made: none failed or was skipped"
        assert isinstance(row["latency_ratio"], float)  # a timing: its value is never asserted
        assert (row["merged_latency_ratio"] is not None) == registered()[row["method"]].mergeable
        assert row["verdict"] in ("converged", "still rising", "not learning", "too short")
        grid = list(registered()[row["method"]].tuning.learning_rates)
        # the grid, then at most one rate a grid step beyond the edge (widen: 1) where an edge rate won
        assert [c["learning_rate"] for c in row["candidates"]] == grid + row["search"]["widened"]
        for rate in row["search"]["widened"]:  # rounded to 3 significant figures: within 0.5%
            assert rate == pytest.approx(grid[0] ** 2 / grid[1], rel=5e-3) or rate == pytest.approx(
                grid[-1] ** 2 / grid[-2], rel=5e-3)
        # 16 validation rows: a standard error of 0.11, so after 2 steps no candidate is beyond
        # chance of the majority class: the search waits out the first rung (1 of 4 evaluations)
        assert row["search"]["waited"] == [1]
        assert ("cut by noise" in row["flags"]) == bool(row["search"]["noisy_cuts"])
        # one seed: the interval is the accuracy's on the test rows the run scored
        assert row["test_rows"] == run_report["rows"]["test"] > 0
        assert row["interval"] == list(proportion_interval(row["accuracy"], row["test_rows"]))
        assert row["learning_rate"] in [c["learning_rate"] for c in row["candidates"]]
        assert len(row["curve"]) == 4 and row["curve"][-1][1] == 8  # evaluations: 4, the last at step 8
    by_method = {r["method"]: r for r in rows}
    # LoRA r=8 on query/value (73,728) + pooler and classifier (148,610) of a 22.7M model.
    assert by_method["lora"]["stored_params"] == 222_338 < 0.01 * by_method["full"]["stored_params"]
    for name in ("quality_vs_storage.png", "learning_curves.png", "costs.png", "report.html"):
        assert (folder / "out" / name).stat().st_size > 1000
    text = (folder / "out" / "report.md").read_text()
    for row in rows:  # each row with the rate its search chose, and that rate marked in the search table
        assert (f"| {row['method']} | {row['learning_rate']:g} | {row['verdict']} | {row['accuracy']:.3f}"
                in text.replace(" ≈", "").replace("**", ""))
        assert f"{row['interval'][0]:.3f} to {row['interval'][1]:.3f} | {', '.join(row['flags']) or '-'} |" in text
        assert f"{row['learning_rate']:g}: " in text.split(f"| {row['method']} | ")[-1].split("\n")[0]
    assert "**The answer**" in text and "Learning-rate search" in text


def test_each_row_counts_parameters_as_trained(small):
    """Trainable, stored and trained-not-stored come from the model as it trained: prefix
    tuning's MLP is trained and not stored (a reloaded adapter has no MLP)."""
    rows = {r["method"]: r for r in small[2]["rows"]}
    for method, row in rows.items():
        report = as_trained(method)
        assert (row["trainable_params"], row["stored_params"], row["not_stored_params"]) == (
            report["trainable"], report["stored"], report["not_stored"]), method
    assert rows["prefix"]["not_stored_params"] == 2_568_704  # the 20 x 384 -> 512 -> 6 x 2 x 384 MLP


def test_forgetting_is_measured_and_follows_what_changed(small):
    rows = {r["method"]: r for r in small[2]["rows"]}
    assert all(r["forgetting"] is not None and r["forgetting"] >= -1e-6 for r in rows.values())
    # full fine-tuning moved every weight under the last hidden state: its embeddings moved
    assert rows["full"]["forgetting"] > 1e-4


def test_time_goes_into_training_and_is_broken_down(small):
    report = small[2]
    seconds = report["seconds"]
    assert seconds["runs_this_time"] == len(default_methods())
    assert 0 < seconds["training"] <= seconds["wall"]
    for row in report["rows"]:
        assert set(row["seconds"]) == {"setup", "data", "train", "evaluate", "save", "search", "measure"}
        assert row["seconds"]["train"] > 0 and row["train_seconds"] == pytest.approx(row["seconds"]["train"], abs=0.01)
    # the data were read and tokenised once for the whole grid of runs: every other run and
    # candidate looked them up (the reference model's measurements read them once more: it is
    # built from a run's recorded config, whose derived labels make it another cache key)
    assert len(READS) <= 2 and len({repr(data) for data in READS}) == len(READS), READS


def test_started_again_finished_runs_are_skipped(small):
    folder, path, _ = small
    before = {p: p.stat().st_mtime for p in (folder / "out" / "runs").rglob("report.json")}
    report = compare(load_compare_config(path), echo=lambda *_: None)
    assert before == {p: p.stat().st_mtime for p in (folder / "out" / "runs").rglob("report.json")}
    # nothing ran: the time record is still that of the comparison that trained the runs
    first = {k: v for k, v in small[2]["seconds"].items() if k != "report"}
    assert {k: v for k, v in report["seconds"].items() if k != "report"} == first
    assert first["runs_this_time"] == len(default_methods())


def test_a_pinned_learning_rate_skips_the_search_and_seeds_reuse_the_choice(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "out"), "seeds": [1, 2],
                                    "methods": [{"method": "bitfit", "learning_rate": 2e-3}, "ia3"]}))
    report = compare(load_compare_config(path), echo=lambda *_: None)
    rows = {r["method"]: r for r in report["rows"]}
    assert [c["learning_rate"] for c in rows["bitfit"]["candidates"]] == [2e-3]
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "cells").glob("*.json")}
    # the first seed searched: IA3's three rates, and one beyond the edge where an edge rate won
    assert len(cells["ia3-seed1"]["candidates"]) == 3 + len(cells["ia3-seed1"]["search"]["widened"])
    assert cells["ia3-seed2"]["search"]["widened"] == []  # a pinned rate is never widened
    assert [c["learning_rate"] for c in cells["ia3-seed2"]["candidates"]] == [cells["ia3-seed1"]["learning_rate"]]
    assert rows["ia3"]["seeds"] == [1, 2] and "±" in (tmp_path / "out" / "report.md").read_text()


def test_a_bad_method_entry_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"methods": ["lora", {"method": "lora2"}], "output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="unknown method 'lora2'"):
        load_compare_config(path)
    assert not (tmp_path / "cells").exists()


def test_evaluations_out_of_range_are_refused(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"evaluations": 1, "output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="evaluations = 1 is out of range"):
        load_compare_config(path)


def test_a_qlora_row_trains_on_a_quantised_base_against_the_unquantised_reference(tmp_path):
    path = tmp_path / "compare.yaml"
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "out"), "methods": [
        {"method": "lora", "quantization": quantization, "learning_rate": 3e-3},
        {"method": "lora", "quantization": {"load_in_8bit": True}, "learning_rate": 3e-3}]}))
    config = load_compare_config(path)
    run = config.run_config(config.methods[0], 42, None, None, tmp_path / "cell", 3e-3)
    assert run.model.quantization.bnb_4bit_quant_type == "nf4" and run.method.to_dict() == \
        RunConfig.from_dict({"method": {"method": "lora"}}).method.to_dict()
    report = compare(config, echo=lambda *_: None)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"qlora", "lora-int8"}
    for row in rows.values():  # every measurement made: merged latency too (merge re-quantises)
        assert row["notes"] == {} and row["latency_ratio"] is not None and row["merged_latency_ratio"] is not None
    adapter = tmp_path / "out" / "runs"
    recorded = [json.loads(p.read_text())["base_quantization"] for p in adapter.glob("*/*/adapter/adapter_config.json")]
    assert sorted(bool(q.get("load_in_4bit")) for q in recorded) == [False, True]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"methods": [{"method": "lora", "quantization": {"load_in_4bits": True}}]}))
    with pytest.raises(ConfigError, match=r"unknown key 'methods\[lora\].quantization.load_in_4bits'"):
        load_compare_config(bad)
