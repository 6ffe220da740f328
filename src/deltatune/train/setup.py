"""Everything a run needs, built once from its config: data, model, adapter, optimizer."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

from .. import assets
from ..core.errors import ConfigError
from ..core.method import TrainingHooks
from ..core.quantized import keep_training_layout
from ..core.state import require_state
from ..core.verbs import active_adapters, apply
from ..data.loading import load_splits
from ..hf.dropout import set_base_dropout
from ..io.run_folder import Resolved
from ..tasks import Task, task_for
from .batches import ResumableBatchSampler
from .config import RunConfig, TrainingConfig, best_model_metric
from .fast_dropout import use_fast_dropout
from .frozen_cache import FrozenPrefix, Indexed, indexed_collate, plan
from .optim import loraplus_param_groups, param_groups
from .precision import ACCELERATE, autocast_forward, hold_frozen, resolve
from .sharding import check_shardable, shard


@dataclass
class Run:
    config: RunConfig
    #: what the run decided that its config left open (precision, metric, labels)
    resolved: Resolved
    folder: Path
    accelerator: Accelerator
    task: Task
    tokenizer: Any
    model: torch.nn.Module
    data: DatasetDict
    sampler: ResumableBatchSampler
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    eval_steps: int | None  # training.eval_steps in steps
    data_seconds: float  # reading and tokenising (0 when this process had tokenised the data already)
    #: training.cache_frozen: the kept inputs of the lowest trained block
    frozen: FrozenPrefix | None = None
    #: the training hooks of the adapter that trains (Method.training_hooks), by adapter name
    hooks: dict[str, TrainingHooks] = field(default_factory=dict)
    #: called with (step, eval metrics) after each validation pass; see ``train(on_evaluate=...)``.
    on_evaluate: Callable[[int, dict[str, float]], None] | None = None
    #: training.distributed: fsdp: the blocks sharded as their own units (the root is one more)
    sharded_blocks: list[str] | None = None


def resolve_model_path(name_or_path: str) -> str:
    """A bundled model name or a local directory; never the hub."""
    if name_or_path in assets.MODELS:
        return str(assets.model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model '{name_or_path}' is neither a bundled model ({', '.join(assets.MODELS)}) "
                          "nor a local directory; deltatune never downloads from the hub.",
                          "download the model elsewhere and set model.name_or_path to its local folder.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")):
        raise ConfigError(f"model directory '{path}' has no *.safetensors weights.",
                          "point model.name_or_path at a folder written by save_pretrained (safetensors).")
    return str(path)


def build_model(config: RunConfig, task: Task, path: str) -> torch.nn.Module:
    """The pre-trained model with the task head, adapted by the configured method."""
    model = task.load_model(path)
    if config.model.dropout is not None:
        set_base_dropout(model, config.model.dropout)
    method = config.method
    heads = [h for h in task.head_modules(model) if h not in method.modules_to_save]
    method = dataclasses.replace(method, modules_to_save=method.modules_to_save + heads)  # a copy: the config stays
    return apply(model, method)


def setup(config: RunConfig, accelerator: Accelerator | None = None) -> Run:
    training = config.training
    precision = resolve(training.precision)
    # cpu=True where there is no GPU: accelerate then runs torchrun's processes as DDP over gloo.
    accelerator = accelerator or Accelerator(mixed_precision=ACCELERATE[precision],
                                             cpu=not torch.cuda.is_available())
    check_shardable(config, accelerator.num_processes)
    set_seed(training.seed)
    path = resolve_model_path(config.model.name_or_path)
    task = task_for(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    started = time.perf_counter()
    data = tokenised(config, task, tokenizer, path)
    data_seconds = time.perf_counter() - started
    # What the data, task and hardware decided, apart from the config (run.yaml records both)
    resolved = Resolved(precision, best_model_metric(config), list(task.labels) or None)
    set_seed(training.seed)  # the head's initialisation does not depend on data loading
    model = build_model(config, task, path)
    keep_training_layout(model)
    hooks = training_hooks(model)
    hold_frozen(model, precision)
    if precision == "bf16":  # fp16: accelerate's autocast, with its loss scaling
        autocast_forward(model, precision, accelerator.device)
    if training.fast_dropout:
        use_fast_dropout(model, accelerator.device)
    _check_max_length(config, model)
    collate = task.collator(tokenizer)
    sampler = ResumableBatchSampler(data["train"]["length"], training.batch_size, training.seed,
                                    training.group_by_length)
    # Its own generator: starting an iterator must not draw from the global RNG that dropout
    # uses, or a resumed run would see different dropout masks.
    frozen = _frozen_prefix(model, data["train"], collate, accelerator) if training.cache_frozen else None
    train_set, train_collate = (Indexed(data["train"]), indexed_collate(collate)) if frozen else (data["train"], collate)
    train_loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=train_collate,
                              generator=torch.Generator().manual_seed(training.seed))
    # Their own generators too: otherwise each evaluation draws from the global RNG, and how
    # often a run evaluates (or where it paused) would change its dropout masks.
    eval_loaders = {name: DataLoader(data[name], batch_size=training.eval_batch_size, collate_fn=collate,
                                     generator=torch.Generator().manual_seed(training.seed))
                    for name in ("validation", "test")}
    # fused: one pass per tensor instead of a dozen; a full fine-tuning step of the bundled model
    # spends 15 ms in it instead of 150 (docs/performance.md), results equal to rounding
    # Sharded before the optimizer is built: it must hold the shards, not the whole parameters.
    sharded_blocks = shard(model, accelerator.device) if training.distributed == "fsdp" else None
    optimizer = torch.optim.AdamW(_optimizer_groups(model, training), lr=training.learning_rate, fused=True)
    model, optimizer, train_loader, *loaders = _prepare(accelerator, model, optimizer, train_loader,
                                                       list(eval_loaders.values()), sharded=sharded_blocks is not None)
    # After prepare: with several processes each one sees its share of the batches.
    steps_per_epoch = math.ceil(len(train_loader) / training.gradient_accumulation_steps)
    total = training.max_steps or math.ceil(training.epochs * steps_per_epoch)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=total)
    for adapter_hooks in hooks.values():
        adapter_hooks.start(total)
    eval_steps = _eval_steps(training, total)
    return Run(config=config, resolved=resolved, folder=Path(training.output_dir), accelerator=accelerator, task=task,
               tokenizer=tokenizer, model=model, data=data, sampler=sampler, train_loader=train_loader,
               eval_loaders=dict(zip(eval_loaders, loaders)), optimizer=optimizer, scheduler=scheduler,
               steps_per_epoch=steps_per_epoch, total_steps=total, eval_steps=eval_steps,
               data_seconds=data_seconds, frozen=frozen, hooks=hooks, sharded_blocks=sharded_blocks)


def _eval_steps(training: TrainingConfig, total: int) -> int | None:
    """training.eval_steps in steps: below 1 it is a fraction of the run, as in transformers."""
    if training.eval_steps and training.eval_steps < 1:
        return max(1, math.ceil(training.eval_steps * total))
    return training.eval_steps


def _prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, train_loader: DataLoader,
             eval_loaders: list[DataLoader], sharded: bool) -> list[Any]:
    """accelerate's prepare; a sharded model is left out of it (accelerate would wrap it in DDP too)."""
    if not sharded:
        return accelerator.prepare(model, optimizer, train_loader, *eval_loaders)
    return [model, *accelerator.prepare(optimizer, train_loader, *eval_loaders)]


