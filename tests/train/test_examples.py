"""Every example config is valid and trains on a small slice of its real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltatune.train.config import load_config
from deltatune.train.loop import train

EXAMPLES = Path(__file__).parents[2] / "examples"
# Examples that name a train_file are templates for the user's own data: validated, not trained.
BUNDLED = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "compare.yaml"
                 and "train_file" not in (yaml.safe_load(p.read_text()).get("data") or {}))
SLICE = ["data.max_train_samples=48", "data.max_eval_samples=24", "training.max_steps=3",
         "training.batch_size=16", "training.progress=false", "model.max_length=48"]


def test_every_example_is_a_valid_config():
    from deltatune.compare.config import load_compare_config

    for path in EXAMPLES.glob("*.yaml"):
        (load_compare_config if path.name == "compare.yaml" else load_config)(path)


@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_example_trains_on_a_small_slice(path, tmp_path):
    config = load_config(path, SLICE + [f"training.output_dir={tmp_path}"])
    result = train(config)
    assert result.steps == 3
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
