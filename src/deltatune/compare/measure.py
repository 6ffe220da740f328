"""What a trained run costs at inference and what it forgot, against the base model.

The base model and its embeddings of the general text are made once per model and reused for
every method (``Reference``). A measurement that cannot be made is ``None`` with a note saying
why (``notes``: ``"failed: <error>"`` or ``"not measured: <reason>"``), which the report shows:
a missing number is never silent.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from ..assets import dist_file
from ..core.verbs import adapter_state, merge_and_unload
from ..data.bundled import BUNDLED, read_bundled
from ..tasks import task_for
from ..train.config import RunConfig
from ..train.precision import compute_in, resolve
from ..train.setup import resolve_model_path, tokenised

GENERAL = "bbc-news"  # the general text whose embeddings measure forgetting


def validation_baseline(config: RunConfig) -> dict[str, float]:
    """The trivial predictor's validation metrics (the majority class) for a run config's data,
    where its task has one; the data is tokenised once per process (``tokenised``)."""
    path = resolve_model_path(config.model.name_or_path)
    task = task_for(config)
    splits = tokenised(config, task, AutoTokenizer.from_pretrained(path), path)
    return task.baseline(splits["train"], splits["validation"])


class Reference:
    """The base model, a few test batches and (made for the first run measured) the base's
    embeddings of held-out general text."""

    def __init__(self, config: RunConfig, task: Any, tokenizer: Any, latency_batches: int, forgetting_texts: int):
        path = resolve_model_path(config.model.name_or_path)
        self.model = compute_in(unquantized(task).load_model(path), resolve(config.training.precision)).eval()
        splits = tokenised(config, task, tokenizer, path)
        self.batches = _spread_batches(splits["test"], task.collator(tokenizer), config.training.eval_batch_size,
                                       latency_batches)
        self.tokenizer, self.max_length, self.forgetting_texts = tokenizer, config.model.max_length, forgetting_texts
        #: (the general texts' batch, the base model's embeddings of it), once made
        self.general: tuple[dict, torch.Tensor] | None = None
        #: why a measurement is missing for every run of this model
        self.notes: dict[str, str] = {}
        distribution, suffix, pin, _ = BUNDLED[GENERAL]
        if dist_file(distribution, suffix) is None:
            self.notes["forgetting"] = f"not measured: the bundled '{GENERAL}' set is not installed ({pin})"


def unquantized(task: Any) -> Any:
    """The task loading its base in full precision: a quantised run (qlora) is measured against the
    base as it was pre-trained, so its latency and forgetting include what quantising costs."""
    plain = copy.copy(task)
    plain.config = dataclasses.replace(task.config, model=dataclasses.replace(task.config.model, quantization=None))
    return plain


def _spread_batches(data: Any, collate: Any, size: int, count: int) -> list[dict]:
    """``count`` batches spread evenly over the (length-sorted) test split: short and long inputs."""
    starts = [round(i * (len(data) - size) / max(1, count - 1)) if count > 1 else max(0, (len(data) - size) // 2)
              for i in range(count)]
    return [{k: v for k, v in collate([data[j] for j in range(s, min(s + size, len(data)))]).items() if k != "labels"}
            for s in starts]


def measure(reference: Reference, adapted: nn.Module) -> dict[str, Any]:
    """Latency ratios (adapted and merged over base) and forgetting of one finished run's model,
    and ``notes``: why any of them is missing."""
    notes = dict(reference.notes)
    latency = _attempt("latency_ratio", lambda: latency_ratios(reference.model, adapted, reference.batches),
                       notes) or {}
    forgetting = None
    if "forgetting" not in notes:
        forgetting = _attempt("forgetting", lambda: _forgetting(reference, adapted), notes)
    return {"latency_ratio": latency.get("adapted"), "merged_latency_ratio": latency.get("merged"),
            "forgetting": forgetting, "notes": notes}


def _attempt(name: str, measurement: Callable[[], Any], notes: dict[str, str]) -> Any:
    """The measurement's value; on an error, None and the error in ``notes[name]``: the runs are
    trained and saved already, and one measurement that fails must not lose the comparison."""
    try:
        return measurement()
    except Exception as error:  # reported in the row, never dropped
        notes[name] = f"failed: {type(error).__name__}: {error}"
        return None


def _forgetting(reference: Reference, adapted: nn.Module) -> float:
    if reference.general is None:
        texts = reference.tokenizer(general_texts(reference.forgetting_texts), truncation=True,
                                    max_length=reference.max_length, padding=True, return_tensors="pt")
        reference.general = texts, embed(reference.model, texts)
    texts, base = reference.general
    return forgetting_between(base, embed(adapted, texts))


def forgetting_between(base: torch.Tensor, adapted: torch.Tensor) -> float:
    """1 - the mean cosine similarity of the adapted model's embeddings to the base model's
    (one row per text), rounded to 5 decimals: 0 when nothing moved."""
    cosine = torch.nn.functional.cosine_similarity(base, adapted)  # (texts,)
    return round(1.0 - cosine.mean().item(), 5)


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
    if state and all(state.methods[n].mergeable for n in state.active):
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
    """Held-out general English (first lines of BBC articles), unlike any training task here.

    Raises:
        DeltatuneError: the bundled BBC set is not installed.
    """
    rows = read_bundled(GENERAL)
    return [row["text"].split("\n")[0][:300] for row in rows[::max(1, len(rows) // count)]][:count]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled last hidden states over the user's tokens: what a sentence-embedding model
    (the bundled MiniLM) was trained to produce. 1 - cosine to the base's is the forgetting."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)
