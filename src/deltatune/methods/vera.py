"""VeRA: one pair of frozen random matrices for all layers, two trained vectors per layer
(Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation").

    h = W0 x + lambda_b * (B (lambda_d * (A dropout(x))))
        A: r x max_in, B: max_out x r   frozen, random, shared by every adapted layer
        lambda_d: r (starts at d_initial), lambda_b: d_out (starts at zero)   trained, per layer

       x ──► W0 ─────────────────────────────────────────────┐
       └─► dropout ─► A[:, :d_in] ─► *lambda_d ─► B[:d_out] ─► *lambda_b ─► (+) ─► h

lambda_b starts at zero, so a fresh adapter leaves the outputs unchanged. A and B are drawn
once per adapter from ``projection_prng_key`` with Kaiming-uniform bounds, exactly as peft
draws them (CPU generator, A first), sized for the widest input and output among the targets;
each layer uses its top-left slice. Trained per adapted layer: r + d_out. The file holds those,
plus A and B once (r * max_in + max_out * r) when ``save_projection``; without it they are
regenerated from the seed on load, and the parameter report counts them as regenerable.
Mergeable: W = W0 + diag(lambda_b) B diag(lambda_d) A (transposed for GPT-2's ``Conv1D``);
unmerging subtracts the same product. Works on ``nn.Linear`` and transformers' ``Conv1D``.

Where A and B live: in one small :class:`VeraProjections` module per adapter, holding them as
buffers. Every :class:`VeraDelta` of that adapter registers this same object as its submodule
``projections`` (a reference, not a copy), so ``model.to(device)`` or ``.half()`` moves the one
pair every layer reads, ``named_modules()`` finds it once by walking the model (it deduplicates
shared modules), and no name is ever matched. The buffers are not persistent: the model's
``state_dict`` does not repeat A and B per layer; the adapter file holds them once, under
``vera_A`` / ``vera_B``, through :meth:`Vera.extra_state`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, deltas_of, register
from ..core.peft_keys import TUNER_PREFIX, modules_with, refuse_unsupported, targets_from_peft
from ..core.quantized import values_held
from ..hf.anatomy import query_and_value
from ..hf.layers import linear_shape, linear_types, weight_is_transposed

__all__ = ["VeraConfig"]

PROJECTION_KEYS = ("vera_A", "vera_B")  # file keys of the shared projections
PEFT_TUNER = "base_model."  # peft keeps them on its tuner, beside the model: base_model.vera_A


@dataclass
class VeraConfig(MethodConfig):
    r: int = help_field(256, "Rank of the shared random projections; larger than LoRA ranks (only "
                             "r + d_out per layer train).", range="[1, inf)")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt (linear or Conv1D): names, dotted suffixes, 're:<regex>', or "
              "'all-linear'. Default: the architecture's query and value projections.")
    projection_prng_key: int = help_field(
        0, "Seed of the random projections A and B (the same seed gives the same A and B as peft).",
        range="[0, 18446744073709551615]")
    save_projection: bool = help_field(
        True, "Store A and B in the adapter file; False stores only the vectors and regenerates "
              "A and B from projection_prng_key on load.")
    vera_dropout: float = help_field(0.0, "Dropout on the adapter's input.", range="[0, 1)", typical=0.05)
    d_initial: float = help_field(0.1, "Starting value of every lambda_d entry (small values, "
                                       "<= 0.1, work best); any value but 0.", range="(-inf, inf)", typical=0.1)

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("vera.target_modules is empty: VeRA would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")
        if self.d_initial == 0:
            raise ConfigError("vera.d_initial = 0 would train nothing: with lambda_b starting at zero too, "
                              "neither vector gets a gradient.", "e.g. d_initial: 0.1.")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random A (r x max_in) and B (max_out x r) all of one adapter's layers share."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # The order matters: A then B from one generator, as peft draws them.
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator), persistent=False)


class VeraDelta(Delta):
    """``lambda_b * (B (lambda_d * (A dropout(x))))`` added to one linear or Conv1D layer's output."""

    def __init__(self, base: nn.Module, projections: VeraProjections, d_initial: float, dropout: float = 0.0):
        super().__init__()
        self.d_in, self.d_out = linear_shape(base)
        r = projections.vera_A.shape[0]
        self.projections = projections  # the adapter's one shared module, registered here by reference
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.fan_in_fan_out = weight_is_transposed(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's part of the shared projections: A[:, :d_in] and B[:d_out, :]."""
        a = self.projections.vera_A[:, :self.d_in].to(device)  # (r, d_in)
        b = self.projections.vera_B[:self.d_out, :].to(device)  # (d_out, r)
        return a, b

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(args[0].to(self.vera_lambda_d.dtype))
        a, b = self.sliced(x.device)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_b) B diag(lambda_d) A in the base weight's own layout."""
        a, b = self.sliced(self.vera_lambda_d.device)
        weight = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)  # (d_out, d_in)
        return weight.T if self.fan_in_fan_out else weight

    def merge(self, base: nn.Module) -> None:
        base.weight.data += self.delta_weight()  # computed in fp32, rounded once to a bf16 base

    def unmerge(self, base: nn.Module) -> None:
        base.weight.data -= self.delta_weight()

    def changed_numel(self, base: nn.Module) -> int:
        return values_held(base.weight)


