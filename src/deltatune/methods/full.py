"""Full fine-tuning: every weight trains. The baseline every PEFT method is measured against.

Trainable = stored = changed = all parameters of the model (task head included). Nothing is
added, so inference costs exactly what the base model costs; but each task needs a whole
copy of the model on disk, and the base weights are changed in place: there is no base left
to switch back to (``disable_adapters`` refuses, a second adapter cannot be added).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layer import AdapterState
from ..core.method import Method, MethodConfig, Tuning, iter_layers, register

__all__ = ["FullFineTuningConfig"]


@dataclass
class FullFineTuningConfig(MethodConfig):
    """No options: every parameter trains (``modules_to_save`` is implied and ignored)."""


@register
class FullFineTuning(Method):
    name = "full"
    config_class = FullFineTuningConfig
    family = "full"
    in_place = True
    # short budgets want the upper end
    tuning = Tuning(default_learning_rate=5e-5, learning_rates=(3e-5, 1e-4, 3e-4))
    count_formula = "all parameters of the model"
    merge_refusal = "full fine-tuning already changed the base weights; there is nothing to merge"

    def row_refusal(self) -> str:
        return "it changed the base weights themselves, which every row shares"

    def plan(self, model: nn.Module) -> None:
        if getattr(model, "_deltatune_state", None) is not None or any(iter_layers(model)):
            raise ConfigError("full fine-tuning cannot share a model with other adapters.",
                              "apply it to a freshly loaded base model.")

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: None) -> None:
        """Nothing to add: the model's own weights are the adapter."""

    def extra_trainable(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters())
