"""Frozen-prefix caching (``training.cache_frozen``): when nothing below block k trains, the
input of block k depends on the example alone, so it is computed once and reused every epoch.

    first visit:  x ─► embeddings ─► blocks 0..k-1 ─► h_k(x) ─► blocks k.. ─► loss     (h_k(x) kept)
    later visits:                         kept h_k(x) ─► blocks k.. ─► loss

Layer tuning (top k blocks), and LoRA, IA3 or adapters whose ``target_modules`` name upper
blocks only, gain the most (with adapters in block 0 only the embeddings' output is kept); a
method that trains anything the input passes first (prompt tuning, the embeddings) cannot use it,
and the run says so before training. Everything
below block k runs in eval mode (its dropout off) on every visit, so each epoch computes the same
function, the first included. A batch whose examples are all kept skips the modules below block
k; any other runs the whole model and keeps what it lacked.

Memory: the kept inputs, one vector of the model's width per real token of every training
example (padding is not kept), in the activations' dtype. One process only: with several, each
would keep its own share.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..hf.anatomy import ANATOMIES, model_type

INDEX = "deltatune_example_index"  # the batch key that carries each row's index in the training set
FIX = ("set training.cache_frozen: false, or train upper blocks only (layer tuning, or target_modules in the "
       "top blocks).")


class FrozenPrefix:
    """The kept inputs of block ``first`` of ``parent.<attr>`` (the model's block list), by example."""

    def __init__(self, parent: nn.Module, attr: str, first: int, below: list[nn.Module]):
        self.parent, self.attr, self.first, self.below = parent, attr, first, below
        self.kept: dict[int, torch.Tensor] = {}  # example index -> (real tokens, d)
        self.skipped_batches = 0

    def summary(self) -> dict[str, Any]:
        kept_bytes = sum(t.numel() * t.element_size() for t in self.kept.values())
        return {"first_block": self.first, "kept_examples": len(self.kept), "kept_mib": round(kept_bytes / 2**20, 1),
                "skipped_batches": self.skipped_batches}

    @contextmanager
    def forward(self, batch: dict[str, Any], indices: torch.Tensor) -> Iterator[None]:
        """Around one training forward of ``batch`` (without its index key)."""
        for module in self.below:
            module.eval()
        blocks = getattr(self.parent, self.attr)
        real = _real_tokens(batch)
        rows = indices.tolist()
        if all(i in self.kept for i in rows):
            self.skipped_batches += 1
            hidden = real.new_zeros(*real.shape, self.kept[rows[0]].shape[-1], dtype=self.kept[rows[0]].dtype)
            hidden[real] = torch.cat([self.kept[i] for i in rows])  # (batch, seq, d), zeros at padding
            hook = blocks[self.first].register_forward_pre_hook(_replace_hidden(hidden), with_kwargs=True)
            setattr(self.parent, self.attr, nn.ModuleList(list(blocks)[self.first:]))
        else:
            hook = blocks[self.first].register_forward_pre_hook(self._keep(rows, real), with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            setattr(self.parent, self.attr, blocks)

    def _keep(self, rows: list[int], real: torch.Tensor):
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()  # (batch, seq, d)
            for row, index in enumerate(rows):
                self.kept.setdefault(index, hidden[row][real[row]].clone())  # (real tokens, d)
        return keep


def _replace_hidden(hidden: torch.Tensor):
    def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return replace


def _real_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """(batch, seq), True at the tokens that are not padding."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.bool()
    return torch.ones(batch["input_ids"].shape, dtype=torch.bool, device=batch["input_ids"].device)


def plan(model: nn.Module, batch: dict[str, Any]) -> FrozenPrefix:
    """Where the cache goes in ``model``, checked on one forward pass of ``batch`` (no gradients).

    Raises:
        ConfigError: nothing can be cached: the family's blocks are unknown or come in two stacks
            (encoder-decoder), no block trains, or something trains before the lowest trained block.
    """
    stack = block_stack(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = [int(m.group(1)) for n in trained if (m := re.match(re.escape(stack) + r"\.(\d+)\.", n))]
    first = min(in_blocks, default=0)
    order = _call_order(model, batch)
    start = order[f"{stack}.{first}"]
    for name in trained:
        if not name.startswith(f"{stack}.") and order[_nearest_called(name, order)] < start:
            raise ConfigError(f"training.cache_frozen: '{name}' trains, and its module runs before block {first}, "
                              "so the input of that block is not the same from one epoch to the next.", FIX)
    if not in_blocks:
        raise ConfigError("training.cache_frozen: no transformer block trains, only what follows them.", FIX)
    below = [model.get_submodule(n) for n, i in order.items()
             if i < start and n and not f"{stack}.{first}".startswith(n + ".")]
    parent_name, attr = stack.rpartition(".")[::2]
    return FrozenPrefix(model.get_submodule(parent_name), attr, first, below)


def block_stack(model: nn.Module) -> str:
    """The name of the model's list of transformer blocks (``bert.encoder.layer``)."""
    anatomy = ANATOMIES.get(model_type(model))
    if anatomy is None:
        raise ConfigError(f"training.cache_frozen: deltatune does not know where the blocks of a "
                          f"'{model_type(model)}' model are.", "set training.cache_frozen: false.")
    stacks = {n.rpartition(".")[0] for n, _ in model.named_modules() if re.fullmatch(anatomy.blocks, n)}
    if len(stacks) != 1:
        raise ConfigError(f"training.cache_frozen needs one stack of blocks; {type(model).__name__} has "
                          f"{len(stacks)} ({', '.join(sorted(stacks))}).", "set training.cache_frozen: false.")
    return stacks.pop()


def _call_order(model: nn.Module, batch: dict[str, Any]) -> dict[str, int]:
    """Module name -> the order in which a forward pass first calls it."""
    order: dict[str, int] = {}

    def called(name: str):
        def note(module: nn.Module, args: tuple) -> None:
            order.setdefault(name, len(order))
        return note

    hooks = [module.register_forward_pre_hook(called(name)) for name, module in model.named_modules()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(**batch)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return order


def _nearest_called(parameter: str, order: dict[str, int]) -> str:
    """The innermost module holding ``parameter`` that the forward pass called ('' is the model)."""
    name = parameter.rpartition(".")[0]
    while name and name not in order:
        name = name.rpartition(".")[0]
    return name


class Indexed(torch.utils.data.Dataset):
    """A training set whose rows carry their index (under ``INDEX``)."""

    def __init__(self, rows: Any):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], INDEX: index}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [{**row, INDEX: i} for row, i in zip(self.rows.__getitems__(indices), indices)]


def indexed_collate(collate: Any) -> Any:
    """``collate`` for ``Indexed`` rows: the batch gains ``INDEX``, (batch,)."""
    def collate_indexed(rows: list[dict[str, Any]]) -> dict[str, Any]:
        indices = torch.tensor([row.pop(INDEX) for row in rows])
        return {**collate(rows), INDEX: indices}
    return collate_indexed
