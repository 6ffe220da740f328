"""LoKr: a weight change that is the Kronecker product of two small matrices (Yeh et al., 2024,
LyCORIS; peft's LOKR).

    ΔW = (alpha / r) * W1 ⊗ W2        W1: a x c,  W2: b x e,  with d_out = a b and d_in = c e
    h  = W0 x + ΔW x

d_out and d_in are each split into two factors near their square root (``decompose_factor``
picks one factor instead), so W1 and W2 are tiny: a Kronecker product of an a x c and a b x e
matrix has rank rank(W1) rank(W2) from a c + b e numbers. Where r is small against a factor's
sides, that factor is itself a low-rank product: W2 = W2a W2b when r < max(b, e) / 2, and W1 =
W1a W1b too with ``decompose_both`` when r < max(a, c) / 2. Parameters per adapted layer: the
sizes of those factors (``count_formula``). peft's start: W1 (or W1a) at zero, so a fresh adapter
changes nothing; ``init_weights: lycoris`` zeroes W2 (or W2b) instead; ``false``: all random.
Mergeable: W = W0 + ΔW, unmerged by subtracting it; each forward builds ΔW once. In training,
``rank_dropout`` (rescaled only with ``rank_dropout_scale``) and ``module_dropout`` as in peft.

Works on ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2); peft's LoKr has no Conv1D layer, so
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
from ..core.peft_keys import refuse_unsupported, targets_from_peft
from ..hf.anatomy import query_and_value
from ..hf.layers import WeightDelta, linear_shape, linear_types

__all__ = ["LoKrConfig"]

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class LoKrConfig(MethodConfig):
    r: int = help_field(8, "Rank of a factor that is itself a low-rank product.", range="[1, inf)")
    alpha: float = help_field(8, "Scale numerator: the change is multiplied by alpha / r.", range="(0, inf)")
    rank_dropout: float = help_field(0.0, "In training, the probability of dropping each output row of "
                                          "the change.", range="[0, 1)")
    module_dropout: float = help_field(0.0, "In training, the probability of skipping the whole change "
                                            "in a forward pass.", range="[0, 1)")
    rank_dropout_scale: bool = help_field(False, "Rescale the rows rank_dropout keeps by 1 / the fraction kept.")
    decompose_both: bool = help_field(False, "Also write the first Kronecker factor W1 as a low-rank "
                                             "product when r is small against its sides.")
    decompose_factor: int = help_field(-1, "Split each dimension as this times the rest where it divides "
                                           "(-1: the two factors nearest its square root).", range="[-1, inf)")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's query and value projections.")
    init_weights: bool | str = help_field(
        True, "How the factors start: true (W1 at zero: a fresh adapter changes nothing), 'lycoris' "
              "(W2 at zero instead) or false (all random).")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lokr.target_modules is empty: LoKr would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")
        if isinstance(self.init_weights, str) and self.init_weights != "lycoris":
            raise ConfigError(f"lokr.init_weights = {self.init_weights!r} is not a start LoKr knows.",
                              "use true, false or 'lycoris'.")
        if self.decompose_factor == 0:
            raise ConfigError("lokr.decompose_factor = 0 splits no dimension.",
                              "use -1 (near the square root) or a factor of the layer sizes.")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, with m n = ``dimension``: ``factor`` and the rest where it divides, else the
    divisor pair nearest the square root whose smaller side stays at most ``factor`` (-1: no
    bound). peft's and LyCORIS's rule, so that files agree on the factors' shapes."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class KroneckerDelta(WeightDelta):
    """ΔW = s W1 ⊗ W2 beside one linear or Conv1D layer, each factor whole or a low-rank product
    (peft's names: ``lokr_w1`` or ``lokr_w1_a`` and ``lokr_w1_b``; the same for W2)."""

    def __init__(self, base: nn.Module, config: LoKrConfig):
        super().__init__(config.rank_dropout, config.module_dropout, rescale=config.rank_dropout_scale)
        in_features, out_features = linear_shape(base)
        (a, b), (c, e), r = factorization(out_features, config.decompose_factor), \
            factorization(in_features, config.decompose_factor), config.r
        self.scaling = config.scaling
        whole_w1 = not (config.decompose_both and r < max(a, c) / 2)
        whole_w2 = not r < max(b, e) / 2
        if whole_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.empty(a, r)), nn.Parameter(torch.empty(r, c))
        if whole_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, e))
        else:
            self.lokr_w2_a, self.lokr_w2_b = nn.Parameter(torch.empty(b, r)), nn.Parameter(torch.empty(r, e))
        for factor in self.parameters():
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        for name in zero:
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))

    def factor(self, which: str) -> torch.Tensor:
        """W1 or W2, whole or as its low-rank product."""
        whole = getattr(self, f"lokr_{which}", None)
        if whole is not None:
            return whole
        return getattr(self, f"lokr_{which}_a") @ getattr(self, f"lokr_{which}_b")

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.factor("w1"), self.factor("w2")) * self.scaling


class LoKrPeft(PeftCodec):
    """LoKr adapters in peft's format (the same tensor names, under peft's prefix)."""

    peft_type = "LOKR"
    ignored = ("use_effective_conv2d",)  # about Conv2d layers, which transformers models here do not have

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        return {"method": "lokr", "r": peft["r"], "alpha": peft["alpha"],
                "rank_dropout": peft.get("rank_dropout", 0.0), "module_dropout": peft.get("module_dropout", 0.0),
                "rank_dropout_scale": bool(peft.get("rank_dropout_scale", False)),
                "decompose_both": bool(peft.get("decompose_both", False)),
                "decompose_factor": peft.get("decompose_factor", -1),
                "target_modules": targets_from_peft(peft["target_modules"]),
                "init_weights": peft.get("init_weights", True)}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if description.get("fan_in_fan_out"):
            raise AdapterFileError("this LoKr adapter changes Conv1D layers (GPT-2's), and peft's LoKr has no "
                                   "Conv1D layer to load them into.", "keep the deltatune format for it.")
        modules = sorted({k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in FACTORS})
        return {"r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
                "module_dropout": config.module_dropout, "rank_dropout_scale": config.rank_dropout_scale,
                "decompose_both": config.decompose_both, "decompose_factor": config.decompose_factor,
                "init_weights": config.init_weights, "target_modules": modules, "use_effective_conv2d": False,
                "rank_pattern": {}, "alpha_pattern": {}}


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                    "layers_pattern": None, "exclude_modules": None}


@register
class LoKr(Method):
    name = "lokr"
    config_class = LoKrConfig
    family = "re-parameterisation"
    mergeable = True
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "a c + b e per adapted layer (d_out = a b, d_in = c e), a factor r (sides) where low-rank"

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "LoKr")
        return self.targets(model, entries, linear_types(), linear_types=linear_types())

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: KroneckerDelta(base, self.config))

    peft = LoKrPeft()
