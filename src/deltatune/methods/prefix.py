"""Prefix tuning: learned keys and values in front of every self-attention layer (Li & Liang, 2021).

    attention_l(x) = softmax(q(x) [P_k,l ; k(x)]^T / sqrt(d_h)) [P_v,l ; v(x)]
    P_k,l, P_v,l: num_virtual_tokens x d_kv, trained;  q, k, v: the frozen projections

The queries are the user's positions only, so outputs keep the input's length; every query
also sees the n learned positions (no position encoding: they are plain key/value vectors).
In a decoder-only model (GPT-2, LLaMA) the prefix counts as n earlier tokens, so the input's
positions start at n, as with the past key/values of Li & Liang's GPT-2 code and of peft, whose
files then give the same outputs here; encoders and T5 keep the input's positions.
Stored parameters: ``layers * 2 * num_virtual_tokens * d_kv`` (d_kv = the key projection's
width, e.g. hidden size, or heads_kv * head_dim with grouped-query attention). Not mergeable.

Re-parameterisation (``reparameterize``, peft's ``prefix_projection``) trains the prefixes
through one MLP shared by all layers, which the paper found more stable:

    E (n x d) ──► Linear(d, hidden) ──► tanh ──► Linear(hidden, layers * 2 * d_kv) ──► P

It trains ``n*d + d*hidden + hidden + (hidden + 1) * layers * 2 * d_kv`` parameters, none of
them stored: the adapter file holds the MLP's output P (folded, detached), and an adapter
loaded from a file is plain prefixes again, since reparameterize only matters for training.

How the prefixes reach the attention without patching model code: one :class:`PrefixDelta`
per adapter holds every layer's, (layers, 2, n, d_kv), as virtual tokens at the model's root
(``hf/virtual_tokens.py``, the mechanism prompt tuning shares; the MLP runs once per model
forward). A forward pre-hook on each self-attention module, while a prefix adapter is active and not
disabled, hands the module a stand-in for its key/value cache whose ``update`` returns the
keys and values with the prefixes in front (wrapping the real cache during generation, which
therefore never stores the prefixes), and widens the attention mask (and T5's relative
position bias) with n always-visible columns; in a decoder-only model a forward pre-hook on the
model adds n to its position ids. transformers 5 builds masks inside the model,
so a missing mask of a causal layer becomes an explicit one. This needs attention modules
that take a ``cache`` argument (BERT, RoBERTa, GPT-2, LLaMA, T5 and relatives); others, like
DistilBERT's, are refused before anything changes. Only eager and sdpa attention are supported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.errors import AdapterFileError, ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta, DeltaLayer
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, register
from ..core.peft_keys import PROMPT_PREFIX
from ..core.targets import resolve_targets
from ..hf import virtual_tokens
from ..hf.anatomy import ANATOMIES, anatomy_of, hidden_size, model_type
from ..hf.layers import linear_shape, linear_types

__all__ = ["PrefixTuningConfig"]

ATTENTION_KINDS = (None, "eager", "sdpa")


@dataclass
class PrefixTuningConfig(MethodConfig):
    num_virtual_tokens: int = help_field(20, "Number n of learned key/value positions per layer.",
                                         range="[1, inf)")
    reparameterize: bool = help_field(
        True, "Train the prefixes through a shared MLP (peft's prefix_projection); the file "
              "stores only its output.")
    hidden: int = help_field(
        512, "Hidden width of the re-parameterisation MLP (peft's encoder_hidden_size).", range="[1, inf)")


class PrefixEncoder(nn.Module):
    """Every layer's prefixes from one MLP: E -> Linear -> tanh -> Linear."""

    def __init__(self, n: int, d: int, hidden: int, layers: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, layers * 2 * width)
        self.shape = (n, layers, 2, width)
        #: the output while a model forward runs (set to () by the model's pre-hook, back to None
        #: after it), so the MLP runs once per forward and a stale graph is never reused.
        self.out: tuple[torch.Tensor, ...] | None = None

    def forward(self) -> torch.Tensor:
        """Every layer's keys and values, (layers, 2, n, d_kv)."""
        if self.out:
            return self.out[0]
        out = self.up(torch.tanh(self.down(self.embedding.weight)))  # (n, layers * 2 * d_kv)
        out = out.view(self.shape).permute(1, 2, 0, 3)  # (layers, 2, n, d_kv)
        if self.out is not None:
            self.out = (out,)
        return out