def projections_of(model: nn.Module, adapter_name: str) -> VeraProjections:
    """The adapter's shared projections, found by walking its deltas."""
    return next(d.projections for _, _, d in deltas_of(model, adapter_name) if isinstance(d, VeraDelta))


class VeraPeft(PeftCodec):
    """VeRA adapters in peft's format (the shared projections under peft's own keys)."""

    peft_type = "VERA"
    ignored = ("fan_in_fan_out", "init_weights")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, {"bias": "none", "layers_to_transform": None, "layers_pattern": None})
        return {"method": "vera", "r": peft["r"], "target_modules": targets_from_peft(peft["target_modules"]),
                "projection_prng_key": peft.get("projection_prng_key", 0),
                "save_projection": peft.get("save_projection", True),
                "vera_dropout": peft.get("vera_dropout", 0.0), "d_initial": peft.get("d_initial", 0.1)}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"r": config.r, "target_modules": modules_with(tensors, "vera_lambda_d"),
                "projection_prng_key": config.projection_prng_key, "save_projection": config.save_projection,
                "vera_dropout": config.vera_dropout, "d_initial": config.d_initial,
                "fan_in_fan_out": description.get("fan_in_fan_out", False), "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {(PEFT_TUNER if k in PROJECTION_KEYS else TUNER_PREFIX) + k: v for k, v in tensors.items()}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> dict[str, torch.Tensor]:
        projections = {PEFT_TUNER + k: k for k in PROJECTION_KEYS}
        return {projections.get(k) or k.removeprefix(TUNER_PREFIX): v for k, v in tensors.items()}


@register
class Vera(Method):
    name = "vera"
    config_class = VeraConfig
    family = "re-parameterisation"
    mergeable = True
    count_formula = ("r + d_out per adapted layer (trained); stored adds A and B once, "
                     "r * max_in + max_out * r, when save_projection (regenerable from the seed)")
    # Scaling vectors on fixed random matrices need large steps: the paper trains them at ~1e-2.
    tuning = Tuning(default_learning_rate=1e-2, learning_rates=(3e-3, 1e-2, 3e-2, 1e-1))

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "VeRA")
        return self.targets(model, entries, linear_types(), linear_types=linear_types())

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        shapes = [linear_shape(model.get_submodule(name)) for name in plan]
        config = self.config
        projections = VeraProjections(config.r, max(s[0] for s in shapes), max(s[1] for s in shapes),
                                      config.projection_prng_key)
        add_deltas(model, plan, adapter_name, state,
                   lambda base, _: VeraDelta(base, projections, config.d_initial, config.vera_dropout))

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.regenerable(model, adapter_name) if self.config.save_projection else {}

    def regenerable(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        projections = projections_of(model, adapter_name)
        return {key: getattr(projections, key) for key in PROJECTION_KEYS}

    peft = VeraPeft()
