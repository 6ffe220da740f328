"""A comparison's configuration: one shared run config plus the grid to sweep.

```yaml
model: {name_or_path: minilm-l6}
data: {source: rotten-tomatoes, max_train_samples: 2000}
training: {epochs: 1, batch_size: 32}
methods: [full, lora, {method: lora, loraplus_lr_ratio: 16},   # LoRA+: the row "lora+16"
          {method: adapter, bottleneck: 32, learning_rate: 2.0e-3}]
seeds: [42]
train_sizes: [64, 256, 1024]   # optional: the low-data regime
models: [minilm-l6, /path/to/another]   # optional: scale
output_dir: runs/compare
```
Each method's learning rate is searched on validation data over the grid its own file declares
(``Method.tuning.learning_rates``), by successive halving; an entry's ``learning_rate`` pins it. An
entry's ``loraplus_lr_ratio`` trains it with LoRA+ (``training.loraplus_lr_ratio``); its row is
named ``lora+16``, apart from plain ``lora`` (:func:`entry_name`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.fields import SEEDS, check_fields, check_value, help_field
from ..core.method import config_from_dict, method_class
from ..core.yaml12 import read_yaml
from ..hf.quantization import QuantizationConfig
from ..train.config import RunConfig, TrainingConfig, apply_override, check_keys, check_loraplus, read_section

# `deltatune compare` with no config (and `make run`; examples/compare.yaml says the same): every
# method on 1,600 Rotten Tomatoes snippets, 100 steps of 16, its learning rate searched on 128
# validation snippets, tested on 400; about 6 minutes on 2 CPU cores.
DEFAULT = {
    "model": {"name_or_path": "minilm-l6", "max_length": 64},
    "data": {"source": "rotten-tomatoes", "max_train_samples": 1600, "max_eval_samples": 128,
             "max_test_samples": 400},
    "training": {"epochs": 1, "batch_size": 16, "warmup_steps": 10},
    "forgetting_texts": 64,
}

LEARNING_RATE = next(f for f in dataclasses.fields(TrainingConfig) if f.name == "learning_rate")
LORAPLUS = next(f for f in dataclasses.fields(TrainingConfig) if f.name == "loraplus_lr_ratio")
#: keys of a methods entry that set the run's training section, not the method's config
TRAINING_KEYS = ("learning_rate", "loraplus_lr_ratio")
#: keys of a methods entry that set the run's model section: ``quantization`` makes a QLoRA row
MODEL_KEYS = ("quantization",)
ENTRY_KEYS = TRAINING_KEYS + MODEL_KEYS
GRID_KEYS = ["methods", "seeds", "train_sizes", "models", "output_dir", "latency_batches", "forgetting_texts",
             "search", "evaluations", "widen"]


@dataclass
class CompareConfig:
    base: dict[str, Any]  # model / task / data / training sections, as in a run config
    methods: list[dict[str, Any]]  # {"method": name, ...overrides, "learning_rate"?: float}
    seeds: list[int] = help_field([42], "One run of each method per seed.", range=SEEDS)
    train_sizes: list[int | None] = help_field([None], "Training rows per run (null: all); several: the "
                                               "low-data regime.", range="[1, inf)", typical=[64, 256])
    models: list[str | None] = field(default_factory=lambda: [None])
    output_dir: str = "runs/compare"
    latency_batches: int = help_field(1, "Test batches timed for the latency ratios.", range="[1, inf)")
    forgetting_texts: int = help_field(128, "General texts whose embeddings measure forgetting.", range="[1, inf)")
    #: search each method's learning rate (its file's grid) on the first seed; false: its default.
    search: bool = True
    widen: int = help_field(1, "Learning rates tried beyond a grid's edge when its smallest or largest wins, "
                                "each one grid step further out and a whole run; 0: never.", range="[0, 10]")
    evaluations: int = help_field(6, "Validation passes per run, evenly spaced: the learning curve and "
                                     "the halving rungs.", range="[2, 100]")

    def __post_init__(self) -> None:
        check_fields(self, "")

    def learning_rates(self, method: dict[str, Any]) -> list[float]:
        """The candidates for one entry: its pinned value, else its method's grid (or default)."""
        if "learning_rate" in method:
            return [float(method["learning_rate"])]
        tuning = method_class(method["method"]).tuning
        if not self.search or not tuning.learning_rates:
            return [tuning.default_learning_rate]
        return list(tuning.learning_rates)

    def run_config(self, method: dict[str, Any], seed: int, size: int | None, model: str | None,
                   folder: Path, learning_rate: float) -> RunConfig:
        """The run config of one cell of the grid at one learning rate."""
        data = copy.deepcopy(self.base)
        data["method"] = {k: v for k, v in method.items() if k not in ENTRY_KEYS}
        data.setdefault("training", {}).update(seed=seed, learning_rate=learning_rate, output_dir=str(folder),
                                               progress=False, eval_steps=1 / self.evaluations)
        if "loraplus_lr_ratio" in method:
            data["training"]["loraplus_lr_ratio"] = method["loraplus_lr_ratio"]
        if "quantization" in method:
            data.setdefault("model", {})["quantization"] = method["quantization"]
        if size is not None:
            data.setdefault("data", {})["max_train_samples"] = size
        if model is not None:
            data.setdefault("model", {})["name_or_path"] = model
        return RunConfig.from_dict(data)


