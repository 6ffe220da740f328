"""The search loop: ask Optuna for parameters, train a normal run with them, tell it the result.

The trials live in ``<output_dir>/study.db`` (SQLite). Started again on the same folder, a
search keeps its finished trials and runs only the ones still missing; a trial cut short by
Ctrl-C or a kill is recorded as failed and its parameters run again. The sampler is seeded with
``training.seed`` (plus the number of trials already in the folder, so a resumed search does not
draw its first trials again).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import ConfigError, DeltatuneError
from ..env import offline_and_quiet
from ..train.logs import eta_text
from ..train.loop import check_output_folder, train
from .report import TrialRecord, TuneResult, best_trial, format_cell, write_report
from .space import TuneConfig, load_tune_config

STUDY = "deltatune"
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
INTERRUPTED = "interrupted; its parameters run again in a later trial"


def tune(config: TuneConfig | str | Path, trials: int, output_dir: str | Path | None = None,
         pruner: optuna.pruners.BasePruner | None = None, sampler: optuna.samplers.BaseSampler | None = None,
         echo: Callable[[str], Any] = print) -> TuneResult:
    """Search the config's ``search:`` space with Optuna: each trial is a normal training run.

    The objective is the validation metric that picks a run's best checkpoint (the task's:
    accuracy, f1, exact_match, perplexity...), maximised or minimised as the metric requires.

    Args:
        config: a :class:`TuneConfig`, or the path of a run YAML with a ``search:`` section.
        trials: how many trials to finish, counting those already finished in the folder.
        output_dir: the search folder (default: the config's ``training.output_dir``); each
            trial trains in ``trial-NNN/`` inside it.
        pruner: told each evaluation's metric; stops unpromising trials (default: ``MedianPruner()``;
            ``optuna.pruners.NopPruner()`` never stops one).
        sampler: proposes parameters (default: ``TPESampler`` seeded with ``training.seed``).
        echo: prints the progress lines.

    Returns:
        Every trial and the best one; ``tune.json``, ``tune.md`` and ``best.yaml`` hold the same.

    Raises:
        ConfigError: an invalid config or search space, ``trials`` below 1, or a folder that
            holds a search of another config.
    """
    offline_and_quiet()  # a Python caller gets the command line's environment
    config = config if isinstance(config, TuneConfig) else load_tune_config(config)
    config = config if output_dir is None else config.in_folder(output_dir)
    if trials < 1:
        raise ConfigError(f"--trials {trials}: a search needs at least one trial.", "e.g. --trials 20")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported here, not as warnings
    study = _open_study(config, pruner, sampler)
    done = len(_finished(study))
    echo(f"search: {trials} trials of {config.metric} ({done} already finished) -> {config.output_dir}")
    started, todo, numbers = time.perf_counter(), max(0, trials - done), []

    def objective(trial: optuna.Trial) -> float:
        numbers.append(trial.number)
        params = {p.key: p.suggest(trial) for p in config.space}
        shown = " ".join(f"{k}={format_cell(v)}" for k, v in params.items())
        eta = eta_text(started, len(numbers) - 1, todo)
        echo(f"[{done + len(numbers)}/{trials}] trial-{trial.number:03d} {shown} {eta}".rstrip())
        return _train_trial(config, trial, params)

    try:
        study.optimize(objective, n_trials=todo, catch=(TrialFailed,),
                       callbacks=[lambda study, trial: echo(_outcome(_report(config, study), trial.number))])
    except KeyboardInterrupt:
        last = study.get_trials(deepcopy=False)[numbers[-1]] if numbers else None
        if last is not None and last.state == TrialState.FAIL and "message" not in last.user_attrs:
            _interrupted(study, last)  # Optuna failed it on the KeyboardInterrupt
        _report(config, study)
        raise
    return _report(config, study)


class TrialFailed(Exception):
    """A run refused its parameters (a DeltatuneError, a NaN loss, no memory): recorded, and the search goes on."""


def _open_study(config: TuneConfig, pruner: Any, sampler: Any) -> optuna.Study:
    folder = config.output_dir
    check_output_folder(folder, resume=False)
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / 'study.db').resolve()}")
    study = optuna.create_study(storage=storage, study_name=STUDY, direction=config.direction,
                                pruner=pruner or optuna.pruners.MedianPruner(), load_if_exists=True)
    known = study.user_attrs.get("fingerprint")
    if known not in (None, config.fingerprint()):
        raise ConfigError(f"'{folder}' holds a search of another config (the run config or the search "
                          "space changed).", "choose another --output-dir, or delete that folder to start over.")
    study.set_user_attr("fingerprint", config.fingerprint())
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _interrupted(study, stale)  # the process running it was killed
    seed = config.run_config({}).training.seed + len(study.trials)
    study.sampler = sampler or optuna.samplers.TPESampler(seed=seed)
    return study


def _train_trial(config: TuneConfig, trial: optuna.Trial, params: dict[str, Any]) -> float:
    """Train one run and return its metric; raises TrialFailed when the run refuses the parameters
    and optuna.TrialPruned when the pruner stops it."""
    metric, evaluations, started = config.metric, itertools.count(1), time.perf_counter()

    def report(step: int, metrics: dict[str, float]) -> None:
        # Evaluations, not steps, count the pruner's steps: trials with other batch sizes compare.
        index = next(evaluations)
        trial.report(metrics[metric], index)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {index} (step {step})")

    try:
        result = train(config.run_config(params, _trial_dir(config, trial.number)), on_evaluate=report)
    except DeltatuneError as error:
        raise _failed(trial, str(error)) from error
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        raise _failed(trial, f"out of memory: {str(error).splitlines()[0]}") from error
    finally:
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    if result.interrupted:
        raise KeyboardInterrupt
    value = result.metrics[metric]
    if not math.isfinite(value):
        raise _failed(trial, f"{metric} is {value}.")
    return value


def _failed(trial: optuna.Trial, message: str) -> TrialFailed:
    trial.set_user_attr("message", message)
    return TrialFailed(message)


def _interrupted(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fail a trial cut short, and queue its parameters for the next trial."""
    if trial.state == TrialState.RUNNING:
        study.tell(trial.number, state=TrialState.FAIL)
    study.set_user_attr("interrupted", sorted({*study.user_attrs.get("interrupted", []), trial.number}))
    study.enqueue_trial(trial.params)


