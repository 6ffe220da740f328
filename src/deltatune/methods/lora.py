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

Two options change the update (s = alpha/r; ||.||_c: the norm of each output feature's row).

DoRA, ``use_dora=True`` (Liu et al., 2024): a trained magnitude m (d_out) times a direction that
LoRA moves; n takes no gradient (the paper, section 4.3). With x' = dropout(x), as peft does:

    W' = m / n * (W0 + s B A),   n = ||W0 + s B A||_c
    h  = W0 x + b + (m/n - 1) W0 x' + (m/n) s B A x'

m starts at ||W0||_c, so m/n = 1 at start. Trainable: r (d + k) + d per layer. Merging writes
W' and keeps n for unmerging: W0 = W' n / m - s B A.

PiSSA, ``init="pissa"`` (Meng et al., 2024): A and B start from W0's top-r singular triplets,
s B0 A0 = U_r S_r V_r^T, and stay beside a frozen copy of that start:

    h = W0 x + s (B A - B0 A0) x   ==   (W0 - s B0 A0) x + s B A x

the residual base plus B A, with the same gradients for A and B, while W0 itself is never
rewritten (disabling gives the original base). The update is computed as
s ((B - B0) A + B0 (A - A0)) x: the same product, and exactly zero at the start on any CPU.
A file holds the plain rank-2r LoRA this equals, B' = [B, -B0], A' = [A; A0] with alpha
scaled to keep s, so any LoRA reader loads it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.combine import COMBINATIONS, Combination, merged, truncated
from ..core.errors import AdapterFileError, ConfigError, warn_user
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta, DeltaLayer, joined, per_row
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, add_deltas, iter_layers, register
from ..core.peft_keys import TUNER_PREFIX, modules_with, refuse_unsupported, targets_from_peft
from ..core.quantized import is_quantized, values_held, weight_values
from ..hf.anatomy import query_and_value
from ..hf.layers import linear_shape, linear_types, weight_is_transposed

__all__ = ["LoraConfig", "LoRALinear"]

INITS = re.compile(r"kaiming|gaussian|pissa(_niter_\d+)?")


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
    use_dora: bool = help_field(False, "DoRA: also train a magnitude per output feature; B A moves the "
                                       "direction of W0 (+ d_out parameters per layer).")
    init: str = help_field(
        "kaiming", "How A and B start: 'kaiming' (A Kaiming-uniform, B zero), 'gaussian' (A ~ N(0, 1/r), "
                   "B zero), 'pissa' (from W0's top-r singular vectors, PiSSA; linear layers only) or "
                   "'pissa_niter_N' (the same by randomised SVD with N iterations: fast on large layers).")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora.target_modules is empty: LoRA would adapt nothing.",
                              "name modules, e.g. ['query', 'value'], or use 'all-linear'.")
        if not INITS.fullmatch(self.init):
            raise ConfigError(f"lora.init = {self.init!r} is not a start LoRA knows.",
                              "use 'kaiming', 'gaussian', 'pissa' or 'pissa_niter_N' (e.g. pissa_niter_4).")

    @property
    def pissa(self) -> bool:
        return self.init.startswith("pissa")

    @property
    def variant(self) -> str:  # compare's row name: lora, rslora, dora, pissa, pissa-dora-rslora...
        options = [name for name, on in (("pissa", self.pissa), ("dora", self.use_dora), ("rslora", self.use_rslora)) if on]
        return "-".join(options) or self.method

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraDelta(Delta):
    """What every form of LoRA shares: an update ``s * product`` beside one frozen weight (s = alpha/r),
    added to the output, merged by adding it to the weight and unmerged by subtracting it.

    The forms, each a small class below: :class:`PlainLora` (linear and Conv1D layers),
    :class:`EmbeddingLora`, :class:`PissaLora` (a linear LoRA beside its frozen start), and DoRA
    (:class:`Dora`) on any of them. A weight "oriented" is (d_out, d_in): Conv1D and embeddings
    store theirs the other way.
    """

    #: True when the update is s B A x alone: fused into the base output's matmul, and computed
    #: for every adapter of a per-row batch at once (``post_rows``)
    plain: ClassVar[bool] = False
    #: the stored keys of A (r, d_in) and B (d_out, r), in peft's layout
    factor_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base: nn.Module, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.scaling = scaling
        self.transposed = isinstance(base, nn.Embedding) or weight_is_transposed(base)
        self._base = (base,)  # DoRA reads W0 and the bias; a tuple, so the base is no submodule of ours
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """A base-layout weight as (d_out, d_in) (a view: writing to it writes the base)."""
        return weight.T if self.transposed else weight

    def product(self) -> torch.Tensor:
        """B A, oriented (d_out, d_in)."""
        raise NotImplementedError(f"{type(self).__name__}.product")

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x for the adapter's input x (as ``adapter_input`` gives it)."""
        raise NotImplementedError(f"{type(self).__name__}.update")

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as the factors take it."""
        raise NotImplementedError(f"{type(self).__name__}.adapter_input")

    @property
    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def delta_weight(self) -> torch.Tensor:
        """s B A, oriented (d_out, d_in): what merge adds to the weight and unmerge subtracts."""
        return self.product() * self.scaling

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + self.update(self.adapter_input(args[0])).to(out.dtype)

    def merge(self, base: nn.Module) -> None:
        weight = self.oriented(base.weight.data)  # a view: writes go to the base
        weight.copy_(weight + self.delta_weight().detach())  # in fp32, written once: a bf16 base rounds once

    def unmerge(self, base: nn.Module) -> None:
        weight = self.oriented(base.weight.data)
        weight.copy_(weight - self.delta_weight().detach())

    def changed_numel(self, base: nn.Module) -> int:
        return values_held(base.weight)

    def factor_roles(self) -> dict[str, str]:
        # LoRA+ as peft groups it: B of linear and Conv1D layers.
        return {"lora_B.weight": "B"}


class PlainLora(LoraDelta):
    """The plain form: ``s B A dropout(x)`` beside a linear or Conv1D layer: A (r, d_in), B (d_out, r)."""

    plain = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming"):
        super().__init__(base, scaling, dropout)
        in_features, out_features = linear_shape(base)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the factors' dtype, through the adapter's dropout."""
        return self.dropout(x.to(self.dtype))

    def product(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self.plain or not (out.dtype == self.dtype or torch.is_autocast_enabled(out.device.type)):
            return super().post(args, out)
        # s applied to the r-wide hidden, not the d_out-wide update, and the addition fused into
        # B's matmul: two passes over (tokens x d_out) fewer than B(A(x)) * s + out.
        hidden = self.lora_A(self.dropout(args[0].to(out.dtype))) * self.scaling  # (..., r)
        summed = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), self.lora_B.weight.T)
        return summed.view(out.shape)

    @classmethod
    def post_rows(cls, deltas: list[Delta], rows: list[torch.Tensor], args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Every adapter's s B A x in two matmuls for the whole batch.

        The adapters' A are stacked into one (sum of ranks) x d_in matrix and their s B into one
        d_out x (sum of ranks); each row keeps only its own adapter's rank columns in between
        (rows of adapters without LoRA here keep none). Other forms, and dropout in training,
        take the default way.
        """
        if not cls.plain or any(d.dropout_active for d in deltas):
            return super().post_rows(deltas, rows, args, out)
        a = torch.cat([d.lora_A.weight for d in deltas])  # (sum r, d_in)
        b = torch.cat([d.lora_B.weight * d.scaling for d in deltas], dim=1)  # (d_out, sum r)
        ranks = torch.tensor([d.lora_A.weight.shape[0] for d in deltas], device=a.device)
        # output_size given: the GPU need not send the total back to the host first
        column_owner = torch.repeat_interleave(torch.arange(len(deltas), device=a.device), ranks,
                                               output_size=len(a))  # (sum r,)
        index, owner = joined(rows)
        row_owner = torch.full((len(out),), -1, device=a.device).index_copy(0, index, owner)  # (batch,)
        keep = (column_owner[None, :] == row_owner[:, None]).to(a.dtype)  # (batch, sum r)
        x = args[0].to(a.dtype)
        hidden = F.linear(x, a) * per_row(keep, x)  # (batch, ..., sum r)
        update = F.linear(hidden, b)
        return out + update.to(out.dtype)


class EmbeddingLora(LoraDelta):
    """``s (A^T[ids]) B^T`` beside an embedding, in peft's layout: A (r, vocab) starts at zero and
    B (d, r) random, so the update is zero at the start too. No dropout: the inputs are ids."""

    factor_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base: nn.Embedding, r: int, scaling: float):
        super().__init__(base, scaling)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r))
        self._embedding_args = {"padding_idx": base.padding_idx, "max_norm": base.max_norm,
                                "norm_type": base.norm_type,
                                "scale_grad_by_freq": base.scale_grad_by_freq, "sparse": base.sparse}

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def product(self) -> torch.Tensor:
        return self.lora_embedding_B @ self.lora_embedding_A

    def update(self, x: torch.Tensor) -> torch.Tensor:
        looked_up = F.embedding(x, self.lora_embedding_A.T, **self._embedding_args)  # (..., r)
        return looked_up @ self.lora_embedding_B.T * self.scaling

    def factor_roles(self) -> dict[str, str]:
        # both factors apart, at a rate of their own (here A starts at zero and B random: roles swapped)
        return {"lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}


class PissaLora(PlainLora):
    """A linear LoRA that starts from W0's top singular triplets and stays beside that frozen
    start: ``s (B A - B0 A0) dropout(x)``."""

    plain = False

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, init: str = "pissa"):
        super().__init__(base, r, scaling, dropout)
        A, B = pissa_start(self.oriented(base.weight), r, scaling, init)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
        # The frozen start: not parameters, and not in the model's state_dict (the adapter file
        # holds them, joined to A and B).
        self.register_buffer("lora_A0", A.to(self.dtype), persistent=False)
        self.register_buffer("lora_B0", B.to(self.dtype), persistent=False)

    def moved_from_start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B - B0 and A - A0. B A - B0 A0 = (B - B0) A + B0 (A - A0): the same product, but exactly
        zero at the start, where two equal products subtracted would leave the last bits of
        whichever kernel computed them (a matmul's rounding may differ between calls)."""
        return self.lora_B.weight - self.lora_B0, self.lora_A.weight - self.lora_A0

    def product(self) -> torch.Tensor:
        B_moved, A_moved = self.moved_from_start()
        return B_moved @ self.lora_A.weight + self.lora_B0 @ A_moved

    def update(self, x: torch.Tensor) -> torch.Tensor:
        B_moved, A_moved = self.moved_from_start()
        return (F.linear(self.lora_A(x), B_moved) + F.linear(F.linear(x, A_moved), self.lora_B0)) * self.scaling

    def stored_state(self) -> dict[str, torch.Tensor]:
        # the plain rank-2r LoRA this equals: [B, -B0] [A; A0] = B A - B0 A0 (and DoRA's m, if mixed in)
        return {**dict(self.named_parameters()),
                "lora_A.weight": torch.cat([self.lora_A.weight, self.lora_A0]),
                "lora_B.weight": torch.cat([self.lora_B.weight, -self.lora_B0], dim=1)}

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        A, A0 = tensors["lora_A.weight"].chunk(2)  # split what stored_state joined
        B, minus_B0 = tensors["lora_B.weight"].chunk(2, dim=1)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for key, value in {**tensors, "lora_A.weight": A, "lora_B.weight": B}.items():
                own[key].copy_(value)
            self.lora_A0.copy_(A0)
            self.lora_B0.copy_(-minus_B0)


class Dora(LoraDelta):
    """DoRA on any form above (mixed in first): a trained magnitude m per output feature rescales
    W0 plus the form's update, ``h = W0 x + b + (m/n - 1) W0 x' + (m/n) s B A x'``."""

    plain = False
    merges_on_original = True

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(base, *args, **kwargs)
        self._merged_norm: torch.Tensor | None = None  # n while merged: the merged weight no longer gives it
        # m starts at ||W0 + s B A||_c, so m/n = 1: the outputs do not change
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.oriented(weight_values(base))))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W0 + s B A||_c, (d_out,), detached: no gradient flows through it (section 4.3)."""
        return torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()

    def post(self, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """out + (m/n - 1) W0 x' + (m/n) s B A x' (peft's order)."""
        x = self.adapter_input(args[0])
        base = self._base[0]
        weight = self.oriented(weight_values(base))  # a quantised W0 dequantised at every forward, as peft does
        factor = self.lora_magnitude_vector / self.weight_norm(weight)  # (d_out,)
        if self.dropout_active:
            base_out = F.linear(x, weight.to(x.dtype))  # W0 sees the same dropped-out x as B A
        else:
            bias = getattr(base, "bias", None)
            base_out = out if bias is None else out - bias
        return out + ((factor - 1) * base_out + factor * self.update(x)).to(out.dtype)

    def merge(self, base: nn.Module) -> None:
        weight = self.oriented(base.weight.data)
        self._merged_norm = self.weight_norm(weight)
        weight.copy_((weight + self.delta_weight().detach()) * self._factor())  # W' = m/n (W0 + s B A)

    def unmerge(self, base: nn.Module) -> None:
        weight = self.oriented(base.weight.data)
        weight.copy_(weight / self._factor() - self.delta_weight().detach())  # W0 = W' n/m - s B A
        self._merged_norm = None

    def _factor(self) -> torch.Tensor:
        """m/n as of the merge, a column (d_out, 1) that scales the rows of an oriented weight."""
        return (self.lora_magnitude_vector.detach() / self._merged_norm)[:, None]


class DoraLinear(Dora, PlainLora):
    """DoRA on a linear or Conv1D layer."""


class DoraEmbedding(Dora, EmbeddingLora):
    """DoRA on an embedding."""


class DoraPissa(Dora, PissaLora):
    """DoRA on a PiSSA start."""


DORA = {PlainLora: DoraLinear, EmbeddingLora: DoraEmbedding, PissaLora: DoraPissa}


def pissa_start(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's A (r, d_in) and B (d_out, r) for an oriented W0 (d_out, d_in), as peft computes them:

        W0 ~ U_r S_r V_r^T,   A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   so s B A = U_r S_r V_r^T

    ``init="pissa_niter_N"`` finds U_r, S_r, V_r by randomised SVD with N subspace iterations
    (``torch.svd_lowrank``, Halko et al.): close to exact when the spectrum decays, much faster.
    """
    weight = weight.detach().float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=int(init.rsplit("_", 1)[1]))
        Vh = V.T
    root = torch.sqrt(S / scaling)  # (r,)
    return root[:, None] * Vh, U * root


def make_lora_delta(base: nn.Module, config: LoraConfig) -> LoraDelta:
    """The form of LoRA for this layer and config."""
    if isinstance(base, nn.Embedding):
        form, args = EmbeddingLora, (config.r, config.scaling)
    else:
        form = PissaLora if config.pissa else PlainLora
        args = (config.r, config.scaling, config.lora_dropout, config.init)
    return (DORA[form] if config.use_dora else form)(base, *args)


class LoraPeft(PeftCodec):
    """LoRA adapters (DoRA and rsLoRA included) in peft's format."""

    peft_type = "LORA"
    ignored = ("fan_in_fan_out", "megatron_config", "megatron_core", "loftq_config", "eva_config",
                    "corda_config", "qalora_group_size", "ensure_weight_tying", "arrow_config", "kasa_config",
                    "lora_ga_config", "monteclora_config", "velora_config")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        refuse_unsupported(peft, PEFT_UNSUPPORTED)
        if str(peft.get("init_lora_weights")).lower().startswith("pissa"):
            raise AdapterFileError(
                f"this peft adapter was saved with init_lora_weights={peft['init_lora_weights']!r}: its "
                "B A pairs with the residual base weights peft wrote into the model, not with the original.",
                "save it from peft with save_pretrained(..., path_initial_model_for_weight_conversion=...), "
                "which writes the plain rank-2r LoRA deltatune (and any LoRA reader) loads.")
        return {"method": "lora", "r": peft["r"], "lora_alpha": peft["lora_alpha"],
                "lora_dropout": peft.get("lora_dropout", 0.0), "target_modules": targets_from_peft(peft["target_modules"]),
                "bias": peft.get("bias", "none"), "use_rslora": peft.get("use_rslora", False),
                "use_dora": bool(peft.get("use_dora", False)),
                "init": "gaussian" if peft.get("init_lora_weights") == "gaussian" else "kaiming"}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                "target_modules": modules_with(tensors, "lora_A.", "lora_embedding_A"), "bias": config.bias,
                "use_rslora": config.use_rslora, "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
                "use_dora": config.use_dora,
                "fan_in_fan_out": description.get("fan_in_fan_out", False)}

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        # peft keeps an adapted layer's own (trained) bias under its base_layer.
        adapted = {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
        return {TUNER_PREFIX + (f"{k[:-5]}.base_layer.bias" if k.endswith(".bias") and k[:-5] in adapted else k): v
                for k, v in tensors.items()}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(TUNER_PREFIX).replace(".base_layer.", "."): v for k, v in tensors.items()}


@register
class Lora(Method):
    name = "lora"
    config_class = LoraConfig
    family = "re-parameterisation"
    mergeable = True
    # r=8 matrices on a small encoder take large steps; LoRA+ trains B faster than A
    tuning = Tuning(learning_rates=(1e-3, 3e-3, 1e-2), factored=True)
    count_formula = "r * (d_in + d_out) per adapted layer (+ d_out with use_dora)"

    def plan(self, model: nn.Module) -> list[str]:
        entries = self.config.target_modules or query_and_value(model, "LoRA")
        names = self.targets(model, entries, (*linear_types(), nn.Embedding), linear_types=linear_types())
        if self.config.pissa:
            check_pissa_targets(model, names, self.config)
        if self.config.pissa:
            check_not_quantized(model, names)
        return names

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[str]) -> None:
        if self.config.bias != "none":
            warn_user(f"lora bias='{self.config.bias}' trains base biases in place (as peft does): "
                      "disable_adapters() and other adapters see the trained biases.")
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

    def row_refusal(self) -> str:
        return "" if self.config.bias == "none" else f"bias='{self.config.bias}' trains base biases, which every row shares"

    def extra_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        # Biases are stored under the base module's own name, as peft stores them.
        return {n.replace(".base_layer.", "."): p for n, p in self.extra_trainable(model, adapter_name).items()}

    def saved_config(self, model: nn.Module, adapter_name: str) -> LoraConfig:
        """PiSSA saves as the plain rank-2r LoRA it equals (``LoraDelta.stored_state``); lora_alpha
        doubles (times sqrt(2) with rsLoRA) so that the scaling s stays the same."""
        config = self.config
        if not config.pissa:
            return config
        alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
        return dataclasses.replace(config, r=2 * config.r, lora_alpha=alpha, init="kaiming")

    combinations = COMBINATIONS

    def combine_refusal(self, how: str) -> str:
        if self.config.use_dora:
            return ("DoRA's trained magnitudes rescale W0 plus each adapter's own update, so they do not add up "
                    "(peft keeps the first adapter's settings and starts the result's magnitudes again from W0)")
        return super().combine_refusal(how)

    def combine(self, model: nn.Module, sources: dict[str, tuple[Method, float]],
                combination: Combination) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
        """peft's add_weighted_adapter: the factors combined (linear, ties, dare_*, magnitude_prune:
        A with sign(w s) sqrt(|w s|), B with sqrt(|w s|); cat: side by side, A times w s), or each
        layer's update s B A (the *svd ways) combined and truncated by SVD. The result's scaling is
        1 (lora_alpha = r). PiSSA adapters combine as the plain rank-2r LoRA they store."""
        ranks = {n: m.saved_config(model, n).r for n, (m, _) in sources.items()}
        rank = combined_rank(ranks, combination)
        generator = torch.Generator().manual_seed(combination.seed)
        tensors = {}
        for module, layer in iter_layers(model):
            present = [(layer.deltas[n], w) for n, (_, w) in sources.items()
                       if isinstance(layer.deltas[n] if n in layer.deltas else None, LoraDelta)]
            if present:
                a, b = combined_factors(present, rank, combination, generator)
                tensors[module] = dict(zip(present[0][0].factor_keys, (a, b)))
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(tensors), lora_dropout=self.config.lora_dropout)
        return config, tensors

    peft = LoraPeft()


