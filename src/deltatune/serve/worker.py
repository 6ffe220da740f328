"""One batch on the model, in the worker thread: forward passes over the rows that can share
them, each request answered on its own.

A batch holds requests for many adapters. Those whose rows can share a forward pass (equal
:func:`batch_key`) run as one ``mixed_batch``, every row with its own adapter, and each
request's rows are then read by its own run's task (its labels, its tags). If a pass fails,
each of its requests runs again alone, so that only a request that fails by itself gets an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from ..core.rows import mixed_batch
from ..tasks.base import Encoded
from .errors import ModelFailure, ServeError, UnknownAdapter
from .registry import Registry, Served

log = logging.getLogger("deltatune.serve")

Outcome = list[dict[str, Any]] | ServeError  # a request's readable rows, or the error it gets


@dataclass(eq=False)
class Job:
    """One prediction request, encoded, waiting for its answer."""

    served: Served
    encoded: Encoded
    future: asyncio.Future
    queued_at: float  # the event loop's clock

    @property
    def rows(self) -> int:
        return len(self.encoded.features)


@dataclass
class Stats:
    """What the server has done, for GET /health."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    multi_adapter_batches: int = 0  # batches holding requests for more than one adapter
    forward_passes: int = 0
    multi_adapter_passes: int = 0  # forward passes whose rows ran more than one adapter
    failed_passes: int = 0  # passes that raised (their requests were then run one at a time)


def batch_key(served: Served) -> tuple:
    """Requests with equal keys share a forward pass: their rows run on the same model instance
    (one task, one head width, so that the outputs stack into one tensor; adapters that cannot
    run per row have instances of their own) with the same forward options (a generation's
    number of new tokens)."""
    return served.instance.key, getattr(served.task.options, "max_new_tokens", None)


def run_batch(jobs: list[Job], registry: Registry, stats: Stats) -> list[Outcome]:
    """Every job's outcome, in order. Holds the registry's lock: no adapter changes meanwhile."""
    with registry.lock:
        outcomes: dict[Job, Outcome] = {}
        live = [job for job in jobs if registry.adapters.get(job.served.name) is job.served]
        for job in set(jobs) - set(live):
            outcomes[job] = UnknownAdapter(f"adapter '{job.served.name}' was unloaded while this request waited.",
                                           "load it again with POST /v1/adapters.")
        for group in _groups(live):
            outcomes.update(zip(group, _answer(group, stats)))
    return [outcomes[job] for job in jobs]


def _groups(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job.served), []).append(job)
    return list(groups.values())


def _answer(jobs: list[Job], stats: Stats) -> list[Outcome]:
    """The jobs' outcomes from one forward pass; if it fails, from one pass per job."""
    try:
        outputs = _forward(jobs, stats)
    except Exception as error:  # noqa: BLE001 (any failure of the model is answered, never fatal)
        stats.failed_passes += 1
        if len(jobs) > 1:
            return [outcome for job in jobs for outcome in _answer([job], stats)]
        return [failure(error)]
    return [_decode(job, rows) for job, rows in zip(jobs, outputs)]


def _forward(jobs: list[Job], stats: Stats) -> list[list[Any]]:
    """The model's outputs for each job's rows, from one forward pass over all of them."""
    task, instance = jobs[0].served.task, jobs[0].served.instance
    features = [row for job in jobs for row in job.encoded.features]
    names = [job.served.name for job in jobs for _ in job.encoded.features]
    with mixed_batch(instance.model, names):
        outputs = task.forward(instance.model, instance.worker_tokenizer, features)
    stats.forward_passes += 1
    stats.multi_adapter_passes += len(set(names)) > 1
    ends = itertools.accumulate(job.rows for job in jobs)
    return [outputs[end - job.rows:end] for job, end in zip(jobs, ends)]


def _decode(job: Job, outputs: list[Any]) -> Outcome:
    try:
        return job.served.task.decode(job.served.instance.worker_tokenizer, job.encoded, outputs)
    except Exception as error:  # noqa: BLE001
        return failure(error)


def failure(error: Exception) -> ModelFailure:
    log.error("the model failed on a request", exc_info=error)
    return ModelFailure(f"the model failed on this request ({type(error).__name__}: {error}).",
                        "the server goes on serving; its log has the traceback.")
