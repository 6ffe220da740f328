"""A search's configuration: a normal run config plus a ``search:`` section keyed by config paths.

```yaml
search:
  training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
  method.r: {choices: [4, 8, 16]}
  training.epochs: {low: 1, high: 3}      # integers when both bounds are integers
```
Every path, range and choice is checked before any trial runs: each bound and each choice is
put into the run config and validated there, so a value the run config would refuse is refused
here, naming the search key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.fields import check_fields, help_field
from ..tasks.base import lower_is_better
from ..train.config import (
    RunConfig,
    apply_override,
    best_model_metric,
    check_keys,
    config_hash,
    did_you_mean,
    read_yaml,
    set_path,
)

SPEC_KEYS = ["low", "high", "log", "step", "choices"]
SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]  # model, task, data, method, training
EXAMPLE = "e.g. {low: 1.0e-4, high: 1.0e-2, log: true} or {choices: [4, 8, 16]}"
#: where a search without training.output_dir goes (train's default is runs/default).
DEFAULT_OUTPUT_DIR = "runs/tune"


@dataclass(frozen=True)
class Param:
    """One searched value: a range (integers when both bounds are) or a list of choices."""

    key: str  # config path, e.g. training.learning_rate
    low: int | float | None = help_field(None, "The range's lower bound.", range="(-inf, inf)", typical=1e-4)
    high: int | float | None = help_field(None, "The range's upper bound.", range="(-inf, inf)", typical=1e-2)
    log: bool = False  # sample uniformly in log space (learning rates)
    step: int | float | None = help_field(None, "Only multiples of step above low.", range="(0, inf)", typical=1)
    choices: tuple | None = None

    def __post_init__(self) -> None:
        check_fields(self, f"search.{self.key}")

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)

    def suggest(self, trial: Any) -> Any:
        """The value for this trial, from an ``optuna.Trial``."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values that must all be valid in the run config for the whole range to be."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        spec = {"low": self.low, "high": self.high}
        return {**spec, **({"log": True} if self.log else {}), **({"step": self.step} if self.step else {})}


