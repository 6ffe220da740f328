"""OFT: orthogonal fine-tuning, a trained rotation of each adapted layer's input (Qiu et al., 2023,
"Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; peft's OFT, its 0.18 form).

    h = W0 R x + b        R = diag(R_1, ..., R_n), each block k x k orthogonal, n k = d_in
    R_i = Cayley(Q_i),    Q_i = -Q_iᵀ, built from the k (k - 1) / 2 trained numbers above its diagonal

Rotating the input by an orthogonal R keeps the angles between W0's rows (its neurons): the
pre-trained structure moves as a whole. ``use_cayley_neumann`` (the default, as peft) computes
R_i = I + 2 Q + 2 Q² + ... + 2 Q^(t-2) + Q^(t-1) (t = num_cayley_neumann_terms >= 4, as peft), the
truncated series of (I + Q)(I - Q)⁻¹, which is orthogonal up to the truncation; without it, the exact
Cayley transform (I - Q)(I + Q)⁻¹. Q starts at zero, so R = I and a fresh adapter changes
nothing. Size the blocks with ``oft_block_size`` (k) or their number with ``r`` (n), not both.

Trainable per adapted layer: n k (k - 1) / 2 (``block_share``: one block for all, k (k - 1) / 2).
Mergeable: W = W0 R, computed once; unmerging solves W0 R = W for W0 (exact to rounding: R is
near orthogonal, so well conditioned). In training, ``module_dropout`` replaces that fraction of
the blocks by the identity in each forward pass (peft 0.21 defines this dropout but does not
apply it). Works on ``nn.Linear`` and transformers' ``Conv1D``; peft's OFT has no Conv1D layer,
so adapters on GPT-2's Conv1D layers stay in deltatune's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from ..core.errors import AdapterFileError, ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, register
from ..core.peft_keys import modules_with, refuse_unsupported, targets_from_peft
from ..core.quantized import values_held
from ..hf.anatomy import query_and_value
from ..hf.layers import linear_shape, linear_types, oriented_weight

__all__ = ["OFTConfig"]

NEUMANN_SINCE = "0.18.0"  # peft changed its Cayley-Neumann series then


@dataclass
class OFTConfig(MethodConfig):
    r: int = help_field(0, "Number of blocks per adapted layer (0: set by oft_block_size).", range="[0, inf)")
    oft_block_size: int = help_field(32, "Size of each orthogonal block (0: set by r); must divide the "
                                         "layer's input size.", range="[0, inf)")
    module_dropout: float = help_field(0.0, "In training, the fraction of blocks replaced by the identity "
                                            "in each forward pass.", range="[0, 1)")
    target_modules: str | list[str] | None = help_field(
        None, "Modules to adapt: names, dotted suffixes, 're:<regex>', or 'all-linear'. "
              "Default: the architecture's query and value projections.")
    init_weights: bool = help_field(True, "Start at the identity rotation (false: random, std 0.1).")
    block_share: bool = help_field(False, "One block shared by all the blocks of a layer.")
    use_cayley_neumann: bool = help_field(True, "The truncated Neumann series of the Cayley transform "
                                                "(faster; orthogonal up to the truncation).")
    num_cayley_neumann_terms: int = help_field(5, "Terms of that series.", range="[1, inf)")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("oft.target_modules is empty: OFT would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")
        if self.r and self.oft_block_size:
            raise ConfigError(f"oft.r = {self.r} and oft_block_size = {self.oft_block_size} are both set: blocks "
                              "x block size is the input size, so exactly one of them is given.",
                              "set the other to 0 (e.g. oft_block_size: 32, r: 0).")
        if not (self.r or self.oft_block_size):
            raise ConfigError("oft.oft_block_size = 0 and r = 0: one of them sets the blocks.",
                              "give a block size (e.g. oft_block_size: 32) or a number of blocks (r).")

    def blocks(self, in_features: int) -> tuple[int, int] | None:
        """(blocks, block size) for a layer with ``in_features`` inputs; None when they do not divide it."""
        given = self.r or self.oft_block_size
        if given > in_features or in_features % given:
            return None
        return (self.r, in_features // self.r) if self.r else (in_features // self.oft_block_size, self.oft_block_size)


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest ``value`` (the lower one on a tie), for the error's fix."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - value), d))


class OrthogonalDelta(Delta):
    """Rotates the input of one linear or Conv1D layer by a block-diagonal orthogonal matrix."""

    def __init__(self, base: nn.Module, config: OFTConfig):
        super().__init__()
        in_features, _ = linear_shape(base)
        self.n_blocks, self.block_size = config.blocks(in_features)
        self.config = config
        self.oft_R = nn.Module()  # peft's key: <module>.oft_R.weight
        k = self.block_size
        self.oft_R.weight = nn.Parameter(torch.zeros(1 if config.block_share else self.n_blocks, k * (k - 1) // 2))
        if not config.init_weights:
            nn.init.normal_(self.oft_R.weight, std=0.1)
        rows, cols = torch.triu_indices(k, k, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> torch.Tensor:
        """The blocks R_i, (n, k, k)."""
        vec = self.oft_R.weight
        k = self.block_size
        upper = vec.new_zeros(len(vec), k, k)
        upper[:, self.rows, self.cols] = vec
        q = upper - upper.transpose(-2, -1)
        eye = torch.eye(k, dtype=vec.dtype, device=vec.device).expand_as(q)
        if self.config.use_cayley_neumann:
            blocks = self._neumann(q, eye)
        else:
            blocks = torch.linalg.solve(eye + q, eye - q, left=False)
        return blocks.expand(self.n_blocks, k, k) if self.config.block_share else blocks

    def _neumann(self, q: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
        """peft's series term for term: t = 1 is I, t = 2 is I + 2Q, and t = 3 computes as t = 4."""
        terms = self.config.num_cayley_neumann_terms
        if terms == 1:
            return eye.clone()
        rotation = eye + 2 * q
        if terms == 2:
            return rotation
        power = q @ q
        rotation = rotation + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            rotation = rotation + 2 * power
        return rotation + power @ q

    def _dropped(self, blocks: torch.Tensor) -> torch.Tensor:
        """In training, ``module_dropout`` of the blocks replaced by the identity."""
        count = int(self.config.module_dropout * self.n_blocks)
        if not (self.training and count) or self.config.block_share:
            return blocks
        drop = torch.zeros(self.n_blocks, 1, 1, dtype=blocks.dtype, device=blocks.device)
        drop[torch.randperm(self.n_blocks, device=blocks.device)[:count]] = 1
        eye = torch.eye(self.block_size, dtype=blocks.dtype, device=blocks.device)
        return (1 - drop) * blocks + drop * eye

    def pre(self, args: tuple) -> tuple:
        x, *rest = args
        blocks = self._dropped(self.rotations())
        rows = x.to(blocks.dtype).reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        rotated = torch.einsum("...nk,nkc->...nc", rows, blocks).reshape(x.shape)
        return (rotated.to(x.dtype), *rest)

    def rotation(self) -> torch.Tensor:
        """The whole block-diagonal matrix, as the input is multiplied by it: x (as a row) -> x M."""
        return torch.block_diag(*self.rotations())

    def merge(self, base: nn.Module) -> None:
        weight = oriented_weight(base)
        rotation = self.rotation().detach()
        weight.copy_(weight.to(rotation.dtype) @ rotation.T)  # h = W0 (x M)ᵀ = W0 Mᵀ x

    def unmerge(self, base: nn.Module) -> None:
        weight = oriented_weight(base)
        rotation = self.rotation().detach()
        weight.copy_(torch.linalg.solve(rotation, weight.to(rotation.dtype).T).T)  # W Mᵀ = W' for W

    def changed_numel(self, base: nn.Module) -> int:
        return values_held(base.weight)


