"""The training loop: setup -> loop -> evaluate -> save. The same for every method and task."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.accounting import ParameterReport, parameter_report
from ..core.errors import DeltatuneError
from ..core.yaml12 import dumps
from ..io.adapter_files import WEIGHTS_NAME, restore_adapter, save_adapter
from ..io.atomic import atomic_write_text
from ..io.run_folder import CHECKPOINTS, RUN_ADAPTER, RUN_CONFIG, RUN_REPORT, run_yaml
from ..tasks.base import lower_is_better
from .checkpoint import list_checkpoints, load_checkpoint, load_hook_states, trained_state, write_checkpoint
from .config import RunConfig, config_hash
from .frozen_cache import INDEX
from .logs import MetricsLog, plot_curves
from .memory import peak_memory_mb, reset_peak
from .setup import Run, setup
from .sharding import gathered, reshard


class TrainingError(DeltatuneError):
    """Training cannot go on (a non-finite loss, a checkpoint of another run)."""


class Pause(Exception):
    """Raised by an ``on_evaluate`` hook to stop after this evaluation; ``train(resume=True)``
    continues from the checkpoint just written (``compare``'s successive halving does this)."""


@dataclass
class RunResult:
    """What one run produced; ``report.json`` holds the same."""

    output_dir: str
    metrics: dict[str, float]
    parameters: ParameterReport
    adapter_bytes: int
    train_seconds: float
    step_seconds: float
    #: the whole run's peak (loading the model included); see train/memory.py for what it measures
    peak_memory_mb: float
    #: what it computed in (training.precision with auto decided): fp32, bf16 or fp16
    precision: str
    steps: int
    best_step: int
    stopped_early: bool = False
    interrupted: bool = False
    paused: bool = False
    #: wall seconds of this leg (a resumed run: since it resumed) by phase: setup (model, adapter,
    #: optimizer), data (reading, tokenising), train (batches, forward, backward, optimizer),
    #: evaluate, save (adapters, checkpoints).
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: training.cache_frozen: the block whose inputs were kept, how many examples' and their size,
    #: and how many batches skipped the blocks below it
    frozen_cache: dict[str, Any] | None = None
    #: rows of each split after tokenising (a QA context cut into windows counts once per window)
    rows: dict[str, int] = field(default_factory=dict)
    #: the peak from the first training step on: the model built (and sharded), loading's copies freed
    train_peak_memory_mb: float = 0.0
    #: processes that trained together (torchrun); the memory figures are the first one's
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # report.json: the counts and percentages, not the per-module table (`deltatune inspect` shows it)
        data["parameters"] = {k: v for k, v in self.parameters.to_dict().items() if k != "per_module"}
        data.update(self.metrics)  # eval_accuracy etc. at the top level, as transformers reports them
        return data


PHASES = ("setup", "data", "train", "evaluate", "save")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch consumed by finished optimizer steps
    best_metric: float | None = None
    best_step: int = 0
    last_eval_step: int = -1
    evals_without_improvement: int = 0
    step_times: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    best_eval: dict[str, float] = field(default_factory=dict)  # validation metrics of the best step
    #: torch's RNG state after the last optimizer step: an interrupt mid-step resumes from there.
    rng: Any = field(default=None, repr=False)


def train(config: RunConfig, resume: bool = False,
          on_evaluate: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Fine-tune as configured and write the run folder.

    Args:
        config: the run's configuration.
        resume: continue from the newest whole checkpoint in ``output_dir/checkpoints``.
        on_evaluate: called after each validation pass (and its checkpoint) with the step and the
            ``eval_*`` metrics. An exception it raises stops training and leaves ``train``:
            hyperparameter search prunes unpromising runs this way.

    Returns:
        The run's metrics, parameter report and timings.

    Raises:
        ConfigError: bad configuration or data (before any training).
        TrainingError: non-finite loss, or a checkpoint from another config.
    """
    folder = Path(config.training.output_dir)
    check_output_folder(folder, resume)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak(device)
    run = setup(config)  # every config and data error surfaces here, before anything is written
    setup_peak = peak_memory_mb(device)
    reset_peak(device)
    run.on_evaluate = on_evaluate
    folder.mkdir(parents=True, exist_ok=True)
    progress = _restore(run, folder) if resume else Progress()
    progress.seconds["data"] = run.data_seconds
    progress.seconds["setup"] = time.perf_counter() - started - run.data_seconds
    log = MetricsLog(folder, enabled=run.accelerator.is_main_process, resume=resume)
    _write_run_config(run, folder)
    stopped = ""
    try:
        _loop(run, progress, log, folder)
    except KeyboardInterrupt:
        stopped = "interrupted"
        _checkpoint(run, progress, folder)
    except Pause:
        stopped = "paused"
    finally:
        log.close()
    return _finish(run, progress, folder, stopped, setup_peak)


@contextmanager
def _timed(progress: Progress, phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        progress.seconds[phase] += time.perf_counter() - start


def check_output_folder(folder: Path, resume: bool) -> None:
    """The run folder can be created and written, without creating it yet."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        what = "is a file" if existing == folder else f"is under '{existing}', which is not a writable folder"
        raise TrainingError(f"output directory '{folder}' {what}.", "choose another training.output_dir.")
    if resume and not list_checkpoints(folder / CHECKPOINTS):
        raise TrainingError(f"--resume: '{folder}/checkpoints' holds no checkpoint.",
                            "start the run without --resume, or set training.save_steps.")


def _loop(run: Run, progress: Progress, log: MetricsLog, folder: Path) -> None:
    training = run.config.training
    bar = tqdm(total=run.total_steps, initial=progress.step, desc="train", unit="step",
               disable=not (training.progress and run.accelerator.is_local_main_process))
    run.model.train()
    try:
        while progress.step < run.total_steps:
            if _run_epoch(run, progress, log, folder, bar):
                return
    finally:
        bar.close()
    if progress.last_eval_step != progress.step:
        _evaluate_and_keep_best(run, progress, log, folder)


def _run_epoch(run: Run, progress: Progress, log: MetricsLog, folder: Path, bar: tqdm) -> bool:
    """Train from the saved position to the end of the epoch (or of training); True: stop early."""
    training = run.config.training
    accumulate = training.gradient_accumulation_steps
    run.sampler.set_position(progress.epoch, progress.batch)
    # progress.batch counts batches of the whole sampler; each process iterates its share.
    start, batches_left, processes = progress.batch, len(run.train_loader), run.accelerator.num_processes
    losses: list[float] = []
    tick = time.perf_counter()
    for i, batch in enumerate(run.train_loader):
        loss = _training_loss(run, batch)
        _check_finite(loss, progress, folder)
        run.accelerator.backward(loss / accumulate)
        losses.append(loss.item())
        if (i + 1) % accumulate and i + 1 < batches_left:
            continue  # keep accumulating gradients
        _optimizer_step(run, progress.step + 1)
        progress.step, progress.batch = progress.step + 1, start + (i + 1) * processes
        progress.rng = torch.get_rng_state()
        progress.step_times.append(time.perf_counter() - tick)
        progress.seconds["train"] += progress.step_times[-1]
        bar.update(1)
        bar.set_postfix(loss=f"{statistics.fmean(losses):.4f}", epoch=progress.epoch + 1)
        if progress.step % training.logging_steps == 0:
            epoch = progress.epoch + progress.batch / run.sampler.batches_per_epoch
            log.write({"step": progress.step, "epoch": round(epoch, 4), "loss": statistics.fmean(losses),
                       "learning_rate": run.scheduler.get_last_lr()[0]})
            losses = []
        if run.eval_steps and progress.step % run.eval_steps == 0:
            if _evaluate_and_keep_best(run, progress, log, folder):
                return True
        elif training.save_steps and progress.step % training.save_steps == 0:
            with _timed(progress, "save"):
                _checkpoint(run, progress, folder)
        if progress.step >= run.total_steps:
            return False
        tick = time.perf_counter()
    progress.epoch, progress.batch = progress.epoch + 1, 0
    return not run.eval_steps and _evaluate_and_keep_best(run, progress, log, folder)


def _training_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The task's loss, plus any term the adapter's training hooks add (a regulariser)."""
    if run.frozen is None:
        loss = run.model(**batch).loss
    else:
        indices = batch.pop(INDEX)
        with run.frozen.forward(batch, indices):
            loss = run.model(**batch).loss
    for hooks in run.hooks.values():
        extra = hooks.extra_loss()
        if extra is not None:
            loss = loss + extra
    return loss


def _optimizer_step(run: Run, step: int) -> None:
    """Optimizer step number ``step`` (1-based): clip, update, schedule, hooks, clear gradients."""
    max_norm = run.config.training.max_grad_norm
    if max_norm is not None:
        run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    run.optimizer.step()
    run.scheduler.step()
    for hooks in run.hooks.values():
        hooks.after_step(step, run.total_steps)
    run.optimizer.zero_grad(set_to_none=True)


def _check_finite(loss: torch.Tensor, progress: Progress, folder: Path) -> None:
    if torch.isfinite(loss).all():
        return
    checkpoints = list_checkpoints(folder / CHECKPOINTS)
    kept = f"the last good checkpoint is kept at {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    raise TrainingError(f"the training loss became {loss.item()} at step {progress.step + 1} "
                        f"(epoch {progress.epoch + 1}); {kept}.",
                        "lower training.learning_rate, keep training.max_grad_norm set, or use "
                        "training.precision: fp32; then run again with --resume.")


def evaluate(model: torch.nn.Module, loader: Any, task: Any, accelerator: Any, prefix: str) -> dict[str, float]:
    """Loss and task metrics over one loader, named ``<prefix>_<metric>`` (eval_accuracy, test_f1).

    Args:
        model: the (adapted) model; put in eval mode for the pass and back afterwards.
        loader: batches from the task's collator.
        task: computes the metrics (``Task.evaluate``).
        accelerator: gathers outputs across processes.
        prefix: ``eval`` or ``test``.

    Returns:
        The task's metrics and ``loss`` under prefixed names.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, loader, accelerator)
    reshard(model)  # sharded: a pass without backward leaves the root's weights whole
    model.train(was_training)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def _evaluate_split(run: Run, split: str) -> dict[str, float]:
    prefix = "eval" if split == "validation" else split
    return evaluate(run.model, run.eval_loaders[split], run.task, run.accelerator, prefix)


def _evaluate_and_keep_best(run: Run, progress: Progress, log: MetricsLog, folder: Path) -> bool:
    """Evaluate, save the adapter when it is the best so far, checkpoint; True means stop early."""
    with _timed(progress, "evaluate"):
        metrics = _evaluate_split(run, "validation")
    progress.last_eval_step = progress.step
    # training seconds so far (every leg), for curves of quality against time
    log.write({"step": progress.step, "train_seconds": round(sum(progress.step_times), 3), **metrics})
    key = f"eval_{run.resolved.metric_for_best_model}"
    value = -metrics[key] if lower_is_better(key) else metrics[key]
    with _timed(progress, "save"):
        if progress.best_metric is None or value > progress.best_metric:
            progress.best_metric, progress.best_step, progress.best_eval = value, progress.step, metrics
            progress.evals_without_improvement = 0
            _save_best(run, folder)
        else:
            progress.evals_without_improvement += 1
        _checkpoint(run, progress, folder)
    if run.on_evaluate is not None:
        run.on_evaluate(progress.step, metrics)
    patience = run.config.training.early_stopping_patience
    return patience is not None and progress.evals_without_improvement >= patience


def _save_best(run: Run, folder: Path) -> None:
    model = run.accelerator.unwrap_model(run.model)
    with gathered(model):  # sharded: every process gathers the adapter, one writes it
        if run.accelerator.is_main_process:
            save_adapter(model, folder / RUN_ADAPTER)


def _checkpoint(run: Run, progress: Progress, folder: Path) -> None:
    run.accelerator.wait_for_everyone()
    main = run.accelerator.is_main_process
    if not main and run.sharded_blocks is None:
        return
    optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
    tensors = trained_state(run.accelerator.unwrap_model(run.model), optimizer)  # sharded: every process gathers
    if not main:
        return
    # seconds are per leg: a resumed run reports the time of its own leg
    state = {k: v for k, v in dataclasses.asdict(progress).items() if k not in ("step", "rng", "seconds")}
    state["config_hash"] = config_hash(run.config)
    write_checkpoint(folder / CHECKPOINTS, progress.step, tensors, {**state, "scheduler": run.scheduler.state_dict()},
                     rng=progress.rng, hooks={name: h.state_dict() for name, h in run.hooks.items()})


def _restore(run: Run, folder: Path) -> Progress:
    path = list_checkpoints(folder / CHECKPOINTS)[-1]
    optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
    state = load_checkpoint(path, run.accelerator.unwrap_model(run.model), optimizer, config_hash(run.config))
    for name, tensors in load_hook_states(path).items():
        run.hooks[name].load_state_dict(tensors)
    run.scheduler.load_state_dict(state["scheduler"])
    names = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in state.items() if k in names})


