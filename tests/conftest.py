import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import random

import pytest


def pytest_collection_modifyitems(config, items):
    """Under `make mutation`, run a mutant's quickest tests first: mutmut stops at the first
    failure, so a mutant a unit test kills no longer waits for the end-to-end runs."""
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.exists():
        return
    seconds = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init BERT saved with the bundled model's real tokenizer (offline)."""
    from transformers import BertConfig, BertModel

    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), lambda tokenizer: BertModel(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128)))


POSITIVE = ["great", "wonderful", "superb", "delightful", "excellent"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "horrible"]
FILLER = ["the", "film", "was", "plot", "actors", "really", "quite", "and", "story", "music"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """An easy synthetic task: the label is which word list the one cue word comes from."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    import csv

    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows(400))
    return path
