"""BitFit: train only the bias terms (Ben Zaken et al., 2022).

    y = W x + (b + Δb)          W and b frozen; Δb trained, starting at zero

Every ``nn.Linear``, transformers ``Conv1D`` and ``nn.LayerNorm`` with a bias gets a trainable
change Δb of the bias's size, added to its output (a LayerNorm's bias is added at its output
too). Modules whose bias is not added along the last axis (``nn.Conv1d``, batch norm) are
skipped, and so are the task-head modules in ``modules_to_save``, which train in full.

Trainable = stored = the number of bias elements (about 0.1% of BERT-base), plus any heads.
Mergeable: b <- b + Δb, and unmerging subtracts Δb again. The adapter file holds the *change*
Δb under the bias's own key (``bert.encoder.layer.0.attention.self.query.bias``): loading adds
it to the base model's bias, it does not replace it. Architectures without biases (LLaMA, T5)
have nothing for BitFit to train, and ``apply`` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layer import AdapterState, Delta, joined, per_row
from ..core.method import Method, MethodConfig, Tuning, add_deltas, register
from ..core.targets import iter_base_modules
from ..hf.layers import linear_types

__all__ = ["BitFitConfig"]

# Modules whose bias lies along the output's last axis, so a change can be added at the output.
@dataclass
class BitFitConfig(MethodConfig):
    """No options: every bias outside ``modules_to_save`` trains."""


class BiasDelta(Delta):
    """A trainable change to one module's bias, added at its output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(base.bias.shape))  # stored under "<module>.bias"

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + self.bias.to(out.dtype)

    @classmethod
    def post_rows(cls, deltas: list[Delta], rows: list[torch.Tensor], args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Each row's own bias, gathered from all of them stacked: one addition for the batch."""
        index, owner = joined(rows)
        biases = torch.stack([d.bias for d in deltas])[owner].to(out.dtype)  # (rows, d)
        return out.index_add(0, index, per_row(biases, out).expand_as(out[index]))

    def merge(self, base: nn.Module) -> None:
        base.bias.data += self.bias.detach()

    def unmerge(self, base: nn.Module) -> None:
        base.bias.data -= self.bias.detach()

    def changed_numel(self, base: nn.Module) -> int:
        return base.bias.numel()


def has_bias(module: nn.Module) -> bool:
    return isinstance(module, (*linear_types(), nn.LayerNorm)) and isinstance(getattr(module, "bias", None), nn.Parameter)


@register
class BitFit(Method):
    name = "bitfit"
    config_class = BitFitConfig
    family = "selective"
    mergeable = True
    # biases move little per step: the upper end
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "the number of bias elements (outside modules_to_save)"

    def plan(self, model: nn.Module) -> list[str]:
        saved = self.saved_modules(model)
        names = [name for name, module in iter_base_modules(model) if has_bias(module)
                 and not any(name == s or name.startswith(s + ".") for s in saved)]
        if not names:
            where = " outside modules_to_save" if saved else ""
            raise ConfigError(f"bitfit found no bias to train in {type(model).__name__}{where}: "
                              "its linear and layer-norm modules have no bias terms.",
                              "use a method that adapts weights instead, such as lora or ia3.")
        return names

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: BiasDelta(base))