def _write_run_config(run: Run, folder: Path) -> None:
    if run.accelerator.is_main_process:
        atomic_write_text(folder / RUN_CONFIG, dumps(run_yaml(run.config.to_dict(), run.resolved)))


def _finish(run: Run, progress: Progress, folder: Path, stopped: str, setup_peak: float) -> RunResult:
    model = run.accelerator.unwrap_model(run.model)
    # Counted as trained, before the best adapter is reloaded: a reload drops training-only parts.
    with gathered(model):
        parameters = parameter_report(model)
    metrics: dict[str, float] = {}
    adapter_file = folder / RUN_ADAPTER / WEIGHTS_NAME
    if not stopped:
        with _timed(progress, "evaluate"):
            if adapter_file.is_file():
                with gathered(model, write_back=True):
                    restore_adapter(model, folder / RUN_ADAPTER)
            metrics = {**progress.best_eval, **_evaluate_split(run, "test")}
    loop_seconds = sum(progress.seconds[p] for p in ("train", "evaluate", "save"))
    train_peak = peak_memory_mb(run.accelerator.device)
    result = RunResult(
        output_dir=str(folder), metrics=metrics, parameters=parameters,
        adapter_bytes=adapter_file.stat().st_size if adapter_file.is_file() else 0,
        train_seconds=round(loop_seconds, 3),
        step_seconds=round(statistics.median(progress.step_times), 4) if progress.step_times else 0.0,
        peak_memory_mb=round(max(setup_peak, train_peak), 1), train_peak_memory_mb=round(train_peak, 1),
        precision=run.resolved.precision, steps=progress.step,
        best_step=progress.best_step, stopped_early=progress.step < run.total_steps and not stopped,
        interrupted=stopped == "interrupted", paused=stopped == "paused",
        seconds={k: round(v, 3) for k, v in progress.seconds.items()}, config=run.config.to_dict(),
        frozen_cache=run.frozen.summary() if run.frozen else None,
        rows={name: len(split) for name, split in run.data.items()}, processes=run.accelerator.num_processes)
    if run.accelerator.is_main_process:
        atomic_write_text(folder / RUN_REPORT, json.dumps(result.to_dict(), indent=2) + "\n")
        if not result.paused:
            plot_curves(folder, run.resolved.metric_for_best_model)
    return result
