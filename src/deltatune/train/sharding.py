"""``training.distributed: fsdp``: every parameter sharded across the processes (torch's FSDP2).

Each transformer block, then the whole model, goes through ``torch.distributed.fsdp.fully_shard``:
a process holds 1/N of every weight, frozen or trained, and gathers a block's whole weights only
while that block computes. The optimizer sees the shards (DTensors), so AdamW's moments are
sharded too. accelerate 1.16 applies its FSDP plugin only on GPUs, so deltatune calls torch
itself; the same code runs on CUDA (NCCL) and on CPUs (gloo).

What reads or writes whole tensors outside a forward pass (saving the adapter, checkpoints,
restoring the best adapter) does it inside ``gathered``: every process gathers the trained
parameters (a collective, so every process calls it, in the same order), one process writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.method import method_class
from ..hf.anatomy import ANATOMIES, model_type


def is_sharded(tensor: torch.Tensor) -> bool:
    """A shard of a parameter (or of its optimizer state) under FSDP."""
    from torch.distributed.tensor import DTensor  # imported here: torch.distributed is not everywhere

    return isinstance(tensor, DTensor)


def check_shardable(config, processes: int) -> None:
    """Under training.distributed: fsdp, refuse before anything loads what cannot train sharded.

    Raises:
        ConfigError: one process, a method that reads its parameters between steps, or a
            quantised base (bitsandbytes' packed codes are not tensors FSDP can split).
    """
    if config.training.distributed != "fsdp":
        return
    fix = "set training.distributed: ddp (the whole model on every process)"
    if processes < 2:
        raise ConfigError(f"training.distributed: fsdp shards the model across processes; this run has {processes}.",
                          "launch it with `torchrun --nproc_per_node N -m deltatune.cli train ...` "
                          f"(or `accelerate launch`), or {fix}.")
    refusal = method_class(config.method.method).shard_refusal
    if refusal:
        raise ConfigError(f"method '{config.method.method}' cannot train under training.distributed: fsdp: {refusal}.",
                          f"{fix}, or choose another method.")
    if config.model.quantization is not None:
        raise ConfigError("training.distributed: fsdp cannot shard a quantised base (model.quantization): "
                          "bitsandbytes' packed codes are not split by FSDP.",
                          f"remove model.quantization, or {fix}.")


def shard(model: nn.Module, device: torch.device) -> list[str]:
    """Shard ``model`` in place across every process of the default group; return the names of the
    blocks sharded as their own units (the rest is sharded as one unit with the model's root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = _blocks(model)
    for name in blocks:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    # transformers' generate reads this attribute to keep every process generating in step
    # (synced_gpus): a process that finished early still joins the others' gathers.
    model._is_fsdp_managed_module = True
    return blocks


def _blocks(model: nn.Module) -> list[str]:
    """The repeated transformer blocks, where deltatune knows the architecture (hf/anatomy.py)."""
    kind = model_type(model)
    if kind not in ANATOMIES:
        return []
    pattern = re.compile(ANATOMIES[kind].blocks)
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective), or the tensor itself."""
    return tensor.full_tensor().detach() if is_sharded(tensor) else tensor.detach()


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every process) cut as the shard ``like`` is; no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def copy_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this process's shard of it."""
    with torch.no_grad():
        if is_sharded(target):
            target.to_local().copy_(shard_like(value, target).to_local())
        else:
            target.copy_(value)


def reshard(model: nn.Module) -> None:
    """Put every sharded module's parameters back to their shards. FSDP keeps the root's weights
    whole after a forward pass for the backward that usually follows; after an evaluation (no
    backward) they would stay whole, costing memory, and go stale once the shards change."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def gathered(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Inside, every trained parameter of a sharded model is whole, on every process, so code that
    reads or copies parameters (saving, loading an adapter) runs unchanged; ``write_back`` cuts what
    was copied into them back into the shards on leaving. Every process must enter together. An
    unsharded model is left as it is."""
    reshard(model)
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and is_sharded(param):
                full = nn.Parameter(whole(param))
                module._parameters[name] = full
                swapped.append((module, name, param, full))
    try:
        yield
    finally:
        for module, name, param, full in swapped:
            module._parameters[name] = param
            if write_back:
                copy_whole(param, full)