class PrefixDelta(Delta):
    """One adapter's prefixes for every layer: a plain parameter, or a :class:`PrefixEncoder`'s output."""

    def __init__(self, n: int, layers: int, width: int, encoder: PrefixEncoder | None = None):
        super().__init__()
        self.n = n
        if encoder is None:
            self.prefixes = nn.Parameter(torch.randn(layers, 2, n, width))
        else:
            self.encoder = encoder

    def current(self) -> torch.Tensor:
        """(layers, 2, n, d_kv)."""
        return self.encoder() if "encoder" in self._modules else self.prefixes

    def stored_state(self) -> dict[str, torch.Tensor]:
        if "encoder" not in self._modules:
            return {"prefixes": self.prefixes}
        with torch.no_grad():  # fold the MLP: the file holds what it computes
            return {"prefixes": self.current().detach().clone()}

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "encoder" in self._modules:  # a loaded adapter is plain prefixes: the MLP cannot be recovered
            device = self.encoder.up.weight.device
            del self.encoder
            self.prefixes = nn.Parameter(torch.empty(tensors["prefixes"].shape, device=device))
        super().load_stored_state(tensors)


@dataclass
class Site:
    """One self-attention module and the width of its keys and values."""

    attention: str
    width: int


class PrefixTuningPeft(PeftCodec):
    """Prefix tuning in peft's format (its prefixes flattened as peft stores them)."""

    peft_type = "PREFIX_TUNING"
    prompt_learning = True
    ignored = ("num_attention_heads", "num_layers", "token_dim", "prefix_projection", "encoder_hidden_size")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        if (peft.get("num_transformer_submodules") or 1) != 1:
            raise AdapterFileError("this peft prefix adapter is for an encoder-decoder model: peft prefixes the "
                                   "decoder's self-attention only, deltatune the encoder's and the decoder's, so "
                                   "the outputs would differ.", "use peft for this adapter.")
        # The file holds the prefixes themselves (peft saves its projection's output).
        return {"method": "prefix", "num_virtual_tokens": peft["num_virtual_tokens"], "reparameterize": False}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        kind = description.get("base_model_type")
        if kind in ANATOMIES and not ANATOMIES[kind].decoder_only:
            raise AdapterFileError(
                f"a prefix adapter for a '{kind}' model has no peft format with the same outputs: peft cannot run "
                "prefix tuning on encoders with transformers 5 (they take no past_key_values), and with older "
                "transformers it shifts the input's positions by num_virtual_tokens, which deltatune's encoder "
                "prefixes do not.", "keep the deltatune format, or share LoRA, IA3 or prompt tuning with peft users.")
        layers, _, n, width = tensors[PREFIXES_KEY].shape
        # num_attention_heads: peft takes it from the base model's config when it loads.
        return {"num_virtual_tokens": n, "token_dim": width, "num_layers": layers, "num_attention_heads": None,
                "num_transformer_submodules": 1, "encoder_hidden_size": width,
                "prefix_projection": False}  # the file holds plain prefixes (folded)

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        prefixes = tensors[PREFIXES_KEY]  # (layers, 2, n, d_kv)
        flat = prefixes.permute(2, 0, 1, 3).reshape(prefixes.shape[2], -1)  # (n, layers * 2 * d_kv)
        rest = {PROMPT_PREFIX + k: v for k, v in tensors.items() if k != PREFIXES_KEY}
        return {"prompt_embeddings": flat.contiguous(), **rest}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {PREFIXES_KEY if k == "prompt_embeddings" else k.removeprefix(PROMPT_PREFIX):
                _unflatten(v, peft) if k == "prompt_embeddings" else v for k, v in tensors.items()}

    def check_base(self, model: nn.Module) -> None:
        anatomy = ANATOMIES.get(model_type(model))
        if anatomy is not None and not anatomy.decoder_only:
            raise AdapterFileError(
                f"this peft prefix adapter would not give peft's outputs on a '{model_type(model)}' model: peft "
                "runs prefixes as a key/value cache, which shifts the input's positions by num_virtual_tokens "
                "(and needs transformers < 5 on encoders); deltatune's encoder prefixes keep them.",
                "load it into the decoder-only model (GPT-2, LLaMA-style) it was trained for.")


