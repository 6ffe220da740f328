"""LoRA: a low-rank update beside each frozen weight (Hu et al., 2021).

    h = W0 x + (alpha / r) * B A dropout(x)        W0: d x k frozen,  B: d x r,  A: r x k

       x ──► W0 ─────────────┐
       └──► dropout ─► A ─► B ─► x (alpha/r) ─► (+) ─► h

B starts at zero and A from Kaiming-uniform, so a fresh adapter leaves the outputs unchanged.
Trainable parameters per adapted layer: r * (d + k). Mergeable: W = W0 + (alpha/r) B A costs
exactly what W0 costs at inference, and unmerging subtracts it again. ``use_rslora`` scales
by alpha / sqrt(r) instead (Kalajdzievski, 2023), which keeps updates stable at large ranks.
Works on ``nn.Linear``, transformers' ``Conv1D`` (GPT-2, weight stored transposed) and
``nn.Embedding``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layer import AdapterState, Delta, DeltaLayer
from ..core.method import Method, MethodConfig, add_deltas, help_field, register
from ..core.peft_keys import TUNER_PREFIX, modules_with, refuse_unsupported, targets_from_peft
from ..hf.anatomy import anatomy_of
from ..hf.layers import linear_shape, linear_types, weight_is_transposed

__all__ = ["LoraConfig", "LoRALinear"]


@dataclass
class LoraConfig(MethodConfig):
    r: int = help_field(8, "Rank of the update B A.", range="[1, inf)")
    lora_alpha: float = help_field(16, "Scale numerator: the update is multiplied by lora_alpha / r.",
                                   range="(0, inf)")
    lora_dropout: float = help_field(0.0, "Dropout on the adapter's input.", range="[0, 1)", typical=0.05)
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's query and value projections.")
    bias: Literal["none", "all", "lora_only"] = help_field(
        "none", "Which base biases also train: none, all, or those of the adapted layers.")
    use_rslora: bool = help_field(False, "Scale by lora_alpha / sqrt(r) (rank-stabilised LoRA).")
    init: Literal["kaiming", "gaussian"] = help_field(
        "kaiming", "How A starts (B always starts at zero): kaiming-uniform or N(0, 1/r).")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora.target_modules is empty: LoRA would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraDelta(Delta):
    """``(alpha/r) B A dropout(x)`` added to the output of one linear, Conv1D or embedding layer."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        self.scaling = scaling
        self.is_embedding = isinstance(base, nn.Embedding)
        self.fan_in_fan_out = weight_is_transposed(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.is_embedding:
            # peft's layout: A (r x vocab) starts at zero, B random, so A x B = 0 at start too.
            self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
            self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r))
            self._embedding_args = {"padding_idx": base.padding_idx, "max_norm": base.max_norm,
                                    "norm_type": base.norm_type,
                                    "scale_grad_by_freq": base.scale_grad_by_freq, "sparse": base.sparse}
            return
        in_features, out_features = linear_shape(base)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.is_embedding:
            update = F.embedding(x, self.lora_embedding_A.T, **self._embedding_args) @ self.lora_embedding_B.T
        else:
            x = self.dropout(x.to(self.lora_A.weight.dtype))
            update = self.lora_B(self.lora_A(x))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A in the base weight's own layout."""
        if self.is_embedding:
            return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling
        weight = self.lora_B.weight @ self.lora_A.weight * self.scaling
        return weight.T if self.fan_in_fan_out else weight

    def merge(self, base: nn.Module) -> None:
        base.weight.data += self.delta_weight().to(base.weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        base.weight.data -= self.delta_weight().to(base.weight.dtype)

    def changed_numel(self, base: nn.Module) -> int:
        return base.weight.numel()


def make_lora_delta(base: nn.Module, config: LoraConfig) -> LoraDelta:
    return LoraDelta(base, config.r, config.scaling, config.lora_dropout, config.init)


@register
class Lora(Method):
    name = "lora"
    config_class = LoraConfig
    family = "re-parameterisation"
    mergeable = True
    learning_rates = (1e-3, 3e-3, 1e-2)  # r=8 matrices on a small encoder take large steps
    count_formula = "r * (d_in + d_out) per adapted layer"

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules
        if entries is None:
            roles = anatomy_of(model, "LoRA's default target_modules")
            entries = list(dict.fromkeys(roles.query + roles.value))
        return self.targets(model, entries, (*linear_types(), nn.Embedding), linear_types=linear_types())

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        if self.config.bias != "none":
            warnings.warn(f"lora bias='{self.config.bias}' trains base biases in place (as peft does): "
                          "disable_adapters() and other adapters see the trained biases.", stacklevel=3)
        add_deltas(model, plan, adapter_name, state, lambda base, _: make_lora_delta(base, self.config))

    def extra_trainable(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        if self.config.bias == "none":
            return {}
        params = {n: p for n, p in model.named_parameters() if n.endswith("bias") and ".deltas." not in n}
        mine = {n: m.deltas[adapter_name] for n, m in model.named_modules()
                if isinstance(m, DeltaLayer) and adapter_name in m.deltas}
        # A module this adapter replaces by a trained copy (modules_to_save) keeps its own biases
        # frozen: they no longer reach the output, and the copy's bias is stored under their key.
        copied = tuple(f"{n}.base_layer." for n, d in mine.items() if d.replaces_base)
        params = {n: p for n, p in params.items() if not n.startswith(copied)}
        if self.config.bias == "lora_only":
            adapted = {f"{n}.base_layer.bias" for n, d in mine.items() if isinstance(d, LoraDelta)}
            params = {n: p for n, p in params.items() if n in adapted}
        return params

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        # Biases are stored under the base module's own name, as peft stores them.
        return {n.replace(".base_layer.", "."): p for n, p in self.extra_trainable(model, adapter_name).items()}

    peft_type = "LORA"
    peft_ignored = ("fan_in_fan_out", "megatron_config", "megatron_core", "loftq_config", "eva_config",
                    "corda_config", "qalora_group_size", "ensure_weight_tying", "arrow_config", "kasa_config",
                    "lora_ga_config", "monteclora_config", "velora_config")

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        return {"method": "lora", "r": peft["r"], "lora_alpha": peft["lora_alpha"],
                "lora_dropout": peft.get("lora_dropout", 0.0), "target_modules": targets_from_peft(peft["target_modules"]),
                "bias": peft.get("bias", "none"), "use_rslora": peft.get("use_rslora", False),
                "init": "gaussian" if peft.get("init_lora_weights") == "gaussian" else "kaiming"}

    def peft_config(self, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        config = self.config
        return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                "target_modules": modules_with(tensors, "lora_A.", "lora_embedding_A"), "bias": config.bias,
                "use_rslora": config.use_rslora, "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
                "fan_in_fan_out": description.get("fan_in_fan_out", False)}

    def tensors_to_peft(self, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # peft keeps an adapted layer's own (trained) bias under its base_layer.
        adapted = {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
        return {TUNER_PREFIX + (f"{k[:-5]}.base_layer.bias" if k.endswith(".bias") and k[:-5] in adapted else k): v
                for k, v in tensors.items()}

    @classmethod
    def tensors_from_peft(cls, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(TUNER_PREFIX).replace(".base_layer.", "."): v for k, v in tensors.items()}


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                    "layers_pattern": None, "lora_bias": False, "target_parameters": None,
                    "trainable_token_indices": None, "layer_replication": None, "exclude_modules": None,
                    "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None}


class LoRALinear(DeltaLayer):
    """A single ``nn.Linear`` with a LoRA update, for building models from scratch.

    >>> layer = LoRALinear(64, 32, rank=4, lora_alpha=8)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, bias: bool = True):
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        super().__init__(nn.Linear(in_features, out_features, bias=bias),
                         AdapterState(configs={"default": config}, active=["default"]))
        self.base_layer.requires_grad_(False)
        self.add_delta("default", make_lora_delta(self.base_layer, config))
