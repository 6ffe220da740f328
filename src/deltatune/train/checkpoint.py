"""Resumable checkpoints that hold only what trains, written without pickle.

``checkpoints/step-000120/``:
- ``trainable.safetensors``: the trainable parameters, by their name in the model;
- ``optimizer.safetensors``: AdamW's moments per parameter name;
- ``rng.safetensors``: torch's RNG state;
- ``hooks.safetensors``: what the adapter's training hooks accumulated, as ``ADAPTER/KEY``
  (only where a method has training hooks);
- ``state.json``: step, data position, best metric, scheduler, optimizer hyper-parameters,
  Python's RNG, and a hash of the run config (resuming another config is refused).

A checkpoint directory is written under a temporary name and renamed when whole; older ones
are deleted only after that, so a kill at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import DeltatuneError
from ..io.atomic import follow_umask, fsync_dir
from .sharding import copy_whole, is_sharded, reshard, shard_like, whole

PREFIX = "step-"
HOOKS_FILE = "hooks.safetensors"


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], rng: torch.Tensor | None = None,
                    keep: set[Path] = frozenset(), hooks: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` whole, then delete older ones except ``keep``.

    ``rng`` is torch's RNG state as of that step (default: now); ``hooks`` each adapter's
    training-hook state (``TrainingHooks.state_dict``).
    """
    return write_checkpoint(folder, step, trained_state(model, optimizer), state, rng, keep, hooks)


def trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable parameters and AdamW's moments, whole, on the CPU, and its groups' settings. Of a sharded model every
    process gathers them (training.distributed: fsdp), so every process calls this together."""
    reshard(model)
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: whole(p).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return {"params": params, "moments": _optimizer_tensors(optimizer, names), "param_groups": _groups(optimizer)}


def write_checkpoint(folder: Path, step: int, tensors: dict[str, Any], state: dict[str, Any],
                     rng: torch.Tensor | None = None, keep: set[Path] = frozenset(),
                     hooks: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """``save_checkpoint`` of tensors already gathered by ``trained_state``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        save_file(tensors["params"], tmp / "trainable.safetensors")
        save_file(tensors["moments"], tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state() if rng is None else rng}, tmp / "rng.safetensors")
        hook_tensors = {f"{name}/{key}": t.detach().cpu().contiguous()
                        for name, tensors in (hooks or {}).items() for key, t in tensors.items()}
        if hook_tensors:
            save_file(hook_tensors, tmp / HOOKS_FILE)
        state = {**state, "step": step, "param_groups": tensors["param_groups"], "python_rng": _py_rng()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        follow_umask(tmp, *tmp.iterdir())  # the renamed folder and its files keep these modes
        fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-1]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary directories are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config_hash: str) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG; return the saved training state.

    Raises:
        DeltatuneError: unreadable files, or a checkpoint written under another config (checked
            before anything is restored).
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"checkpoint '{path}' cannot be read ({error}).",
                             "delete it to resume from the one before, or start again.") from error
    if state.get("config_hash") != config_hash:
        raise DeltatuneError(f"checkpoint '{path}' was written by a run with another config.",
                             "resume with the same config, or choose a new training.output_dir.")
    try:
        params = load_file(path / "trainable.safetensors")
        moments = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"checkpoint '{path}' cannot be read ({error}).",
                             "delete it to resume from the one before, or start again.") from error
    own = dict(model.named_parameters())
    for name, value in params.items():
        copy_whole(own[name], value)
    _restore_optimizer(optimizer, moments, {id(p): n for n, p in own.items()}, state["param_groups"])
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def load_hook_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's training-hook state in checkpoint ``path`` (none saved: ``{}``)."""
    if not (path / HOOKS_FILE).is_file():
        return {}
    try:
        tensors = load_file(path / HOOKS_FILE)
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"checkpoint '{path}' cannot be read ({error}).",
                             "delete it to resume from the one before, or start again.") from error
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, inner = key.partition("/")
        states.setdefault(name, {})[inner] = tensor
    return states


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    tensors = {}
    # in the groups' order, the same on every process (a sharded model's moments are gathered)
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{names[id(param)]}::{key}"] = whole(torch.as_tensor(value)).cpu().clone()
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       names: dict[int, str], groups: list[dict]) -> None:
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved.items()})
        for param in group["params"]:
            prefix = f"{names[id(param)]}::"
            values = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if values:
                optimizer.state[param] = {k: _like(v, param) for k, v in values.items()}


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A moment as the optimizer keeps it for ``param``: on its device, sharded as it is."""
    if is_sharded(param) and value.shape == param.shape:
        return shard_like(value, param)
    return value.to(param.device)


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, list, tuple, type(None)))}
            for g in optimizer.param_groups]


def _py_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
