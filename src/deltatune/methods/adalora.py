"""AdaLoRA: a LoRA whose rank budget moves, while it trains, to the layers that matter (Zhang et
al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"; peft's ADALORA).

    h = W0 x + s * B diag(E) A dropout(x)        A: r x d_in,  E: r,  B: d_out x r,  r = init_r
    s = lora_alpha / (init_r + 1e-5)

The update is held as singular-value-like triplets (column i of B, value E_i, row i of A). E
starts at zero (A and B ~ N(0, 0.02²), as peft), so a fresh adapter leaves the outputs
unchanged. The training hooks (:class:`RankAllocator`) then, after every optimizer step t:

- score each triplet by the importance of its entries: for every entry p, I = |p * dL/dp|,
  smoothed as Ī <- beta1 Ī + (1 - beta1) I and its uncertainty Ū <- beta2 Ū + (1 - beta2) |I - Ī|;
  a triplet's score is Ī Ū of E_i plus the mean of Ī Ū over row i of A and over column i of B;
- keep the budget b(t) best triplets over all layers and zero the E of the others:

      b(t) = init budget                                                 t <= tinit
             target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))³   (every deltaT steps)
             target = target_r * layers                                  t >= T - tfinal

  (T = total_step, by default the run's optimizer steps, counted from 1); from T - tfinal on
  the pattern is fixed and re-applied after every step;
- add orth_reg_weight * mean(||A Aᵀ - I||_F, ||Bᵀ B - I||_F) over the layers to the loss, which
  keeps A's rows and B's columns near orthonormal (so E's values act as singular values).

Trainable per adapted layer: init_r (d_in + d_out + 1). The file holds the kept triplets only,
with the pattern in its config (``rank_pattern``, as peft writes it): the parameter report's
``stored`` and ``ranks_kept`` count them. Mergeable: W = W0 + s B diag(E) A, unmerged by
subtracting it. Works on ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState
from ..core.method import Method, MethodConfig, PeftCodec, TrainingHooks, Tuning, add_deltas, deltas_of, register
from ..core.peft_keys import modules_with, refuse_unsupported, targets_from_peft
from ..hf.anatomy import query_and_value
from ..hf.layers import WeightDelta, linear_shape, linear_types

__all__ = ["AdaLoraConfig"]

FACTORS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoraConfig(MethodConfig):
    init_r: int = help_field(12, "Rank each adapted layer starts with.", range="[1, inf)")
    target_r: int = help_field(8, "Average rank per layer kept at the end (the budget is target_r x layers).",
                               range="[1, inf)")
    lora_alpha: float = help_field(8, "Scale numerator: the update is multiplied by lora_alpha / init_r.",
                                   range="(0, inf)")
    lora_dropout: float = help_field(0.0, "Dropout on the adapter's input.", range="[0, 1)")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's query and value projections.")
    tinit: int = help_field(0, "Steps trained at the initial budget before any rank is cut.", range="[0, inf)")
    tfinal: int = help_field(0, "Last steps trained with the final ranks fixed.", range="[0, inf)")
    deltaT: int = help_field(1, "Steps between two budget allocations while the budget shrinks.",
                             range="[1, inf)")
    beta1: float = help_field(0.85, "Smoothing of the importance estimates.", range="(0, 1)")
    beta2: float = help_field(0.85, "Smoothing of their uncertainty.", range="(0, 1)")
    orth_reg_weight: float = help_field(0.5, "Weight of the orthogonality regulariser on A and B.",
                                        range="[0, inf)")
    total_step: int | None = help_field(None, "Optimizer steps the schedule spans; default: the run's.",
                                        range="[1, inf)")
    init_lora_weights: bool = help_field(True, "Start E at zero and A, B ~ N(0, 0.02²), so a fresh adapter "
                                               "changes nothing (false: all three ~ N(0, 1)).")
    rank_pattern: dict[str, list[bool]] | None = help_field(
        None, "The triplets kept per module (True: kept), as a trained adapter's file records them; "
              "None: every layer at init_r.")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("adalora.target_modules is empty: AdaLoRA would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")
        if self.target_r > self.init_r:
            raise ConfigError(f"adalora.target_r = {self.target_r} is more than init_r = {self.init_r}: "
                              "AdaLoRA only cuts ranks.", "choose target_r <= init_r.")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        for name, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise ConfigError(f"adalora.rank_pattern['{name}'] has {len(kept)} entries for init_r = "
                                  f"{self.init_r} triplets.", "give one True/False per triplet.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.init_r + 1e-5)  # peft's scale, its 1e-5 included


def check_schedule(config: AdaLoraConfig, total: int) -> None:
    if config.tinit >= total - config.tfinal:
        raise ConfigError(f"adalora: tinit = {config.tinit} and tfinal = {config.tfinal} leave no step of "
                          f"the {total} to cut ranks in.", "lower tinit or tfinal, or train for more steps.")


class SvdDelta(WeightDelta):
    """s B diag(E) A beside one linear or Conv1D layer; ``kept`` marks the triplets that count."""

    def __init__(self, base: nn.Module, config: AdaLoraConfig, kept: list[bool] | None):
        super().__init__()
        in_features, out_features = linear_shape(base)
        r, self.scaling = config.init_r, config.scaling
        self.lora_A = nn.Parameter(torch.randn(r, in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.register_buffer("kept", torch.tensor(kept or [True] * r), persistent=False)
        self.cut()

    def cut(self) -> None:
        """Zero E where a triplet is not kept."""
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.kept[:, None], 0.0)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(args[0].to(self.lora_A.dtype))
        return out + (F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.scaling).to(out.dtype)

    def stored_state(self) -> dict[str, torch.Tensor]:
        if bool(self.kept.all()):
            return dict(self.named_parameters())
        kept = self.kept
        return {"lora_A": self.lora_A.detach()[kept], "lora_B": self.lora_B.detach()[:, kept],
                "lora_E": self.lora_E.detach()[kept]}

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        kept = self.kept
        with torch.no_grad():
            self.lora_A[kept] = tensors["lora_A"]
            self.lora_B[:, kept] = tensors["lora_B"]
            self.lora_E[kept] = tensors["lora_E"]
        self.cut()

    def rank(self) -> int:
        return int(self.kept.sum())


def svd_deltas(model: nn.Module, adapter_name: str) -> dict[str, SvdDelta]:
    """The adapter's triplets by module name (its ``modules_to_save`` copies left out)."""
    return {name: delta for name, _, delta in deltas_of(model, adapter_name) if isinstance(delta, SvdDelta)}