class OFTPeft(PeftCodec):
    """OFT adapters in peft's format (the same tensor names, under peft's prefix)."""

    peft_type = "OFT"
    ignored = ("eps", "fan_in_fan_out")  # eps: only with coft, refused; fan_in_fan_out: Conv1D, kept out

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        neumann = peft.get("use_cayley_neumann", False)
        if neumann and Version(str(peft.get("peft_version") or "0").partition("@")[0]) < Version(NEUMANN_SINCE):
            raise AdapterFileError(f"this peft OFT adapter was saved before peft {NEUMANN_SINCE}, whose "
                                   "Cayley-Neumann series differs from the one deltatune (and peft now) computes.",
                                   "retrain it with peft >= 0.18, or without use_cayley_neumann.")
        return {"method": "oft", "r": peft.get("r", 0), "oft_block_size": peft["oft_block_size"],
                "module_dropout": peft.get("module_dropout", 0.0),
                "target_modules": targets_from_peft(peft["target_modules"]),
                "init_weights": bool(peft.get("init_weights", True)), "block_share": bool(peft.get("block_share")),
                "use_cayley_neumann": bool(neumann),
                "num_cayley_neumann_terms": peft.get("num_cayley_neumann_terms", 5)}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if description.get("fan_in_fan_out"):
            raise AdapterFileError("this OFT adapter changes Conv1D layers (GPT-2's), and peft's OFT has no "
                                   "Conv1D layer to load them into.", "keep the deltatune format for it.")
        return {"r": config.r, "oft_block_size": config.oft_block_size, "module_dropout": config.module_dropout,
                "target_modules": modules_with(tensors, "oft_R"), "init_weights": config.init_weights,
                "block_share": config.block_share, "use_cayley_neumann": config.use_cayley_neumann,
                "num_cayley_neumann_terms": config.num_cayley_neumann_terms, "coft": False, "eps": 6e-5,
                "bias": "none", "fan_in_fan_out": False,
                # the series computed here is peft's since this version; without one peft warns of an older file
                "peft_version": NEUMANN_SINCE}


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"coft": False, "bias": "none", "layers_to_transform": None, "layers_pattern": None,
                    "exclude_modules": None}


@register
class OFT(Method):
    name = "oft"
    config_class = OFTConfig
    family = "re-parameterisation"
    mergeable = True
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2))
    count_formula = "d_in / k * k (k - 1) / 2 per adapted layer (k: oft_block_size; one block with block_share)"

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "OFT")
        names = self.targets(model, entries, linear_types(), linear_types=linear_types())
        for name in names:
            in_features, _ = linear_shape(model.get_submodule(name))
            if self.config.blocks(in_features) is None:
                field = "r" if self.config.r else "oft_block_size"
                given = getattr(self.config, field)
                raise ConfigError(f"oft.{field} = {given} does not divide the {in_features} inputs of '{name}'.",
                                  f"choose a divisor of {in_features}, e.g. {field}: "
                                  f"{nearest_divisor(in_features, given)}.")
        return names

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        add_deltas(model, plan, adapter_name, state, lambda base, _: OrthogonalDelta(base, self.config))

    peft = OFTPeft()
