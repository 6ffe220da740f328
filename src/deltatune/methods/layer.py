"""Layer tuning: train only the top k transformer blocks (and the final norm), freeze the rest.

The top blocks hold the most task-specific features, so tuning them is the classic cheap
baseline between a frozen body and full fine-tuning. Each chosen block runs as a trainable
copy beside its frozen original, so adapters can still be switched off and several tasks can
share one base model; merging writes the trained copy back into the base block.

Trainable = stored = changed = k x (parameters of one block) + final norm (+ task head).
Mergeable: the merged model is exactly the base architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, ModuleCopy
from ..core.method import Method, MethodConfig, Tuning, add_deltas, register
from ..core.targets import module_names, resolve_targets
from ..hf.anatomy import anatomy_of

__all__ = ["LayerTuningConfig"]


@dataclass
class LayerTuningConfig(MethodConfig):
    top_k: int = help_field(2, "How many of the top (last) transformer blocks train, per stack.",
                            range="[1, inf)")
    include_final_norm: bool = help_field(True, "Also train the norm after the last block, if any.")


def top_blocks(names: list[str], pattern: str, k: int) -> list[str]:
    """The last ``k`` blocks of each stack (encoder and decoder are separate stacks)."""
    stacks: dict[str, list[str]] = {}
    for name in names:
        if re.fullmatch(pattern, name):
            stacks.setdefault(name.rpartition(".")[0], []).append(name)
    return [name for blocks in stacks.values() for name in blocks[-k:]]


@register
class LayerTuning(Method):
    name = "layer"
    config_class = LayerTuningConfig
    family = "selective"
    mergeable = True
    tuning = Tuning(default_learning_rate=1e-4, learning_rates=(1e-4, 3e-4, 1e-3))
    count_formula = "top_k x (parameters of one block) + final norm"

    def row_refusal(self) -> str:
        return "it replaces whole blocks, whose inputs (caches, masks) cannot be split by row"

    def plan(self, model: nn.Module) -> list[str]:
        roles = anatomy_of(model, "layer tuning")
        names = module_names(model)
        blocks = top_blocks(names, roles.blocks, self.config.top_k)
        depth = len([n for n in names if re.fullmatch(roles.blocks, n)])
        if self.config.top_k > depth:
            raise ConfigError(f"layer.top_k = {self.config.top_k} but the model has {depth} blocks.",
                              f"use a top_k of at most {depth}, or method: full.")
        if self.config.include_final_norm and roles.final_norm:
            blocks += resolve_targets(model, roles.final_norm, (nn.Module,), "layer tuning")
        return blocks

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: ModuleCopy(base))