def load_compare_config(path: str | Path | None, overrides: list[str] = ()) -> CompareConfig:
    """Read a comparison YAML (or the defaults: every registered method on the bundled task)."""
    data: dict[str, Any] = copy.deepcopy(DEFAULT) if path is None else {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    check_keys(data, ["model", "task", "data", "training", *GRID_KEYS], "")
    base = {k: data[k] for k in ("model", "task", "data", "training") if k in data}
    methods = [_method_entry(m) for m in data.get("methods") or default_methods()]
    config = CompareConfig(base=base, methods=methods, **{k: data[k] for k in GRID_KEYS[1:] if k in data})
    _validate(config)
    return config


#: the default comparison's methods (``make run``): full fine-tuning first (the baseline), then the
#: PEFT methods it can take within its time; examples/compare-all.yaml runs every method.
DEFAULT_METHODS = ("full", "adapter", "bitfit", "ia3", "layer", "lora", "prefix", "prompt", "vera")


def default_methods() -> list[str]:
    return list(DEFAULT_METHODS)


def _method_entry(entry: Any) -> dict[str, Any]:
    entry = {"method": entry} if isinstance(entry, str) else dict(entry)
    where = f"methods[{entry.get('method')}]"
    checked = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    config_from_dict(checked, where=where)  # fail now, not mid-way
    if "learning_rate" in entry:  # a pinned rate has training.learning_rate's type and range
        check_value(LEARNING_RATE, float, entry["learning_rate"], f"{where}.learning_rate")
    if "loraplus_lr_ratio" in entry:  # training.loraplus_lr_ratio's type and range, for this entry alone
        check_value(LORAPLUS, float | None, entry["loraplus_lr_ratio"], f"{where}.loraplus_lr_ratio")
        check_loraplus(entry["method"], entry["loraplus_lr_ratio"], f"{where}.loraplus_lr_ratio")
    if "quantization" in entry:  # model.quantization's keys and values, for this entry alone
        read_section(QuantizationConfig, entry["quantization"], f"{where}.quantization")
    return entry


def entry_name(entry: dict[str, Any]) -> str:
    """A methods entry's name in cells, folders and the report: its method's name for its config
    (``MethodConfig.variant``: ``dora`` for ``{method: lora, use_dora: true}``), ``+RATIO`` with LoRA+,
    ``q`` before it on a 4-bit base (``qlora``) and ``-int8`` after it on an 8-bit one."""
    ratio = entry.get("loraplus_lr_ratio")
    name = config_from_dict({k: v for k, v in entry.items() if k not in ENTRY_KEYS}).variant
    name = name if ratio is None else f"{name}+{ratio:g}"
    quantization = entry.get("quantization")
    if not quantization:
        return name
    return f"q{name}" if quantization.get("load_in_4bit") else f"{name}-int8"


def _validate(config: CompareConfig) -> None:
    for seed_list, name in ((config.seeds, "seeds"), (config.train_sizes, "train_sizes"), (config.models, "models")):
        if not isinstance(seed_list, list) or not seed_list:
            raise ConfigError(f"'{name}' must be a non-empty list.", f"e.g. {name}: [{'42' if name == 'seeds' else '...'}]")
    names = [entry_name(m) for m in config.methods]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ConfigError(f"'{twice}' appears twice in 'methods'.",
                          "list each method once (variants differ by an option: use_dora, init, use_rslora, ...).")
    RunConfig.from_dict(copy.deepcopy(config.base))  # the shared sections are valid on their own
    for entry in config.methods:  # and with each entry (training.loraplus_lr_ratio needs B matrices)
        config.run_config(entry, config.seeds[0], None, None, Path(config.output_dir),
                          config.learning_rates(entry)[0])