@register
class PrefixTuning(Method):
    name = "prefix"
    config_class = PrefixTuningConfig
    family = "additive"
    # few parameters far from the output: larger steps than LoRA
    tuning = Tuning(default_learning_rate=1e-2, learning_rates=(3e-3, 1e-2, 3e-2))
    count_formula = ("layers * 2 * num_virtual_tokens * d_kv stored (+ the training-only MLP "
                     "when reparameterize)")
    merge_refusal = "the prefixes add attention positions, which no base weight can hold"

    def plan(self, model: nn.Module) -> dict[str, list[Site]]:
        """The virtual-token holder -> every self-attention module, in layer order."""
        kind = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"prefix tuning supports eager and sdpa attention, not '{kind}'.",
                              "load the model with attn_implementation='sdpa'.")
        roles = anatomy_of(model, "prefix tuning")
        attentions = resolve_targets(model, roles.self_attention, (nn.Module,), "prefix tuning", "attention")
        keys = resolve_targets(model, roles.key, linear_types(), "prefix tuning", "key")
        sites = [site(model, a, keys, fused=roles.fused_qkv) for a in attentions]
        if len({s.width for s in sites}) > 1:
            raise ConfigError(f"prefix tuning needs one key width for all layers; {type(model).__name__} has "
                              f"{sorted({s.width for s in sites})}.", "use prompt tuning, LoRA or IA3 for this model.")
        if roles.decoder_only and "position_ids" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"prefix tuning cannot shift the positions of {type(model).__name__}: its "
                              "forward takes no position_ids.", "apply it to the transformers model itself.")
        return {virtual_tokens.HOLDER: sites}

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: dict[str, list[Site]]) -> None:
        sites = plan[virtual_tokens.HOLDER]
        n, layers, width = self.config.num_virtual_tokens, len(sites), sites[0].width
        encoder = PrefixEncoder(n, hidden_size(model), self.config.hidden, layers, width) if self.config.reparameterize else None
        virtual_tokens.add(model, adapter_name, state, PrefixDelta(n, layers, width, encoder),
                           lambda: prefix_hooks(model, sites))

    def not_stored(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """The re-parameterisation MLP: trained, but the file holds its output instead."""
        delta = getattr(model, virtual_tokens.HOLDER).deltas[adapter_name]
        encoder = delta._modules.get("encoder")
        prefix = f"{virtual_tokens.HOLDER}.deltas.{adapter_name}.encoder."
        return {prefix + k: p for k, p in encoder.named_parameters()} if encoder is not None else {}

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        virtual_tokens.release(model, adapter_name)

    # peft stores every layer's prefixes as one tensor, (n, layers * 2 * d_kv): for each
    # position, every layer's key then value. Ours: (layers, 2, n, d_kv).

    peft = PrefixTuningPeft()


PREFIXES_KEY = f"{virtual_tokens.HOLDER}.prefixes"  # the prefixes' key in adapter files


def _unflatten(value: torch.Tensor, peft: dict[str, Any]) -> torch.Tensor:
    """peft's (n, layers * 2 * d_kv) -> (layers, 2, n, d_kv), as peft's get_prompt splits it."""
    n, layers, width = (peft.get(k) for k in ("num_virtual_tokens", "num_layers", "token_dim"))
    if not all(isinstance(v, int) for v in (n, layers, width)) or tuple(value.shape) != (n, layers * 2 * width):
        raise AdapterFileError(f"this peft prefix adapter holds prompt_embeddings of shape {tuple(value.shape)}, "
                               f"not num_virtual_tokens x (num_layers * 2 * token_dim) = ({n}, {layers} * 2 * "
                               f"{width}).", "the adapter_config.json does not belong to these weights: save it again.")
    return value.view(n, layers, 2, width).permute(1, 2, 0, 3).contiguous()  # (layers, 2, n, d_kv)


def site(model: nn.Module, attention: str, keys: list[str], fused: bool) -> Site:
    """An attention module and its key width, checked to take a cache."""
    module = model.get_submodule(attention)
    params = inspect.signature(module.forward).parameters
    if not {"cache", "past_key_values"} & set(params):
        raise ConfigError(f"prefix tuning cannot reach the keys of '{attention}' "
                          f"({type(module).__name__}, model type '{model_type(model)}'): its "
                          "forward takes no key/value cache.",
                          "use prompt tuning, LoRA or IA3 for this model.")
    key = next((k for k in keys if k.startswith(attention + ".")), None)
    if key is None:
        raise ConfigError(f"prefix tuning found no key projection inside '{attention}'.",
                          "this model's layout differs from its family's role map; use another method.")
    base = model.get_submodule(key)
    base = base.base_layer if isinstance(base, DeltaLayer) else base
    width = linear_shape(base)[1]
    return Site(attention, width // 3 if fused else width)


def active_prefixes(model: nn.Module) -> torch.Tensor | None:
    """The active adapters' prefixes side by side, (layers, 2, n_total, d_kv), or None."""
    prefixes = [d.current() for d in virtual_tokens.active(model, PrefixDelta)]
    return torch.cat(prefixes, dim=2) if prefixes else None


def row_prefixes(model: nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """In a per-row batch (``deltatune.mixed_batch``) with prefix adapters among its rows: each
    row's prefixes, (batch, layers, 2, n_max, d_kv), and which of the n_max are its own, (batch,
    n_max); rows of other adapters have none. None outside such a batch.

    Built once per model forward and batch size, then read by every layer (and the positions).
    """
    built = model._modules[virtual_tokens.HOLDER].__dict__.get("rows_built")  # open during a forward
    if built is not None and batch in built:
        return built[batch]
    rows = virtual_tokens.in_rows(model, PrefixDelta, batch, device)
    result = _row_prefixes(rows, batch, device) if rows else None
    if built is not None:
        built[batch] = result
    return result


def _row_prefixes(rows: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    prefixes = {name: delta.current() for name, (delta, _) in rows.items()}
    layers, _, _, width = next(iter(prefixes.values())).shape
    n_max = max(p.shape[2] for p in prefixes.values())
    per_row = next(iter(prefixes.values())).new_zeros(batch, layers, 2, n_max, width)
    own = torch.zeros(batch, n_max, dtype=torch.bool, device=device)
    for name, (_, index) in rows.items():
        n = prefixes[name].shape[2]
        per_row[index, :, :, :n] = prefixes[name]
        own[index, :n] = True
    return per_row, own


def prefix_hooks(model: nn.Module, sites: list[Site]) -> list[RemovableHandle]:
    """One forward pre-hook per self-attention module, shared by the model's prefix adapters
    (several active prefixes are concatenated), and hooks on the model around each forward."""
    handles = [model.get_submodule(s.attention).register_forward_pre_hook(AttentionHook(model, index), with_kwargs=True)
               for index, s in enumerate(sites)]
    # What every layer reads is made once per model forward: the MLP's output, per-row prefixes.
    handles += [model.register_forward_pre_hook(lambda m, _: _forward_scope(m, opening=True)),
                model.register_forward_hook(lambda m, *_: _forward_scope(m, opening=False))]
    if anatomy_of(model).decoder_only:
        handles.append(model.register_forward_pre_hook(PositionHook(), with_kwargs=True))
    return handles


def _forward_scope(model: nn.Module, opening: bool) -> None:
    """Opening: keep each MLP's output and each per-row build until closing drops them (the
    model forward is over), so a stale graph is never reused."""
    for delta in virtual_tokens.running(model, PrefixDelta):
        if "encoder" in delta._modules:
            delta.encoder.out = () if opening else None
    holder = model._modules.get(virtual_tokens.HOLDER)
    if holder is not None:
        holder.__dict__["rows_built"] = {} if opening else None


class AttentionHook:
    """Before one self-attention module runs: give it the active prefixes and widen its masks."""

    def __init__(self, model: nn.Module, index: int):
        self.model, self.index = model, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kw = virtual_tokens.arguments(module, args, kwargs)
        if kw.get("key_value_states") is not None or kw.get("encoder_hidden_states") is not None:
            return None  # cross-attention: no prefixes
        hidden = kw[virtual_tokens.parameter_names(type(module))[0]]  # every attention module takes its input first
        prefix, own = self.prefix(hidden)
        if prefix is None:
            return None
        cache_arg = "cache" if "cache" in virtual_tokens.parameter_names(type(module)) else "past_key_values"
        mask_arg = "attention_mask" if "attention_mask" in virtual_tokens.parameter_names(type(module)) else "mask"
        cache = virtual_tokens.cache_of(kw)
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches hold two
        past = cache.get_seq_length(getattr(module, "layer_idx", 0) or 0) if cache is not None else 0
        queries, n = hidden.shape[1], prefix.shape[-2]
        kw[cache_arg] = virtual_tokens.PrefixedCache(cache, prefix)
        causal = getattr(module, "is_causal", False)
        kw[mask_arg] = virtual_tokens.widen_mask(kw.get(mask_arg), n, queries, past, causal, hidden, own)
        if hasattr(module, "compute_bias"):
            kw["position_bias"] = virtual_tokens.widen_bias(module, kw.get("position_bias"), n, queries, past, hidden)
        return (), kw

    def prefix(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This layer's prefixes, (2, n, d_kv), or per row, (batch, 2, n, d_kv), with each row's own
        positions among them, (batch, n)."""
        rows = row_prefixes(self.model, len(hidden), hidden.device)
        if rows is not None:
            return rows[0][:, self.index], rows[1]
        prefixes = active_prefixes(self.model)
        return (None if prefixes is None else prefixes[self.index]), None


class PositionHook:
    """Before a decoder-only model runs: number its input's positions after the active prefixes.

    peft passes the prefixes as a key/value cache that already holds n tokens, so the model
    numbers the input from n (explicit position ids too: peft adds n to them); the same numbers
    here make peft's prefixes give peft's forward outputs, and ``generate`` the same as the
    forward pass, since its ids are shifted alike.
    """

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kw = virtual_tokens.arguments(model, args, kwargs)
        tokens = virtual_tokens.tokens(kw)
        rows = row_prefixes(model, len(tokens), tokens.device)
        if rows is not None:
            n = rows[1].sum(dim=1, keepdim=True)  # (batch, 1): each row's own prefix length
        else:
            n = sum(d.n for d in virtual_tokens.active(model, PrefixDelta))
            if not n:
                return None
        kw["position_ids"] = virtual_tokens.positions(kw) + n
        return (), kw
