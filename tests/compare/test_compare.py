"""A small comparison end to end: every method, and the report checked against the runs' files."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from deltatune import ConfigError, registered
from deltatune.compare.config import load_compare_config
from deltatune.compare.runner import compare

pytestmark = pytest.mark.slow

SMALL = {
    "model": {"max_length": 32},
    "data": {"source": "rotten-tomatoes", "max_train_samples": 32, "max_eval_samples": 16},
    "training": {"max_steps": 2, "batch_size": 16, "warmup_steps": 0},
    "latency_batches": 1, "forgetting_texts": 8, "isolate": False,
}


def test_every_method_compared_and_the_report_matches_the_runs(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "out")}))
    rows = compare(load_compare_config(path), echo=lambda *_: None)
    assert {r["method"] for r in rows} == set(registered())
    report = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert report == rows
    for row in rows:
        run = tmp_path / "out" / "runs" / f"{row['method']}-seed42"
        run_report = json.loads((run / "report.json").read_text())
        weights = run / "adapter" / "adapter_model.safetensors"
        assert row["adapter_bytes"] == weights.stat().st_size
        assert row["stored_params"] == run_report["parameters"]["stored"] == sum(
            t.numel() for t in load_file(weights).values())
        assert row["trainable_params"] == run_report["parameters"]["trainable"]
        assert row["accuracy"] == run_report["test_accuracy"]
        assert 0.5 < row["latency_ratio"] < 5
        assert (row["merged_latency_ratio"] is not None) == registered()[row["method"]].mergeable
    by_method = {r["method"]: r for r in rows}
    # LoRA r=8 on query/value (73,728) + pooler and classifier (148,610) of a 22.7M model.
    assert by_method["lora"]["stored_params"] == 222_338 < 0.01 * by_method["full"]["stored_params"]
    assert (tmp_path / "out" / "quality_vs_storage.png").is_file()
    assert "| lora |" in (tmp_path / "out" / "report.md").read_text()

    # Started again, finished runs are skipped: no run folder is touched.
    before = {p: p.stat().st_mtime for p in (tmp_path / "out" / "runs").rglob("report.json")}
    compare(load_compare_config(path), echo=lambda *_: None)
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "out" / "runs").rglob("report.json")}


def test_a_bad_method_entry_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"methods": ["lora", {"method": "lora2"}], "output_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="unknown method 'lora2'"):
        load_compare_config(path)
    assert not (tmp_path / "cells").exists()
