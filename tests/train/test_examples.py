"""Every example config is valid and trains on a small slice of its real data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from deltatune.tasks.base import lower_is_better, task_class
from deltatune.train.config import load_config
from deltatune.train.loop import train

EXAMPLES = Path(__file__).parents[2] / "examples"
# Examples that name a train_file are templates for the user's own data: validated, not trained.
BUNDLED = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith(("compare", "tune."))
                 and "train_file" not in (yaml.safe_load(p.read_text()).get("data") or {}))
SLICE = ["data.max_train_samples=48", "data.max_eval_samples=24", "training.max_steps=3",
         "training.batch_size=16", "training.progress=false", "model.max_length=48"]
# Per-example knobs. tokens: 48 sentences lack tags that the eval slice has (refused); 256 is the
# first prefix with them all, and training still stops after 3 steps. seq2seq: evaluation
# generates for every example, so generation is cut short.
EXTRA = {"tokens": ["data.max_train_samples=256"],
         "seq2seq": ["task.max_new_tokens=8", "task.max_target_length=16"]}


def test_every_example_is_a_valid_config():
    from deltatune.compare.config import load_compare_config
    from deltatune.search import load_tune_config

    for path in EXAMPLES.glob("*.yaml"):
        loader = (load_compare_config if path.name.startswith("compare") else
                  load_tune_config if path.name == "tune.yaml" else load_config)
        loader(path)


def test_make_run_is_the_documented_comparison():
    """examples/compare.yaml is what `deltatune compare` (and `make run`) runs with no config."""
    from deltatune.compare.config import load_compare_config

    default, example = load_compare_config(None), load_compare_config(EXAMPLES / "compare.yaml")
    same = ("base", "methods", "seeds", "evaluations", "forgetting_texts", "latency_batches", "search")
    assert [getattr(default, k) for k in same] == [getattr(example, k) for k in same]


def test_the_all_methods_comparison_names_every_method():
    """examples/compare-all.yaml is the default comparison with every registered method."""
    from deltatune.compare.config import load_compare_config
    from deltatune.core.method import registered

    default, every = load_compare_config(None), load_compare_config(EXAMPLES / "compare-all.yaml")
    assert sorted(m["method"] for m in every.methods) == sorted(registered())
    assert (every.base, every.seeds, every.evaluations, every.search) == (
        default.base, default.seeds, default.evaluations, default.search)


@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_example_trains_on_a_small_slice(path, tmp_path):
    config = load_config(path, SLICE + EXTRA.get(path.stem, []) + [f"training.output_dir={tmp_path}"])
    result = train(config)
    assert result.steps == 3
    metric = task_class(config.task.type).primary_metric
    value = result.metrics[f"test_{metric}"]  # perplexity >= 1; accuracy, f1, rouge1 in [0, 1]
    assert (1.0 <= value < math.inf) if lower_is_better(metric) else (0.0 <= value <= 1.0)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