def training_hooks(model: torch.nn.Module) -> dict[str, TrainingHooks]:
    """Each active adapter's training hooks, where its method has any."""
    methods = require_state(model).methods
    hooks = {name: methods[name].training_hooks(model, name) for name in active_adapters(model)}
    return {name: h for name, h in hooks.items() if h is not None}


def _frozen_prefix(model: torch.nn.Module, rows: Any, collate: Any, accelerator: Accelerator) -> FrozenPrefix:
    if accelerator.num_processes > 1:
        raise ConfigError("training.cache_frozen runs in one process; this run has "
                          f"{accelerator.num_processes}.", "set training.cache_frozen: false, or launch one process.")
    probe = collate([rows[i] for i in range(min(2, len(rows)))])
    return plan(model.to(accelerator.device), {k: v.to(accelerator.device) for k, v in probe.items()})


#: the data sets tokenised in this process (the newest last), with what their task derived (labels...)
_TOKENISED: dict[str, tuple[DatasetDict, dict[str, Any]]] = {}


def tokenised(config: RunConfig, task: Task, tokenizer: Any, path: str) -> DatasetDict:
    """The task's tokenised splits, made once per process for the same model, task and data.

    ``deltatune compare`` trains many runs on identical data in one process; reading and
    tokenising again for each would cost more than some of the runs' training. Validation and
    test come sorted by length: evaluation then pads each batch to similar lengths (every task's
    metrics are independent of the order).
    """
    key = json.dumps([path, config.model.max_length, dataclasses.asdict(config.task),
                      dataclasses.asdict(config.data)], sort_keys=True, default=str)
    if key not in _TOKENISED:
        data = task.prepare(load_splits(config.data), tokenizer, config)
        data = DatasetDict({name: split if name == "train" else split.select(np.argsort(split["length"], kind="stable"))
                            for name, split in data.items()})
        derived = {name: getattr(task, name) for name in task.derived}
        while len(_TOKENISED) >= 4:
            _TOKENISED.pop(next(iter(_TOKENISED)))
        _TOKENISED[key] = data, derived
    data, derived = _TOKENISED[key]
    for name, value in derived.items():  # as if prepare had run on this task object too
        setattr(task, name, value)
    return data


def _check_max_length(config: RunConfig, model: torch.nn.Module) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and config.model.max_length > limit:
        raise ConfigError(f"model.max_length = {config.model.max_length} is longer than this model allows "
                          f"({limit} positions).", f"use a max_length of at most {limit}.")


def _optimizer_groups(model: torch.nn.Module, training: TrainingConfig) -> list[dict]:
    """LoRA+'s groups when training.loraplus_lr_ratio is set, else one rate for all."""
    if training.loraplus_lr_ratio is None:
        return param_groups(model, training.weight_decay)
    return loraplus_param_groups(model, training.learning_rate, training.loraplus_lr_ratio,
                                 training.weight_decay, training.loraplus_lr_embedding)

