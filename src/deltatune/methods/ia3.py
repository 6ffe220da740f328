"""(IA)^3: learned vectors that rescale keys, values and feed-forward activations (Liu et al.,
2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

    k = l_k * (W_k x + b_k)        v = l_v * (W_v x + b_v)       output scaling, l: d_out
    y = W_ff (l_ff * a) + b_ff                                   input scaling,  l: d_in

       x ──► W ──► (* l) ──►            a ──► (* l_ff) ──► W_ff ──►

Every l starts at ones, so a fresh adapter leaves the outputs unchanged. Trainable parameters:
d_out per output-scaled layer plus d_in per feed-forward layer (on BERT: 2 d + d_ff per block).
Keys and values are scaled on their outputs; the layers in ``feedforward_modules`` (default:
the feed-forward output projection) on their inputs, i.e. the activation. GPT-2's fused
``c_attn`` is the key and value projection at once: its whole output is scaled, as peft does.

Mergeable: output scaling multiplies the weight's rows and the bias, W <- diag(l) W and
b <- l * b; input scaling multiplies its columns, W <- W diag(l). Unmerging divides again, so it
restores the weights (up to rounding) only while no entry of l is zero: merging a zero entry is
refused. Vectors are stored as peft stores them, ``ia3_l`` shaped (d_out, 1) or (1, d_in), so
adapter files convert to peft's by a key prefix alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, MergeError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta, joined, per_row
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, iter_layers, register
from ..core.peft_keys import modules_with, targets_from_peft
from ..core.quantized import values_held
from ..core.targets import matches
from ..hf.anatomy import ANATOMIES, anatomy_of, model_type
from ..hf.layers import linear_shape, linear_types, weight_is_transposed

__all__ = ["IA3Config"]


@dataclass
class IA3Config(MethodConfig):
    target_modules: str | list[str] | None = help_field(
        None, "Modules to rescale: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's key, value and feed-forward output projections.")
    feedforward_modules: str | list[str] | None = help_field(
        None, "Which of the target_modules scale their input (the activation) instead of their "
              "output; [] for none. Default: the feed-forward output projections among the targets.")
    init_ia3_weights: bool = help_field(
        True, "Start every vector at ones (no change); False draws them from N(0, 1), as peft does.")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:  # [] feedforward_modules: none
            raise ConfigError("ia3.target_modules is empty.", "leave target_modules out for the architecture's "
                              "default, or name modules, e.g. ['key', 'value', 'output.dense'].")


class IA3Delta(Delta):
    """A learned vector ``l`` that scales one linear layer's output (or, feed-forward, its input)."""

    def __init__(self, base: nn.Module, feedforward: bool, init_ones: bool = True):
        super().__init__()
        d_in, d_out = linear_shape(base)
        shape = (1, d_in) if feedforward else (d_out, 1)  # peft's layout
        self.ia3_l = nn.Parameter(torch.ones(shape) if init_ones else torch.randn(shape))
        self.feedforward = feedforward
        # Which axis of the stored weight l scales: rows of (out, in) for output scaling, the
        # other axis for input scaling; Conv1D stores (in, out), which swaps them.
        self.scales_rows = feedforward == weight_is_transposed(base)

    def pre(self, args: tuple) -> tuple:
        if not self.feedforward:
            return args
        x = args[0]
        return ((x * self.ia3_l.flatten()).to(x.dtype), *args[1:])

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return out
        return (out * self.ia3_l.flatten()).to(out.dtype)

    @property
    def changes_input(self) -> bool:
        return self.feedforward

    @classmethod
    def post_rows(cls, deltas: list[Delta], rows: list[torch.Tensor], args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Output scaling: each row's own vector, gathered from all of them stacked."""
        index, owner = joined(rows)
        scales = torch.stack([d.ia3_l.flatten() for d in deltas])[owner]  # (rows, d_out)
        scaled = out[index] * per_row(scales, out)
        return out.index_copy(0, index, scaled.to(out.dtype))

    def _factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """l shaped to multiply the stored weight, and l for the bias (None: bias unchanged)."""
        scale = self.ia3_l.detach().flatten()  # in fp32: a bf16 base is rounded once, by the in-place op
        weight = scale[:, None] if self.scales_rows else scale[None, :]
        scales_bias = not self.feedforward and base.bias is not None
        return weight, scale if scales_bias else None

    def merge(self, base: nn.Module) -> None:
        zeros = int((self.ia3_l == 0).sum())
        if zeros:
            raise MergeError(f"an IA3 vector has {zeros} zero entries: merging would erase the "
                             "weights they scale, and unmerge could not restore them.",
                             "serve the adapter unmerged, or move those entries away from zero.")
        weight, bias = self._factors(base)
        base.weight.data *= weight
        if bias is not None:
            base.bias.data *= bias

    def unmerge(self, base: nn.Module) -> None:
        weight, bias = self._factors(base)
        base.weight.data /= weight
        if bias is not None:
            base.bias.data /= bias

    def changed_numel(self, base: nn.Module) -> int:
        _, bias = self._factors(base)
        return values_held(base.weight) + (base.bias.numel() if bias is not None else 0)


class IA3Peft(PeftCodec):
    """IA3 adapters in peft's format."""

    peft_type = "IA3"
    ignored = ("fan_in_fan_out", "init_ia3_weights")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        return {"method": "ia3", "target_modules": targets_from_peft(peft["target_modules"]),
                "feedforward_modules": targets_from_peft(peft.get("feedforward_modules"))}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        targets = modules_with(tensors, "ia3_l")
        # A feed-forward vector scales the layer's input: stored as (1, d_in), as peft stores it.
        feedforward = [m for m in targets if tensors[f"{m}.ia3_l"].shape[0] == 1]
        return {"target_modules": targets, "feedforward_modules": feedforward, "init_ia3_weights": True,
                "fan_in_fan_out": description.get("fan_in_fan_out", False)}


@register
class IA3(Method):
    name = "ia3"
    config_class = IA3Config
    family = "additive"
    mergeable = True
    count_formula = "d_out per output-scaled layer + d_in per feed-forward layer"
    # the (IA)^3 paper's; its vectors need larger steps than LoRA
    tuning = Tuning(default_learning_rate=3e-3, learning_rates=(1e-3, 3e-3, 1e-2))
    # a scale per feature: its weighted sum is the only combination peft defines (weights summing to
    # 1 keep the result a scale near 1)
    combinations = ("linear",)

    def combine(self, model: nn.Module, sources: dict[str, tuple[Method, float]],
                combination: Any) -> tuple[IA3Config, dict[str, dict[str, torch.Tensor]]]:
        """peft's IA3 add_weighted_adapter: each layer's vector is the weighted sum of the vectors
        the adapters have there."""
        tensors, feedforward = {}, []
        for module, layer in iter_layers(model):
            present = [(layer.deltas[n], w) for n, (_, w) in sources.items()
                       if isinstance(layer.deltas[n] if n in layer.deltas else None, IA3Delta)]
            if present:
                tensors[module] = {"ia3_l": sum(d.ia3_l.detach() * w for d, w in present)}
                feedforward += [module] if present[0][0].feedforward else []
        return IA3Config(target_modules=list(tensors), feedforward_modules=feedforward), tensors

    def plan(self, model: nn.Module) -> dict[str, bool]:
        """Module name -> whether it scales its input (feed-forward) rather than its output."""
        entries = self.config.target_modules
        if entries is None:
            roles = anatomy_of(model, "IA3's default target_modules")
            entries = list(dict.fromkeys(roles.key + roles.value + roles.ffn_out))
        targets = self.targets(model, entries, linear_types(), linear_types=linear_types())
        feedforward = self._feedforward(model, targets)
        return {name: name in feedforward for name in targets}

    def _feedforward(self, model: nn.Module, targets: list[str]) -> list[str]:
        entries = self.config.feedforward_modules
        if entries is None:  # the architecture's feed-forward outputs among the targets
            roles = ANATOMIES.get(model_type(model))
            ffn_out = roles.ffn_out if roles else []
            return [n for n in targets if any(matches(n, e) for e in ffn_out)]
        if not entries:  # every target scales its output
            return []
        names = self.targets(model, entries, linear_types(), "feedforward_modules", linear_types())
        outside = [n for n in names if n not in targets]
        if outside:
            raise ConfigError(f"ia3.feedforward_modules selects '{outside[0]}', which is not in "
                              "target_modules: feedforward_modules must be a subset of target_modules.",
                              "add the module to target_modules too, or drop it from feedforward_modules.")
        return names

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: dict[str, bool]) -> None:
        init = self.config.init_ia3_weights
        add_deltas(model, list(plan), adapter_name, state,
                   lambda base, name: IA3Delta(base, plan[name], init))

    peft = IA3Peft()
