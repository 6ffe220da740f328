"""What a trained run costs at inference and what it forgot, against the base model.

The base model and its embeddings of the general text are made once per model and reused for
every method (``Reference``).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..core.method import method_for
from ..core.verbs import adapter_state, merge_and_unload
from ..data.bundled import read_bundled
from ..train.config import RunConfig
from ..train.setup import resolve_model_path, tokenised


class Reference:
    """The base model, a few test batches, the task's trivial baseline and the base's embeddings
    of held-out general text."""

    def __init__(self, config: RunConfig, task: Any, tokenizer: Any, latency_batches: int, forgetting_texts: int):
        path = resolve_model_path(config.model.name_or_path)
        self.model = task.load_model(path).eval()
        splits = tokenised(config, task, tokenizer, path)
        #: validation metrics of the trivial predictor (the majority class), where the task has one
        self.baseline = task.baseline(splits["train"], splits["validation"])
        self.batches = _spread_batches(splits["test"], task.collator(tokenizer), config.training.eval_batch_size,
                                       latency_batches)
        texts = general_texts(forgetting_texts)
        self.texts = tokenizer(texts, truncation=True, max_length=config.model.max_length, padding=True,
                               return_tensors="pt") if texts else None
        self.embeddings = embed(self.model, self.texts) if texts else None


def _spread_batches(data: Any, collate: Any, size: int, count: int) -> list[dict]:
    """``count`` batches spread evenly over the (length-sorted) test split: short and long inputs."""
    starts = [round(i * (len(data) - size) / max(1, count - 1)) if count > 1 else max(0, (len(data) - size) // 2)
              for i in range(count)]
    return [{k: v for k, v in collate([data[j] for j in range(s, min(s + size, len(data)))]).items() if k != "labels"}
            for s in starts]


def measure(reference: Reference, adapted: nn.Module) -> dict[str, Any]:
    """Latency ratios (adapted and merged over base) and forgetting of one finished run's model."""
    latency = latency_ratios(reference.model, adapted, reference.batches)
    forgetting = None
    if reference.texts is not None:
        cosine = torch.nn.functional.cosine_similarity(reference.embeddings, embed(adapted, reference.texts))
        forgetting = round(1.0 - cosine.mean().item(), 5)
    return {"latency_ratio": latency["adapted"], "merged_latency_ratio": latency.get("merged"),
            "forgetting": forgetting}


def seconds_per_pass(model: nn.Module, batches: list[dict]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start


def latency_ratios(base: nn.Module, adapted: nn.Module, batches: list[dict], repeats: int = 3) -> dict[str, float]:
    """Median time of the adapted (and merged) model over the base model's, measured interleaved
    so that a noisy neighbour slows all of them alike."""
    models = {"base": base, "adapted": adapted}
    state = adapter_state(adapted)
    if state and all(method_for(state.configs[n]).mergeable for n in state.active):
        models["merged"] = merge_and_unload(copy.deepcopy(adapted))
    for model in models.values():
        seconds_per_pass(model, batches[:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(seconds_per_pass(model, batches))
    base_time = statistics.median(times["base"])
    return {name: round(statistics.median(t) / base_time, 3) for name, t in times.items() if name != "base"}


def general_texts(count: int) -> list[str]:
    """Held-out general English (first lines of BBC articles), unlike any training task here;
    none when the bundled BBC set is not installed (forgetting is then not measured)."""
    try:
        rows = read_bundled("bbc-news")
    except DeltatuneError:
        return []
    return [row["text"].split("\n")[0][:300] for row in rows[::max(1, len(rows) // count)]][:count]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled last hidden states over the user's tokens: what a sentence-embedding model
    (the bundled MiniLM) was trained to produce. 1 - cosine to the base's is the forgetting."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)