def combined_rank(ranks: dict[str, int], combination: Combination) -> int:
    """The rank of a combination: the sum for cat, the svd_rank (or the largest) for *svd, else the
    one rank the factors share."""
    if combination.how == "cat":
        return sum(ranks.values())
    if combination.on_updates:
        return combination.svd_rank or max(ranks.values())
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n}: r={r}" for n, r in ranks.items())
        raise ConfigError(f"how = '{combination.how}' combines the factors A and B themselves, which needs one rank; "
                          f"the adapters have {listed}.", "use how='cat' (exact; the ranks add up) or an *_svd "
                          "way (svd_rank sets the result's rank).")
    return next(iter(ranks.values()))


def combined_factors(present: list[tuple[LoraDelta, float]], rank: int, combination: Combination,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (A, B) of the combination, from its adapters' deltas and weights (in order)."""
    stored = [(d.stored_state(), d, w) for d, w in present]
    keys = present[0][0].factor_keys
    if combination.how == "cat":
        a = torch.cat([s[keys[0]] * w * d.scaling for s, d, w in stored])
        b = torch.cat([s[keys[1]] for s, d, w in stored], dim=1)
        a_full, b_full = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
        a_full[:len(a)], b_full[:, :b.shape[1]] = a, b  # adapters missing here leave their rows zero
        return a_full, b_full
    if combination.on_updates:  # in the weight's stored layout, as peft draws DARE's masks over it
        transposed = present[0][0].transposed
        weights = torch.tensor([w for _, w in present])
        updates = [d.delta_weight().T if transposed else d.delta_weight() for d, _ in present]
        update = merged(updates, weights, combination, generator)
        return truncated(update.T if transposed else update, rank, combination.svd_clamp)
    scaled = [w * d.scaling for d, w in present]  # the sign on A alone, or it would cancel in B A
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) if x else 0.0 for x in scaled])
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    a = merged([s[keys[0]] for s, _, _ in stored], weights_a, combination, generator)
    b = merged([s[keys[1]] for s, _, _ in stored], weights_b, combination, generator)
    return a, b


