"""Bottleneck adapters: a small residual MLP after, or beside, a frozen sub-layer
(Houlsby et al., 2019; Pfeiffer et al., 2021; parallel: He et al., 2022).

    h' = h + s * W_up act(W_down h + b_down) + s * b_up      W_down: m x d,  W_up: d x m

       h ─────────────────────────────────────────┐
       └──► W_down ─► act ─► W_up ─► x s ────────► (+) ─► h'

``placement`` says where the adapters go, by architecture role (``hf.anatomy``):

- ``houlsby``: sequential, after the attention output projection and after the feed-forward
  output projection of every block (``h`` is that projection's output).
- ``pfeiffer``: sequential, after the feed-forward output projection only.
- ``parallel``: beside the whole feed-forward sub-layer, reading its input x:
  FFN(x) + s * W_up act(W_down x). BERT-family blocks end the sub-layer in
  LayerNorm(dense(a) + x) with x passed in as a second argument; there x becomes
  x + s * adapter(x), so the adapter's output joins the residual before that norm.

W_up and b_up start at zero, so a fresh adapter leaves every output unchanged.
Trainable parameters per adapter: 2 d m + d + m (down d m + m, up m d + d); Houlsby puts two
in each block (three in a T5 decoder block, which has two attention sub-layers).
Not mergeable: the activation between the projections is non-linear, so no base weight can
hold the adapter, and each one adds two small matrix products to inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta
from ..core.method import Method, MethodConfig, Tuning, add_deltas, register
from ..core.targets import matches
from ..hf.anatomy import ANATOMIES, anatomy_of, hidden_size, model_type
from ..hf.layers import linear_shape, linear_types

__all__ = ["AdapterConfig"]

@dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = help_field(64, "Width m of the bottleneck (down d -> m, up m -> d); at most d.",
                                 range="[1, inf)")
    activation: str = help_field("gelu", "Non-linearity between the projections: a transformers "
                                         "activation name (gelu, relu, silu, tanh, ...).")
    placement: Literal["houlsby", "pfeiffer", "parallel"] = help_field(
        "houlsby", "houlsby: after attention and feed-forward outputs; pfeiffer: after the "
                   "feed-forward output only; parallel: beside the feed-forward sub-layer.")
    scaling: float = help_field(1.0, "Factor s on the adapter's output.", range="(0, inf)")
    init: Literal["near_identity", "kaiming"] = help_field(
        "near_identity", "How the down-projection starts: N(0, 0.01^2) or kaiming-uniform. The "
                         "up-projection always starts at zero, so a fresh adapter changes nothing.")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to put adapters on, overriding placement's location: names, dotted "
              "suffixes, 're:<regex>' or 'all-linear'. Default: chosen by placement.")

    def validate(self) -> None:
        from transformers.activations import ACT2FN  # here: listing methods must not load transformers

        if self.activation not in ACT2FN:
            raise ConfigError(f"adapter.activation = {self.activation!r} is not a known activation.",
                              f"choose one of: {', '.join(sorted(ACT2FN))}.")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("adapter.target_modules is empty: no adapter would be added.",
                              "leave it out to use placement's location, or name modules.")


@dataclass(frozen=True)
class Site:
    """One adapter's place: the module, its widths, and where the adapter reads from.

    ``source_arg`` None: sequential, the adapter reads and adds to the module's output.
    0: parallel, it reads the first input and adds to the output. k > 0: parallel in a module
    that adds its input ``args[k]`` back itself (BertOutput); that argument gains the adapter.
    """

    name: str
    d_in: int
    d_out: int
    source_arg: int | None


class BottleneckDelta(Delta):
    """``s * W_up act(W_down x)`` added after (or beside) one module."""

    def __init__(self, site: Site, config: AdapterConfig):
        super().__init__()
        self.source_arg = site.source_arg
        self.scaling = config.scaling
        self.down = nn.Linear(site.d_in, config.bottleneck)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.activation]
        self.up = nn.Linear(config.bottleneck, site.d_out)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x.to(self.down.weight.dtype))))
        return (y * self.scaling).to(x.dtype)

    def pre(self, args: tuple) -> tuple:
        k = self.source_arg
        if not k:  # sequential, or parallel on the first input: handled in post
            return args
        if len(args) <= k:
            raise ConfigError(f"a parallel adapter expects the feed-forward input as positional "
                              f"argument {k}, but the module got {len(args)} positional arguments.",
                              "set target_modules to modules that take their input positionally.")
        return (*args[:k], args[k] + self.adapter(args[k]), *args[k + 1:])

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.source_arg is None:
            return out + self.adapter(out)
        if self.source_arg == 0:
            return out + self.adapter(args[0]).to(out.dtype)
        return out


@register
class Adapter(Method):
    name = "adapter"
    config_class = AdapterConfig
    family = "additive"
    tuning = Tuning(learning_rates=(3e-4, 1e-3, 3e-3))
    count_formula = "2 d m + d + m per adapter (houlsby: two per block, pfeiffer/parallel: one)"
    merge_refusal = ("the activation between its two projections is non-linear, so no base "
                     "weight can hold it")

    def plan(self, model: nn.Module) -> dict[str, Site]:
        parallel = self.config.placement == "parallel"
        supported = (nn.Module,) if parallel else linear_types()
        names = self.targets(model, self._entries(model), supported, linear_types=linear_types())
        sites = {name: _site(model, name, parallel) for name in names}
        for site in sites.values():
            _check_bottleneck(self.config.bottleneck, site)
        return sites

    def _entries(self, model: nn.Module) -> str | list[str]:
        if self.config.target_modules is not None:
            return self.config.target_modules
        roles = anatomy_of(model, f"adapter placement '{self.config.placement}'")
        by_placement = {"houlsby": roles.attn_out + roles.ffn_out, "pfeiffer": roles.ffn_out,
                        "parallel": roles.ffn}
        return list(dict.fromkeys(by_placement[self.config.placement]))

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: dict[str, Site]) -> None:
        add_deltas(model, list(plan), adapter_name, state, lambda _, name: BottleneckDelta(plan[name], self.config))


def _site(model: nn.Module, name: str, parallel: bool) -> Site:
    module = model.get_submodule(name)
    if isinstance(module, linear_types()):
        d_in, d_out = linear_shape(module)
    else:  # a whole sub-layer (parallel): it maps the hidden state to itself
        d_in = d_out = hidden_size(model)
    if not parallel:
        return Site(name, d_out, d_out, None)
    return Site(name, d_in, d_out, _input_arg(model, name))


def _input_arg(model: nn.Module, name: str) -> int:
    """Which positional argument is the feed-forward input: the anatomy's for its ``ffn`` role."""
    if model_type(model) not in ANATOMIES:
        return 0
    roles = ANATOMIES[model_type(model)]
    return roles.ffn_input_arg if any(matches(name, entry) for entry in roles.ffn) else 0


def _check_bottleneck(bottleneck: int, site: Site) -> None:
    width = min(site.d_in, site.d_out)
    if bottleneck > width:
        raise ConfigError(f"adapter.bottleneck = {bottleneck} is larger than the hidden size {width} "
                          f"at '{site.name}': the adapter would widen, not compress.",
                          f"use a bottleneck of at most {width} (typical: {max(1, width // 16)} "
                          f"to {max(1, width // 4)}).")