def _finished(study: optuna.Study) -> list[FrozenTrial]:
    interrupted = set(study.user_attrs.get("interrupted", []))
    return [t for t in study.get_trials(deepcopy=False) if t.state in STATES and t.number not in interrupted]


def _report(config: TuneConfig, study: optuna.Study) -> TuneResult:
    """Read every finished trial back from the study and write tune.json, tune.md and best.yaml."""
    folder = config.output_dir
    interrupted = set(study.user_attrs.get("interrupted", []))
    records = [_record(t, t.number in interrupted, _trial_dir(config, t.number))
               for t in study.get_trials(deepcopy=False) if t.state in STATES]
    best = best_trial(records, config.direction)
    result = TuneResult(str(folder), config.metric, config.direction, records, best,
                        str(folder / "best.yaml") if best else None)
    best_config = config.run_config(best.params, folder / "best").to_dict() if best else None
    write_report(folder, result, {p.key: p.to_dict() for p in config.space}, best_config)
    return result


def _record(trial: FrozenTrial, interrupted: bool, folder: Path) -> TrialRecord:
    return TrialRecord(number=trial.number, params=dict(trial.params), value=trial.value, state=STATES[trial.state],
                       seconds=trial.user_attrs.get("seconds"),
                       intermediate=[trial.intermediate_values[k] for k in sorted(trial.intermediate_values)],
                       message=INTERRUPTED if interrupted else trial.user_attrs.get("message"), run_dir=str(folder))


def _trial_dir(config: TuneConfig, number: int) -> Path:
    return config.output_dir / f"trial-{number:03d}"


def _outcome(result: TuneResult, number: int) -> str:
    trial = next(t for t in result.trials if t.number == number)
    seconds = f" in {trial.seconds:.0f} s" if trial.seconds is not None else ""
    if trial.state == "failed":
        return f"  failed{seconds}: {(trial.message or 'no message').splitlines()[0]}"
    best = f"; best {result.best.value:.4f} (trial-{result.best.number:03d})" if result.best else ""
    where = f" at evaluation {len(trial.intermediate)}" if trial.state == "pruned" else ""
    return f"  {trial.state}{where}: {result.metric} {format_cell(trial.value)}{seconds}{best}"
