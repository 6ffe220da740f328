"""LoHa: a weight change that is the Hadamard product of two low-rank products (Hyeon-Woo et al.,
2022, FedPara; LyCORIS; peft's LOHA).

    ΔW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)       W1a, W2a: d_out x r;  W1b, W2b: r x d_in
    h  = W0 x + ΔW x

The element-wise product of two rank-r matrices has rank up to r², so LoHa reaches a higher rank
than LoRA for the same parameters: 2 r (d_in + d_out) per adapted layer. W2b starts at zero (the
other three Kaiming-uniform, as peft), so a fresh adapter leaves the outputs unchanged;
``init_weights: false`` starts all four at random. Mergeable: W = W0 + ΔW, and unmerging
subtracts it. ΔW does not factor into two thin matrix products, so each forward builds the
d_out x d_in matrix once. In training, ``rank_dropout`` drops rows of ΔW (rescaling the rest)
and ``module_dropout`` skips the whole change for a step, as peft does.

Works on ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2); peft's LoHa has no Conv1D layer, so
adapters on Conv1D layers stay in deltatune's format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterFileError, ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, register
from ..core.peft_keys import modules_with, refuse_unsupported, targets_from_peft
from ..hf.anatomy import query_and_value
from ..hf.layers import WeightDelta, linear_shape, linear_types

__all__ = ["LoHaConfig"]


@dataclass
class LoHaConfig(MethodConfig):
    r: int = help_field(8, "Rank of each of the two products whose Hadamard product is the change.",
                        range="[1, inf)")
    alpha: float = help_field(8, "Scale numerator: the change is multiplied by alpha / r.", range="(0, inf)")
    rank_dropout: float = help_field(0.0, "In training, the probability of dropping each output row of "
                                          "the change (the rest rescaled).", range="[0, 1)")
    module_dropout: float = help_field(0.0, "In training, the probability of skipping the whole change "
                                            "in a forward pass.", range="[0, 1)")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's query and value projections.")
    init_weights: bool = help_field(True, "Start W2b at zero, so a fresh adapter changes nothing "
                                          "(false: all four factors random).")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("loha.target_modules is empty: LoHa would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class HadamardDelta(WeightDelta):
    """ΔW = s (W1a W1b) ⊙ (W2a W2b) beside one linear or Conv1D layer, named as peft names it."""

    def __init__(self, base: nn.Module, config: LoHaConfig):
        super().__init__(config.rank_dropout, config.module_dropout)
        in_features, out_features = linear_shape(base)
        r, self.scaling = config.r, config.scaling
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features))
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling


class LoHaPeft(PeftCodec):
    """LoHa adapters in peft's format (the same tensor names, under peft's prefix)."""

    peft_type = "LOHA"
    ignored = ("use_effective_conv2d",)  # about Conv2d layers, which transformers models here do not have

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        return {"method": "loha", "r": peft["r"], "alpha": peft["alpha"],
                "rank_dropout": peft.get("rank_dropout", 0.0), "module_dropout": peft.get("module_dropout", 0.0),
                "target_modules": targets_from_peft(peft["target_modules"]),
                "init_weights": bool(peft.get("init_weights", True))}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if description.get("fan_in_fan_out"):
            raise AdapterFileError("this LoHa adapter changes Conv1D layers (GPT-2's), and peft's LoHa has no "
                                   "Conv1D layer to load them into.", "keep the deltatune format for it.")
        return {"r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
                "module_dropout": config.module_dropout, "init_weights": config.init_weights,
                "target_modules": modules_with(tensors, "hada_w1_a"), "use_effective_conv2d": False,
                "rank_pattern": {}, "alpha_pattern": {}}


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                    "layers_pattern": None, "exclude_modules": None}


@register
class LoHa(Method):
    name = "loha"
    config_class = LoHaConfig
    family = "re-parameterisation"
    mergeable = True
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "2 r * (d_in + d_out) per adapted layer"

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "LoHa")
        return self.targets(model, entries, linear_types(), linear_types=linear_types())

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: HadamardDelta(base, self.config))

    peft = LoHaPeft()