class RankAllocator(TrainingHooks):
    """AdaLoRA's schedule for one adapter that trains: importance estimates, budget, regulariser."""

    def __init__(self, config: AdaLoraConfig, deltas: dict[str, SvdDelta]):
        self.config, self.deltas = config, deltas
        #: smoothed importance Ī and uncertainty Ū, by "<module>.<factor>"
        self.importance: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @property
    def initial_budget(self) -> int:
        return self.config.init_r * len(self.deltas)

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.deltas)

    def start(self, total_steps: int) -> None:
        check_schedule(self.config, self.config.total_step or total_steps)

    def budget(self, step: int, total_steps: int) -> tuple[int, bool]:
        """(triplets to keep, whether to cut now) after optimizer step ``step`` of a run of ``total_steps``."""
        config = self.config
        final = (config.total_step or total_steps) - config.tfinal
        if step <= config.tinit:
            return self.initial_budget, False
        if step > final:
            return self.target_budget, True
        left = 1 - (step - config.tinit) / (final - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * left ** 3 + self.target_budget)
        return budget, step % config.deltaT == 0

    def extra_loss(self) -> torch.Tensor | None:
        if not self.config.orth_reg_weight:
            return None
        terms = []
        for delta in self.deltas.values():
            for gram in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):
                eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def after_step(self, step: int, total_steps: int) -> None:
        final = (self.config.total_step or total_steps) - self.config.tfinal
        if step < final:
            self._estimate_importance()
            budget, cut_now = self.budget(step, total_steps)
            if cut_now:
                self._keep_best(budget)
        elif step == final:
            self._keep_best(self.target_budget)
            self.importance, self.uncertainty = {}, {}
        else:
            for delta in self.deltas.values():
                delta.cut()

    def _estimate_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for name, delta in self.deltas.items():
                for factor in FACTORS:
                    p = getattr(delta, factor)
                    key = f"{name}.{factor}"
                    if key not in self.importance:
                        self.importance[key], self.uncertainty[key] = torch.zeros_like(p), torch.zeros_like(p)
                    now = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                    mean = beta1 * self.importance[key] + (1 - beta1) * now
                    self.uncertainty[key] = beta2 * self.uncertainty[key] + (1 - beta2) * (now - mean).abs()
                    self.importance[key] = mean

    def _score(self, name: str) -> torch.Tensor:
        """Each triplet's score: Ī Ū of E_i plus its mean over row i of A and column i of B."""
        def of(factor: str) -> torch.Tensor:
            key = f"{name}.{factor}"
            return self.importance[key] * self.uncertainty[key]

        return of("lora_E").view(-1) + (of("lora_A").mean(dim=1) + of("lora_B").mean(dim=0))

    def _keep_best(self, budget: int) -> None:
        if not self.importance:  # nothing estimated yet (a schedule with no step before it)
            return
        scores = {name: self._score(name) for name in self.deltas}
        cut = self.initial_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), cut).values.item() if cut > 0 else -math.inf
        for name, delta in self.deltas.items():
            delta.kept.copy_(scores[name] > threshold)
            delta.cut()

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.kept": delta.kept for name, delta in self.deltas.items()}
        tensors.update({f"{key}.importance": t for key, t in self.importance.items()})
        tensors.update({f"{key}.uncertainty": t for key, t in self.uncertainty.items()})
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, delta in self.deltas.items():
            delta.kept.copy_(tensors[f"{name}.kept"])
        self.importance = {k.removesuffix(".importance"): t for k, t in tensors.items() if k.endswith(".importance")}
        self.uncertainty = {k.removesuffix(".uncertainty"): t for k, t in tensors.items() if k.endswith(".uncertainty")}