@dataclass
class TuneConfig:
    base: dict[str, Any]  # the run config's sections, as in a run YAML, without search
    space: list[Param]

    @property
    def output_dir(self) -> Path:
        return Path(self.base["training"]["output_dir"])

    @property
    def metric(self) -> str:
        """The validation metric to optimise: the best-checkpoint metric, by default the task's."""
        return f"eval_{best_model_metric(self.run_config({}))}"

    @property
    def direction(self) -> str:
        return "minimize" if lower_is_better(self.metric) else "maximize"

    def run_config(self, params: dict[str, Any], folder: Path | None = None) -> RunConfig:
        """The base config with ``params`` ({config path: value}) applied, writing to ``folder``."""
        data = copy.deepcopy(self.base)
        for key, value in params.items():
            set_path(data, key, value, f"search.{key}")
        if folder is not None:
            data["training"]["output_dir"] = str(folder)
        return RunConfig.from_dict(data)

    def in_folder(self, folder: str | Path) -> "TuneConfig":
        """The same search, written to ``folder``."""
        return TuneConfig({**self.base, "training": {**self.base["training"], "output_dir": str(folder)}}, self.space)

    def fingerprint(self) -> str:
        """What must match to continue a search: the run config (not where it goes) and the space."""
        space = {p.key: p.to_dict() for p in self.space}
        text = json.dumps([config_hash(self.run_config({})), space], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> TuneConfig:
    """Read a run YAML with a ``search:`` section and check both.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` items, as ``--set`` gives them (``search.method.r={choices: [4, 8]}``
            reaches the search space too).

    Raises:
        ConfigError: the run config or the search space is invalid.
    """
    data = read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    check_keys(data, [*SECTIONS, "search"], "")
    search = data.pop("search", None)
    if not isinstance(search, dict) or not search:
        raise ConfigError(f"'{path}' has no search space to tune.",
                          "add a search: section of config paths, e.g. search: {training.learning_rate: "
                          "{low: 1.0e-4, high: 1.0e-2, log: true}}.")
    base = RunConfig.from_dict(copy.deepcopy(data))  # the run config is valid on its own
    data["training"] = {"output_dir": DEFAULT_OUTPUT_DIR, **(data.get("training") or {})}
    # dict(): a key given twice (in the file, then by --set) takes the later value.
    config = TuneConfig(data, [_param(key, spec) for key, spec in dict(_flatten(search)).items()])
    for param in config.space:
        _check_path(param.key, base)
        _check_values(config, param)
    return config


def _flatten(search: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{training: {epochs: {low: 1, high: 3}}}`` (what ``--set search.training.epochs=...`` makes)
    as ``training.epochs``; a mapping with none of low/high/log/step/choices is a level of the path."""
    items = []
    for key, spec in search.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not set(spec) & set(SPEC_KEYS):
            items += _flatten(spec, f"{path}.")
        else:
            items.append((path, spec))
    return items


def _param(key: str, spec: Any) -> Param:
    where = f"search.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} = {spec!r} is neither a range nor a list of choices.", EXAMPLE)
    check_keys(spec, SPEC_KEYS, where)
    if "choices" in spec:
        return _choices(where, key, spec)
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where} has no {' and no '.join(missing)}.", f"a range needs both bounds, {EXAMPLE}.")
    low, high = _bound(spec["low"], f"{where}.low"), _bound(spec["high"], f"{where}.high")
    step = None if spec.get("step") is None else _bound(spec["step"], f"{where}.step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log = {log!r} is not true or false.", "write log: true for a log-scale range.")
    param = Param(key, low=low, high=high, log=log, step=step)  # finite bounds, a positive step
    if low >= high:
        raise ConfigError(f"{where}: low = {low} is not below high = {high}.",
                          "give low < high; to fix a value, set it in the run config instead.")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}.", "raise low, or drop log: true.")
    if step is not None and log:
        raise ConfigError(f"{where}.step = {step} is invalid with log: true.", "use step on a linear range.")
    return param


def _choices(where: str, key: str, spec: dict[str, Any]) -> Param:
    if len(spec) > 1:
        raise ConfigError(f"{where} mixes choices with {', '.join(k for k in spec if k != 'choices')}.",
                          "give either choices or a range (low, high, log, step).")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices = {choices!r} is not a non-empty list.", "e.g. choices: [4, 8, 16]")
    for choice in choices:
        if choice is not None and not isinstance(choice, (str, int, float, bool)):
            raise ConfigError(f"{where}.choices holds {choice!r}; choices are numbers, strings, booleans "
                              "or null.", "search over a list-valued key by choosing between single values.")
    if len({json.dumps(c) for c in choices}) < len(choices):
        raise ConfigError(f"{where}.choices = {choices} lists a value twice.", "list each value once.")
    return Param(key, choices=tuple(choices))


def _bound(value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} = {value!r} is not a number.", EXAMPLE)
    return value


def _check_path(key: str, base: RunConfig) -> None:
    """``key`` names a field of the run config (or a key inside a mapping field such as
    ``model.config_overrides.hidden_dropout_prob``)."""
    paths = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(base, s))]
    head = ".".join(key.split(".")[:2])
    if key == "training.output_dir":
        raise ConfigError("search.training.output_dir cannot be searched: each trial has its own folder.",
                          "delete it from search; set the search's folder with --output-dir.")
    if key == "method.method":
        raise ConfigError("search.method.method cannot be searched: each method has its own keys.",
                          "compare methods with `deltatune compare`, then tune the best one.")
    if head not in paths:
        raise ConfigError(f"search: unknown config path '{key}'.", did_you_mean(key, paths) + _allowed(head, paths))
    section, name = head.split(".")
    if key != head and not isinstance(getattr(getattr(base, section), name), dict):
        raise ConfigError(f"search: '{head}' in '{key}' is not a mapping.", f"search '{head}' itself.")


def _allowed(head: str, paths: list[str]) -> str:
    section = head.split(".")[0]
    if section not in SECTIONS:
        return f"search keys are config paths, section.key, with the sections {', '.join(SECTIONS)}."
    keys = [p.split(".", 1)[1] for p in paths if p.startswith(section + ".")]
    return f"allowed keys in {section}: {', '.join(keys)}."


def _check_values(config: TuneConfig, param: Param) -> None:
    """Every choice, and both ends of a range, make a valid run config."""
    for value in param.extremes():
        try:
            config.run_config({param.key: value})
        except ConfigError as error:
            wrong_float = isinstance(value, float) and "wrong type" in error.message
            integers = " (write integer bounds, e.g. 4 not 4.0, for an integer key)" if wrong_float else ""
            raise ConfigError(f"search.{param.key}: the value {value!r} is refused: {error.message}",
                              (error.hint or "") + integers) from error
