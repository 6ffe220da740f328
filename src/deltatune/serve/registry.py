"""The runs a server serves, each loaded as a named adapter into a shared copy of the base model.

Runs of one task whose heads have the same width (two-label classifiers, say) share one model
instance and can share a forward pass; a run whose head differs gets an instance of its own (one
more copy of the base in memory), and so does a run that changed base weights themselves (full
fine-tuning, LoRA with trained biases) or cannot share a batch (layer tuning). A run trained on
another base model is refused. Adapters are loaded and unloaded while the server runs: ``lock``
keeps a model from changing while a batch runs on it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoTokenizer

from .. import assets
from ..core.method import method_for
from ..core.verbs import delete_adapter
from ..io.adapter_files import load_adapter
from ..io.run_folder import RUN_ADAPTER, locate
from ..train.config import RunConfig
from ..train.inference import read_run, run_precision
from ..train.precision import compute_in
from ..train.setup import resolve_model_path
from .errors import AdapterConflict, ServeError, UnknownAdapter, UnusableAdapter

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(eq=False)
class Instance:
    """One copy of the base model with a task head, and the adapters loaded into it."""

    key: tuple
    model: nn.Module
    tokenizer: Any  # the event loop's: encodes requests
    # the worker thread's: pads and decodes (a fast tokenizer must not serve two threads at once:
    # one changing its truncation while the other reads it fails with "Already borrowed")
    worker_tokenizer: Any
    adapters: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Served:
    """One run, served under a name."""

    name: str
    folder: Path
    config: RunConfig
    task: Any
    instance: Instance

    @property
    def method(self) -> str:
        return self.config.method.method

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "method": self.method, "task": self.task.name, "path": str(self.folder)}


def base_model(path: str | Path) -> str:
    """The model folder BASE names: a model folder, a bundled model's name, or a run folder (its base)."""
    run = locate(path).run
    if run is not None:
        path = read_run(run)[1].model.name_or_path
    return resolve_model_path(str(path))


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ServeError(f"'{name}' cannot name an adapter.",
                         "use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.")


class Registry:
    """The adapters being served, by name, and the model instances that hold them."""

    def __init__(self, base: str | Path, precision: str | None = None):
        self.base = base_model(base)
        self.precision = precision  # None: each run's own
        self.adapters: dict[str, Served] = {}
        self.instances: dict[tuple, Instance] = {}
        self.lock = threading.Lock()  # held while a model runs or changes
        self._changing = threading.Lock()  # one load or unload at a time

    def get(self, name: str) -> Served:
        served = self.adapters.get(name)
        if served is None:
            raise UnknownAdapter(f"no adapter named '{name}' is loaded.",
                                 f"loaded: {', '.join(self.adapters) or 'none'}; load one with POST /v1/adapters.")
        return served

    def describe(self) -> list[dict[str, str]]:
        return [served.describe() for served in list(self.adapters.values())]  # a copy: loads change it

    def load(self, name: str, path: str | Path) -> Served:
        """Serve the run at ``path`` (a run folder or its adapter folder) as adapter ``name``.

        Raises:
            ServeError: a bad name. AdapterConflict: the name is taken. UnusableAdapter: the run
                was trained on another base model. ConfigError, AdapterFileError: no run there,
                or its adapter files are damaged or do not fit the base.
        """
        check_name(name)
        with self._changing:
            if name in self.adapters:
                raise AdapterConflict(f"an adapter named '{name}' is already loaded ({self.adapters[name].folder}).",
                                      f"choose another name, or DELETE /v1/adapters/{name} first.")
            folder, config, task, resolved = read_run(path)
            self._check_base(folder, config)
            instance = self._instance_for(name, config, task, run_precision(resolved, self.precision))
            with self.lock:
                load_adapter(instance.model, folder / RUN_ADAPTER, adapter_name=name)
                instance.model.eval()
                instance.adapters.add(name)
                self.instances[instance.key] = instance
            self.adapters[name] = Served(name, folder, config, task, instance)
            return self.adapters[name]

    def unload(self, name: str) -> Served:
        """Stop serving ``name``; a model instance left without adapters is dropped with it."""
        with self._changing:
            served = self.get(name)
            instance = served.instance
            with self.lock:
                del self.adapters[name]
                delete_adapter(instance.model, name)
                instance.adapters.discard(name)
                if not instance.adapters:
                    del self.instances[instance.key]
            return served

    def _check_base(self, folder: Path, config: RunConfig) -> None:
        trained_on = config.model.name_or_path
        if _folder(trained_on) != _folder(self.base):
            raise UnusableAdapter(f"run '{folder}' was trained on base model '{trained_on}'; this server serves "
                                  f"'{self.base}'.", f"serve it from a server started on its base: "
                                                    f"deltatune serve {folder} --adapter NAME={folder}")

    def _instance_for(self, name: str, config: RunConfig, task: Any, precision: str) -> Instance:
        """The instance the run's adapter goes into: one that exists, or a new copy of the base."""
        key = instance_key(name, config, task, precision)
        if key in self.instances:
            return self.instances[key]
        model = compute_in(task.load_model(self.base), key[-1]).eval()
        tokenizers = [AutoTokenizer.from_pretrained(self.base) for _ in range(2)]
        return Instance(key, model, *tokenizers)


def instance_key(name: str, config: RunConfig, task: Any, precision: str) -> tuple:
    """Runs with equal keys share a model instance: the same task, head width (labels), model
    settings and precision (last). An adapter that changed base weights in place (full fine-tuning, LoRA with trained
    biases) or cannot run per row (layer tuning) has its own."""
    method = method_for(config.method)
    own = name if method.in_place or method.row_refusal() else None
    quantization = config.model.quantization and dataclasses.asdict(config.model.quantization)
    settings = json.dumps({"overrides": config.model.config_overrides, "quantization": quantization}, sort_keys=True)
    return task.name, len(getattr(task, "labels", [])), settings, own, precision


def _folder(name_or_path: str) -> Path:
    """A model's folder on disk, however it was named (bundled name, relative path)."""
    path = assets.model_path(name_or_path) if name_or_path in assets.MODELS else name_or_path
    return Path(path).expanduser().resolve()
