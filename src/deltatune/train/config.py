"""One run's configuration: model, task, data, method and training, one-to-one with YAML.

Unknown keys and wrong types are refused naming the key's path (``training.lerning_rate``)
and the allowed keys or type. ``--set training.epochs=3`` overrides any value.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..core.errors import ConfigError
from ..core.fields import SEEDS, check_fields, help_field
from ..core.method import MethodConfig, config_from_dict, method_class, registered
from ..core.yaml12 import loads, read_yaml
from ..data.config import DataConfig
from ..tasks.base import ModelConfig, TaskConfig, task_class


@dataclass
class TrainingConfig:
    output_dir: str = help_field("runs/default", "Run folder: metrics, report, adapter, checkpoints.")
    epochs: float = help_field(2, "Passes over the training data.", range="(0, inf)")
    max_steps: int | None = help_field(None, "Stop after this many optimizer steps (overrides epochs); "
                                       "0 or null: train for epochs.", range="[0, inf)", typical=1000)
    batch_size: int = help_field(32, "Examples per step per process (before accumulation).", range="[1, inf)")
    eval_batch_size: int = help_field(64, "Examples per evaluation batch.", range="[1, inf)")
    learning_rate: float = help_field(1e-3, "Peak AdamW learning rate (1e-3 suits LoRA; use ~5e-5 "
                                      "for full fine-tuning).", range="[0, inf)")
    weight_decay: float = help_field(0.0, "AdamW weight decay (not applied to biases and norms).",
                                     range="[0, inf)", typical=0.01)
    loraplus_lr_ratio: float | None = help_field(
        None, "LoRA+ (Hayou et al., 2024): train the B matrices, biases and norms at this many times "
              "learning_rate, A at learning_rate; null: one rate for all. Needs a method with B matrices "
              "(lora).", range="[1, inf)", typical=16)
    loraplus_lr_embedding: float = help_field(1e-6, "With loraplus_lr_ratio: the learning rate of LoRA's "
                                              "matrices on embedding layers (peft's default).", range="[0, inf)")
    lr_scheduler: Literal["linear", "cosine", "constant"] = help_field("linear", "Decay after warm-up.")
    warmup_steps: int = help_field(30, "Steps of linear warm-up from 0 to learning_rate.", range="[0, inf)")
    gradient_accumulation_steps: int = help_field(1, "Batches per optimizer step.", range="[1, inf)")
    max_grad_norm: float | None = help_field(1.0, "Clip gradients to this norm; null to disable.", range="(0, inf)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = help_field(
        "auto", "What the run computes in. auto: bf16 where the device has bf16 arithmetic units (AVX-512 BF16 "
                "or AMX CPUs, recent GPUs), else fp32. Under bf16 the frozen weights are held in bf16 and "
                "everything trained keeps fp32 weights; fp16 needs a GPU. mixed_precision (no, bf16, fp16) "
                "is read as this key.")
    seed: int = help_field(42, "Seed for initialisation, dropout and batch order.", range=SEEDS)
    eval_steps: int | float | None = help_field(None, "Evaluate every N steps; below 1, a fraction of the "
                                                "run's steps (0.125: eight evaluations); 0 or null: every epoch.",
                                                range="[0, inf)", typical=0.125)
    logging_steps: int = help_field(10, "Log the training loss every N steps.", range="[1, inf)")
    save_steps: int | None = help_field(None, "Write a resumable checkpoint every N steps (and at each evaluation); "
                                        "0 or null: only at evaluations.", range="[0, inf)", typical=200)
    early_stopping_patience: int | None = help_field(None, "Stop after N evaluations without improvement.",
                                                     range="[1, inf)", typical=3)
    metric_for_best_model: str | None = help_field(None, "Validation metric that picks the best checkpoint; "
                                                   "default: the task's (accuracy, f1, exact_match, perplexity).")
    group_by_length: bool = help_field(True, "Batch examples of similar length to spend less time on padding.")
    cache_frozen: bool = help_field(
        False, "Keep each training example's input to the lowest trained block after its first visit and "
               "skip the frozen blocks below on later ones (layer tuning, or adapters in upper blocks only); "
               "dropout below that block is off. Memory: the model's width per training token.")
    fast_dropout: bool = help_field(
        True, "On CPUs, dropout masks from 16-bit random numbers (a quarter of torch's draws; p rounded to a "
              "multiple of 2^-16), and attention with dropout computed outside sdpa's slow path: torch's "
              "dropout in distribution, other masks. false: torch's own.")
    distributed: Literal["ddp", "fsdp"] = help_field(
        "ddp", "How several processes (torchrun, accelerate launch) share the model. ddp: each holds all of it "
               "and they average gradients; fsdp: each holds 1/N of every weight (torch's FSDP2), gathering a "
               "block's weights while it computes. One process: ddp.")
    progress: bool = help_field(True, "Show a progress bar.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=lambda: config_from_dict({"method": "lora"}))
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        check_loraplus(self.method.method, self.training.loraplus_lr_ratio, "training.loraplus_lr_ratio")
        _check_metric(self.training.metric_for_best_model, self.task.type)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["method"] = self.method.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "")
        data = {**data, "training": _precision_alias(data.get("training") or {})}
        sections = {name: read_section(kind, data.get(name) or {}, name)
                    for name, kind in (("model", ModelConfig), ("task", _task_kind(data.get("task"))),
                                       ("data", DataConfig), ("training", TrainingConfig))}
        method = data.get("method") or {}
        if isinstance(method, dict):
            method = {"method": "lora", **method}  # LoRA unless the section names another method
        method = config_from_dict(method, "method")
        return cls(method=method, **sections)


#: accelerate's names for training.precision; false (no mixed precision) reads as its "no"
_MIXED_PRECISION = {"no": "fp32", False: "fp32", "bf16": "bf16", "fp16": "fp16"}


def _precision_alias(training: Any) -> Any:
    """``training.mixed_precision`` (accelerate's name) read as ``training.precision``."""
    if not isinstance(training, dict) or "mixed_precision" not in training:
        return training
    training = dict(training)
    value = training.pop("mixed_precision")
    if "precision" in training:
        raise ConfigError("training.mixed_precision and training.precision are both set; they are one setting.",
                          "keep training.precision (auto, fp32, bf16 or fp16) only.")
    if value not in _MIXED_PRECISION:
        raise ConfigError(f"training.mixed_precision = {value!r} is not one of no, bf16, fp16.",
                          "set training.precision: auto, fp32, bf16 or fp16.")
    training["precision"] = _MIXED_PRECISION[value]
    return training


def best_model_metric(config: RunConfig) -> str:
    """The validation metric that picks the best checkpoint: ``training.metric_for_best_model``,
    else the task's own (accuracy, f1, exact_match, perplexity, rouge1)."""
    return config.training.metric_for_best_model or task_class(config.task.type).primary_metric


def _check_metric(metric: str | None, task_type: str) -> None:
    """``training.metric_for_best_model`` names a metric the task reports (known before training)."""
    names = task_class(task_type).metric_names
    if metric is not None and metric not in names:
        raise ConfigError(f"training.metric_for_best_model = '{metric}' is not a metric of task '{task_type}'.",
                          f"{did_you_mean(metric, list(names))}choose one of: {', '.join(names)}.")


def check_loraplus(method: str, ratio: float | None, key: str) -> None:
    """LoRA+ trains B matrices faster: refuse a ``loraplus_lr_ratio`` (named ``key``) for a
    method without them, before any model is built.

    Raises:
        ConfigError: ``method``'s update is no product B A (``Tuning.factored``).
    """
    if ratio is None or method_class(method).tuning.factored:
        return
    factored = ", ".join(n for n, cls in sorted(registered().items()) if cls.tuning.factored)
    raise ConfigError(f"{key} = {ratio!r} trains B matrices faster, but method '{method}' has none.",
                      f"use a method whose update is a product B A ({factored}), or leave {key} unset (null).")


def config_hash(config: RunConfig) -> str:
    """What must match for --resume: everything but where the run goes and how it shows progress."""
    data = config.to_dict()
    data["training"] = {k: v for k, v in data["training"].items() if k not in ("output_dir", "progress")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _task_kind(data: Any) -> type[TaskConfig]:
    """The task's own options class, chosen by ``task.type``."""
    if not isinstance(data, dict) or "type" not in data:
        return TaskConfig
    return task_class(str(data["type"])).config_class


def check_keys(data: Any, known: list[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'the config'}' must be a mapping of keys to values, got {data!r}.")
    for key in data:
        if key not in known:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key '{path}'.", f"{did_you_mean(key, known)}allowed keys"
                                                        f"{' in ' + where if where else ''}: {', '.join(known)}.")


def did_you_mean(key: Any, known: list[str]) -> str:
    """``"did you mean 'learning_rate'? "`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def read_section(kind: type, data: dict[str, Any], where: str) -> Any:
    check_keys(data, [f.name for f in dataclasses.fields(kind)], where)
    data = {key: _subsection(kind, key, value, where) for key, value in data.items()}
    section = kind(**data)
    check_fields(section, where)  # types, then ranges: before anything is written
    return section


def _subsection(kind: type, key: str, value: Any, where: str) -> Any:
    """A mapping given for a field whose type is a section of its own (``model.quantization``), read
    as that section; any other value as it is."""
    if not isinstance(value, dict):
        return value
    hint = typing.get_type_hints(kind)[key]
    sections = [t for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)]
    return read_section(sections[0], value, f"{where}.{key}") if sections else value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or the defaults) and apply ``key.path=value`` overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is invalid.
    """
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    if isinstance(data, dict) and "search" in data:
        raise ConfigError(f"'{path}' has a search: section, which only `deltatune tune` reads.",
                          f"search with `deltatune tune {path} --trials N`, then train the best it found "
                          "with `deltatune train OUTPUT_DIR/best.yaml`.")
    return RunConfig.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set key.path=value``. ``--set method=NAME`` replaces the method section with
    NAME's defaults but keeps ``modules_to_save``: what trains in full (a head, new cross-attention)
    belongs to the task, not to the method."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set '{item}' is not of the form key.path=value.", "e.g. --set training.epochs=2")
    key, value = key.strip(), _override_value(raw, item)
    section = data.get("method") if isinstance(data, dict) and isinstance(data.get("method"), dict) else {}
    if key == "method" and isinstance(value, str):
        value = {"method": value, **{k: v for k, v in section.items() if k == "modules_to_save"}}
    elif key == "method.method":
        _check_method_switch(section, value, item)
    set_path(data, key, value, f"--set '{item}'")


def _override_value(raw: str, item: str) -> Any:
    """The value of ``--set key=raw``, read as a YAML 1.2 scalar or flow collection, as in a file."""
    try:
        return loads(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set '{item}': the value is not YAML ({error.problem or error}).",
                          "quote a value with special characters: --set 'key=\"a: b\"'.") from error


def _check_method_switch(section: dict[str, Any], name: Any, item: str) -> None:
    """``--set method.method=NAME`` keeps the section's other keys: name those NAME does not take."""
    known = {f.name for f in dataclasses.fields(method_class(str(name)).config_class)}
    stale = sorted(set(section) - known - {"method"})
    if stale:
        raise ConfigError(f"--set '{item}': the method section still holds {', '.join(stale)}, which {name} "
                          f"does not take.", f"--set method={name} starts from {name}'s defaults "
                                             "(modules_to_save is kept).")


def set_path(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``data["training"]["epochs"] = value`` for the key ``training.epochs``, making sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{part}' is not a section.")
    node[leaf] = value