def check_not_quantized(model: nn.Module, names: list[str]) -> None:
    """PiSSA rewrites W0 as its residual W0 - B0 A0: on a quantised layer that residual would be
    quantised again at once, losing what PiSSA keeps (peft refuses it too)."""
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is not None and is_quantized(weight):
            raise ConfigError(f"PiSSA rewrites W0 as the residual of its top singular vectors, and '{name}' holds W0 "
                              f"quantised ({type(weight).__name__}): the residual would be rounded again at once.",
                              "train PiSSA on the unquantised base, or a plain LoRA or DoRA on the quantised one.")


def check_pissa_targets(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """PiSSA starts from r singular vectors of each target's weight: linear layers, r <= min(d_in, d_out)."""
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)
        if isinstance(module, nn.Embedding):
            raise ConfigError(f"lora.init = {config.init!r} cannot start the embedding '{name}' from "
                              "singular vectors (peft falls back to its plain start there).",
                              "target linear layers only, or use init: kaiming for embeddings.")
        rank = min(linear_shape(module))
        if config.r > rank:
            raise ConfigError(f"lora.r = {config.r} is more than the {rank} singular vectors of '{name}' "
                              f"that lora.init = {config.init!r} starts from.", f"choose r <= {rank}.")


# peft fields with a meaning deltatune does not implement: a file that uses one is refused.
PEFT_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
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
                         AdapterState(methods={"default": Lora(config)}, active=["default"]))
        self.base_layer.requires_grad_(False)
        self.add_delta("default", make_lora_delta(self.base_layer, config))