class AdaLoraPeft(PeftCodec):
    """AdaLoRA adapters in peft's format: the same tensor names, the pattern keyed by ``<module>.lora_E``."""

    peft_type = "ADALORA"
    # LoRA fields peft's AdaLoRA config inherits and ignores (r: init_r is the rank)
    ignored = ("r", "fan_in_fan_out", "megatron_config", "megatron_core", "loftq_config", "eva_config",
               "corda_config", "qalora_group_size", "ensure_weight_tying", "arrow_config", "kasa_config",
               "lora_ga_config", "monteclora_config", "velora_config")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        pattern = peft.get("rank_pattern")
        return {"method": "adalora", "init_r": peft["init_r"], "target_r": peft["target_r"],
                "lora_alpha": peft["lora_alpha"], "lora_dropout": peft.get("lora_dropout", 0.0),
                "target_modules": targets_from_peft(peft["target_modules"]),
                **{k: peft[k] for k in ("tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")},
                "init_lora_weights": bool(peft.get("init_lora_weights", True)),
                "rank_pattern": {k.removesuffix(".lora_E"): v for k, v in pattern.items()} if pattern else None}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**{k: getattr(config, k) for k in ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit",
                                                      "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                                                      "init_lora_weights")},
                # peft requires a schedule that fits; it only matters for training
                "total_step": config.total_step or config.tinit + config.tfinal + 1,
                "target_modules": modules_with(tensors, "lora_A"), "bias": "none",
                "fan_in_fan_out": description.get("fan_in_fan_out", False),
                "rank_pattern": {f"{k}.lora_E": v for k, v in config.rank_pattern.items()} if config.rank_pattern else None}


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "bias": "none",
                    "exclude_modules": None, "use_rslora": False, "use_dora": False, "lora_bias": False,
                    "target_parameters": None, "trainable_token_indices": None, "layer_replication": None}


@register
class AdaLora(Method):
    name = "adalora"
    config_class = AdaLoraConfig
    family = "re-parameterisation"
    mergeable = True
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "init_r * (d_in + d_out + 1) per adapted layer (the file: the kept triplets)"
    shard_refusal = ("its rank allocator reads every triplet's whole weights and gradients between optimizer "
                     "steps and cuts ranks, which sharded parameters do not allow")

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "AdaLoRA")
        names = self.targets(model, entries, linear_types(), linear_types=linear_types())
        unknown = sorted(set(self.config.rank_pattern or {}) - set(names))
        if unknown:
            raise ConfigError(f"adalora.rank_pattern names '{unknown[0]}', which the adapter does not target.",
                              "load the adapter into the base model it was trained on.")
        return names

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        pattern = self.config.rank_pattern or {}
        add_deltas(model, plan, adapter_name, state, lambda base, name: SvdDelta(base, self.config, pattern.get(name)))

    def training_hooks(self, model: nn.Module, adapter_name: str) -> RankAllocator:
        if self.config.rank_pattern:
            raise ConfigError("this AdaLoRA adapter's ranks were already cut (its config has a rank_pattern): "
                              "training allocates the budget from init_r in every layer.",
                              "train a fresh AdaLoRA config (without rank_pattern), or train a LoRA.")
        return RankAllocator(self.config, svd_deltas(model, adapter_name))

    def saved_config(self, model: nn.Module, adapter_name: str) -> AdaLoraConfig:
        """The pattern kept, once a triplet was cut: the file holds only the kept triplets."""
        deltas = svd_deltas(model, adapter_name)
        if all(bool(d.kept.all()) for d in deltas.values()):
            return self.config
        return dataclasses.replace(self.config, rank_pattern={n: d.kept.tolist() for n, d in deltas.items()})

    def not_stored(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The triplets cut: they train (their E is zeroed after each cut), and the file leaves them out."""
        cut = {}
        for name, delta in svd_deltas(model, adapter_name).items():
            dropped = ~delta.kept
            cut.update({f"{name}.lora_A": delta.lora_A.detach()[dropped],
                        f"{name}.lora_B": delta.lora_B.detach()[:, dropped], f"{name}.lora_E": delta.lora_E.detach()[dropped]})
        return cut

    def report_figures(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        ranks = {name: delta.rank() for name, delta in svd_deltas(model, adapter_name).items()}
        return {"ranks_kept": sum(ranks.values()), "ranks_initial": self.config.init_r * len(ranks),
                "ranks_target": self.config.target_r * len(ranks), "rank_per_module": ranks}

    peft = AdaLoraPeft()
