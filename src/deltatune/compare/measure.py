"""One cell of the comparison, run in a fresh process so its peak memory is its own.

Trains, then reloads the saved adapter and measures, against the base model in the same
process: inference latency (adapted, and merged where the method merges) and forgetting.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.method import method_for
from ..core.verbs import adapter_state, merge_and_unload
from ..data.bundled import read_bundled
from ..data.loading import load_splits
from ..train.config import RunConfig
from ..train.inference import load_run
from ..train.loop import train
from ..train.setup import resolve_model_path


def run_cell(run: dict[str, Any], latency_batches: int, forgetting_texts: int) -> dict[str, Any]:
    """Train one configuration and measure it; returns a JSON-ready dict."""
    from ..cli import _quiet_libraries

    _quiet_libraries()
    config = RunConfig.from_dict(run)
    result = train(config)
    _, task, tokenizer, adapted = load_run(config.training.output_dir)
    base = task.load_model(resolve_model_path(config.model.name_or_path)).eval()
    batches = _test_batches(config, task, tokenizer, latency_batches)
    latency = _latency_ratios(base, adapted, batches)
    return {
        "result": result.to_dict(),
        "base_params": sum(p.numel() for p in base.parameters()),
        "latency_ratio": latency["adapted"],
        "merged_latency_ratio": latency.get("merged"),
        "forgetting": _forgetting(base, adapted, tokenizer, config, forgetting_texts),
    }


def _test_batches(config: RunConfig, task: Any, tokenizer: Any, count: int) -> list[dict]:
    splits = load_splits(config.data)
    data = task.prepare(splits, tokenizer, config)["test"]
    loader = DataLoader(data, batch_size=config.training.eval_batch_size, collate_fn=task.collator(tokenizer))
    batches = []
    for batch in loader:
        batches.append({k: v for k, v in batch.items() if k != "labels"})
        if len(batches) == count:
            break
    return batches


def seconds_per_pass(model: nn.Module, batches: list[dict]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start


def _latency_ratios(base: nn.Module, adapted: nn.Module, batches: list[dict], repeats: int = 5) -> dict[str, float]:
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
    """Held-out general English (first lines of BBC articles), unlike any training task here."""
    try:
        rows = read_bundled("bbc-news")
    except Exception:  # the package is optional for comparisons; forgetting is then not measured
        return []
    return [row["text"].split("\n")[0][:300] for row in rows[::max(1, len(rows) // count)]][:count]


def _forgetting(base: nn.Module, adapted: nn.Module, tokenizer: Any, config: RunConfig, count: int) -> float | None:
    """1 - mean cosine similarity of the base and adapted sentence embeddings on general text.

    The base is a sentence-embedding model: how far its embeddings move is how much of its
    original skill the adaptation overwrote (0 = untouched).
    """
    texts = general_texts(count)
    if not texts:
        return None
    batch = tokenizer(texts, truncation=True, max_length=config.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = _embed(base, batch)
        after = _embed(adapted, batch)
    return round(1.0 - torch.nn.functional.cosine_similarity(before, after).mean().item(), 5)


def _embed(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    hidden = hidden[:, -batch["input_ids"].shape[1]:]  # methods that prepend tokens: keep the user's
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)
