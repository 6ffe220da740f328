"""The optimizer's parameter groups: one rule for weight decay, and LoRA+'s rates.

Weight decay never applies to biases and the weights of normalisation layers, found by module
type (LayerNorm, RMSNorm, T5's LayerNorm...), not by name: GPT-2's ``ln_1.weight`` and LLaMA's
``input_layernorm.weight`` are norms too. Plain training and LoRA+ use the same rule.

LoRA+ (Hayou et al., 2024): B learns faster than A.

In ``h = W0 x + B A x`` with a wide layer, one learning rate for both factors is too small for B
or too large for A; LoRA+ trains B at ``ratio`` times A's rate (16 is the paper's usual value),
which reaches LoRA's quality in fewer steps. The groups are those of peft's
``create_loraplus_optimizer`` (and of the paper's code), for the same model and arguments:

    group            parameters                                       lr             weight decay
    A                every other trainable matrix (A, task heads)     lr             weight_decay
    embedding        both factors of a LoRA on an embedding           lr_embedding   weight_decay
    B                the B matrices, other 1-D parameters              lr * ratio     weight_decay
    B, no decay      biases and norm weights                          lr * ratio     0

Which matrices are B is each delta's to say (``Delta.factor_roles``); the rest is by shape.
Norm weights are found by module type, so an RMSNorm's weight does not decay either (peft's rule
knows only ``nn.LayerNorm``).
"""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError
from ..core.method import iter_layers, registered
from ..core.verbs import require_state
from ..hf.layers import is_norm


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups over the trainable parameters: decay, and no decay on biases and norms."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """The optimizer's parameter groups for LoRA+ over the model's trainable parameters.

    >>> optimizer = torch.optim.AdamW(dt.loraplus_param_groups(model, lr=2e-4, ratio=16))

    Args:
        model: a model with a deltatune adapter whose method is ``tuning.factored`` (LoRA).
        lr: A's learning rate (and the optimizer's).
        ratio: B's learning rate over A's (``training.loraplus_lr_ratio``); at least 1.
        weight_decay: for every group but biases and norms.
        lr_embedding: the learning rate of a LoRA's factors on an embedding layer.

    Returns:
        Up to four groups, ``{"params", "lr", "weight_decay"}`` each, in peft's order; empty
        groups are left out. A learning-rate scheduler scales each group's rate alike.

    Raises:
        ConfigError: no adapter, no B matrix to train faster, or a bad number.
    """
    _check_numbers(lr=(lr, 0), ratio=(ratio, 1), weight_decay=(weight_decay, 0), lr_embedding=(lr_embedding, 0))
    roles = factor_roles(model)
    skip = no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B no decay": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # 1-D parameters join B, as in peft and the paper's code: they act on the output side.
            role = roles.get(name) or ("B" if param.ndim == 1 else "A")
            groups["B no decay" if role == "B" and name in skip else role].append(param)
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * ratio, weight_decay), "B no decay": (lr * ratio, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key, params in groups.items() if params]


def factor_roles(model: nn.Module) -> dict[str, str]:
    """``"B"`` or ``"embedding"`` by parameter name, over every adapter of the model.

    Raises:
        ConfigError: the model has no adapter, or none whose method has B matrices.
    """
    state = require_state(model)
    roles = {f"{name}.deltas.{adapter}.{key}": role for name, layer in iter_layers(model)
             for adapter, delta in layer.deltas.items() for key, role in delta.factor_roles().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not roles.keys() & trainable:
        methods = ", ".join(sorted({m.name for m in state.methods.values()}))
        factored = ", ".join(n for n, cls in sorted(registered().items()) if cls.tuning.factored)
        raise ConfigError(f"LoRA+ trains B matrices faster, but the model's adapters ({methods}) train none.",
                          f"apply a method whose update is a product B A ({factored}), or build the "
                          "optimizer's groups without LoRA+.")
    return roles


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of normalisation layers (LayerNorm, RMSNorm, ...), found by module."""
    names = set()
    for module_name, module in model.named_modules():
        norm = is_norm(module)
        for key, _ in module.named_parameters(recurse=False):
            if key == "bias" or norm:
                names.add(f"{module_name}.{key}" if module_name else key)
    return names


def _check_numbers(**values: tuple[float, float]) -> None:
    """Each value (a finite number) at least its bound."""
    for key, (value, low) in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < float("inf"):
            raise ConfigError(f"{key} = {value!r} must be a finite number, at least {low}.",
                              "e.g. ratio=16 (the paper's usual value)." if key == "ratio" else None)
