"""LayerNorm tuning: train the normalisation layers alone (Zhao et al., 2024; peft's LN_TUNING).

    y = gamma' * (x - mean) / std + beta'        gamma', beta': trained copies of gamma, beta

Each normalisation layer (LayerNorm, RMSNorm, T5's LayerNorm: found by type) gets a trainable
copy that runs instead of the frozen original, so the smallest selective method there is:
2 d parameters per LayerNorm (d per RMSNorm, which has no shift), about 0.03% of BERT-base.
``target_modules`` names other modules where wanted (peft allows any module, and so does this);
each then trains as a whole copy. Mergeable: merging writes the copy's values into the original,
unmerging restores them, and a merged model costs exactly what the base costs. A fresh adapter
copies the base values, so the outputs do not change. Each row of a mixed batch can run its own
copies (every module they replace runs on its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, ModuleCopy
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, register
from ..core.peft_keys import TUNER_PREFIX, refuse_unsupported, targets_from_peft
from ..core.targets import iter_base_modules
from ..hf.layers import is_norm

__all__ = ["LNTuningConfig"]

PEFT_LAYERS = "ln_tuning_layers"  # peft's infix between a module's name and its copy's parameters


@dataclass
class LNTuningConfig(MethodConfig):
    target_modules: str | list[str] | None = help_field(
        None, "Modules to train as copies: names, dotted suffixes or 're:<regex>'. Default: every "
              "normalisation layer (LayerNorm, RMSNorm, ...) outside modules_to_save.")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("ln_tuning.target_modules is empty: LN tuning would train nothing.",
                              "leave it unset for every normalisation layer, or name modules.")


class LNTuningPeft(PeftCodec):
    """LN tuning in peft's format: a copy's parameters under ``<module>.ln_tuning_layers.``."""

    peft_type = "LN_TUNING"

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, {"exclude_modules": None})
        return {"method": "ln_tuning", "target_modules": targets_from_peft(peft["target_modules"])}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        saved = tuple(config.modules_to_save)
        targets = {k.rpartition(".")[0] for k in tensors}
        return {"target_modules": sorted(m for m in targets if not _in_saved(m, saved)), "exclude_modules": None}

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        targets = set(peft_config["target_modules"])
        out = {}
        for key, value in tensors.items():
            module, _, param = key.rpartition(".")
            out[TUNER_PREFIX + (f"{module}.{PEFT_LAYERS}.{param}" if module in targets else key)] = value
        return out

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(TUNER_PREFIX).replace(f".{PEFT_LAYERS}.", "."): v for k, v in tensors.items()}


def _in_saved(module: str, saved: tuple[str, ...]) -> bool:
    """Whether ``module`` lies in a module that ``modules_to_save`` names (an entry is a suffix)."""
    dotted = f".{module}."
    return any(f".{entry}." in dotted for entry in saved)


@register
class LNTuning(Method):
    name = "ln_tuning"
    config_class = LNTuningConfig
    family = "selective"
    mergeable = True
    # a few thousand scales and shifts: they take large steps
    tuning = Tuning(default_learning_rate=3e-3, learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "2 d per LayerNorm (d per RMSNorm), or every parameter of each target module"

    def plan(self, model: nn.Module) -> list[str]:
        saved = self.saved_modules(model)
        if self.config.target_modules is not None:
            names = self.targets(model, self.config.target_modules, (nn.Module,))
        else:
            names = [n for n, m in iter_base_modules(model) if is_norm(m)]
        names = [n for n in names if not any(n == s or n.startswith(s + ".") for s in saved)]
        if not names:
            raise ConfigError(f"ln_tuning found no normalisation layer to train in {type(model).__name__} "
                              "outside modules_to_save.", "name the modules in target_modules.")
        return [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: ModuleCopy(base))

    peft = LNTuningPeft()
