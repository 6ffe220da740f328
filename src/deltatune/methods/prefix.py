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
per layer, attached to that layer's key projection (which it leaves unchanged), holds them. A
forward pre-hook on each self-attention module, while a prefix adapter is active and not
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
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import ConfigError
from ..core.layer import AdapterState, Delta, DeltaLayer
from ..core.method import (Method, MethodConfig, add_deltas, check_not_nested, deltas_of, help_field,
                           register, release_hooks)
from ..core.targets import resolve_targets
from ..hf.anatomy import anatomy_of, hidden_size, model_type

__all__ = ["PrefixTuningConfig"]

HOOKS_ATTR = "_deltatune_prefix_hooks"
# Families whose anatomy "attention" role also lists cross-attention, which gets no prefix.
SELF_ATTENTION = {"t5": ["SelfAttention"]}
ATTENTION_KINDS = (None, "eager", "sdpa")


@dataclass
class PrefixTuningConfig(MethodConfig):
    num_virtual_tokens: int = help_field(20, "Number n of learned key/value positions per layer.")
    reparameterize: bool = help_field(
        True, "Train the prefixes through a shared MLP (peft's prefix_projection); the file "
              "stores only its output.")
    hidden: int = help_field(
        512, "Hidden width of the re-parameterisation MLP (peft's encoder_hidden_size).")

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"prefix.num_virtual_tokens = {self.num_virtual_tokens} is invalid: "
                              "the prefix needs at least one position.", "use 20 (typical: 10 to 200).")
        if self.hidden < 1:
            raise ConfigError(f"prefix.hidden = {self.hidden} is invalid: the MLP needs a width.",
                              "use 512, or reparameterize: false to train the prefixes directly.")


class PrefixEncoder(nn.Module):
    """Every layer's prefixes from one MLP: E -> Linear -> tanh -> Linear."""

    def __init__(self, n: int, d: int, hidden: int, widths: list[int]):
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, 2 * sum(widths))
        self.offsets = [2 * sum(widths[:i]) for i in range(len(widths) + 1)]

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index``'s keys and values, 2 x n x d_kv (only its rows of ``up`` are computed)."""
        hidden = torch.tanh(self.down(self.embedding.weight))
        rows = slice(self.offsets[index], self.offsets[index + 1])
        out = F.linear(hidden, self.up.weight[rows], self.up.bias[rows])
        return out.view(out.shape[0], 2, -1).transpose(0, 1)


class PrefixDelta(Delta):
    """One layer's prefixes: a plain parameter, or row ``index`` of a shared :class:`PrefixEncoder`.

    The encoder is registered in the first layer's delta only, so it is counted and trained once.
    """

    def __init__(self, n: int, width: int, encoder: PrefixEncoder | None = None, index: int = 0):
        super().__init__()
        self.n, self.index = n, index
        self.shared = (encoder,) if encoder is not None else None  # a tuple: not a submodule
        if encoder is None:
            self.prefix = nn.Parameter(torch.randn(2, n, width))
        elif index == 0:
            self.encoder = encoder

    @property
    def mlp(self) -> PrefixEncoder | None:
        """The shared MLP when this delta owns it (the first layer's, while re-parameterised)."""
        return self._modules.get("encoder")

    def current(self) -> torch.Tensor:
        """Keys and values, 2 x n x d_kv."""
        return self.shared[0].layer(self.index) if self.shared else self.prefix

    def stored_state(self) -> dict[str, torch.Tensor]:
        if not self.shared:
            return {"prefix": self.prefix}
        with torch.no_grad():  # fold the MLP: the file holds what it computes
            return {"prefix": self.current().detach().clone()}

    def load_stored_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.shared:  # a loaded adapter is plain prefixes: the MLP cannot be recovered
            device = self.shared[0].up.weight.device
            self.shared = None
            self._modules.pop("encoder", None)
            self.prefix = nn.Parameter(torch.empty(tensors["prefix"].shape, device=device))
        super().load_stored_state(tensors)


@dataclass
class Site:
    """One self-attention module and the key projection whose wrapper holds its prefixes."""

    attention: str
    key: str
    width: int


@register
class PrefixTuning(Method):
    name = "prefix"
    config_class = PrefixTuningConfig
    family = "additive"
    default_learning_rate = 1e-2  # few parameters far from the output: larger steps than LoRA
    learning_rates = (3e-3, 1e-2, 3e-2)
    count_formula = ("layers * 2 * num_virtual_tokens * d_kv stored (+ the training-only MLP "
                     "when reparameterize)")
    merge_refusal = "the prefixes add attention positions, which no base weight can hold"

    def plan(self, model: nn.Module) -> list[Site]:
        kind = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"prefix tuning supports eager and sdpa attention, not '{kind}'.",
                              "load the model with attn_implementation='sdpa'.")
        roles = anatomy_of(model, "prefix tuning")
        entries = SELF_ATTENTION.get(model_type(model), roles.attention)
        attentions = resolve_targets(model, entries, (nn.Module,), "prefix tuning", "attention")
        keys = resolve_targets(model, roles.key, (nn.Linear, Conv1D), "prefix tuning", "key")
        sites = [site(model, a, keys, fused=roles.key == roles.query) for a in attentions]
        check_not_nested(model, [s.key for s in sites])
        if roles.decoder_only and "position_ids" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"prefix tuning cannot shift the positions of {type(model).__name__}: its "
                              "forward takes no position_ids.", "apply it to the transformers model itself.")
        return sites

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: list[Site]) -> None:
        n, widths = self.config.num_virtual_tokens, [s.width for s in plan]
        encoder = None
        if self.config.reparameterize:
            encoder = PrefixEncoder(n, hidden_size(model), self.config.hidden, widths)
        index = {s.key: i for i, s in enumerate(plan)}
        add_deltas(model, [s.key for s in plan], adapter_name, state,
                   lambda _, name: PrefixDelta(n, widths[index[name]], encoder, index[name]))
        hooks = getattr(model, HOOKS_ATTR, None) or PrefixHooks(model, plan)
        hooks.users.add(adapter_name)
        setattr(model, HOOKS_ATTR, hooks)

    def not_stored(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """The re-parameterisation MLP: trained, but the file holds its output instead."""
        params = {}
        for name, _, delta in deltas_of(model, adapter_name):
            mlp = delta.mlp if isinstance(delta, PrefixDelta) else None
            if mlp is not None:
                prefix = f"{name}.deltas.{adapter_name}.encoder."
                params.update({prefix + k: p for k, p in mlp.named_parameters()})
        return params

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        release_hooks(model, HOOKS_ATTR, adapter_name)


def site(model: nn.Module, attention: str, keys: list[str], fused: bool) -> Site:
    """Pair an attention module with its key projection and check that it can take a cache."""
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
    width = base.weight.shape[1] if isinstance(base, Conv1D) else base.out_features
    return Site(attention, key, width // 3 if fused else width)


class PrefixHooks:
    """One forward pre-hook per self-attention module, shared by the model's prefix adapters
    (several active prefixes are concatenated)."""

    def __init__(self, model: nn.Module, plan: list[Site]):
        self.users: set[str] = set()
        self.handles = [model.get_submodule(s.attention).register_forward_pre_hook(
            AttentionHook(model.get_submodule(s.key), model.get_submodule(s.attention)),
            with_kwargs=True) for s in plan]
        if anatomy_of(model).decoder_only:
            hook = PositionHook(model.get_submodule(plan[0].key), model)
            self.handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AttentionHook:
    """Before one self-attention module runs: give it the active prefixes and widen its masks."""

    def __init__(self, key_layer: DeltaLayer, attention: nn.Module):
        self.key_layer = key_layer
        self.params = list(inspect.signature(attention.forward).parameters)
        self.cache_arg = "cache" if "cache" in self.params else "past_key_values"
        self.mask_arg = "attention_mask" if "attention_mask" in self.params else "mask"

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prefixes = [d.current() for d in self.key_layer.active_deltas() if isinstance(d, PrefixDelta)]
        kw = {**dict(zip(self.params, args)), **kwargs}
        cross = kw.get("key_value_states") is not None or kw.get("encoder_hidden_states") is not None
        if not prefixes or cross:
            return None
        prefix = torch.cat(prefixes, dim=1)
        cache = kw.get(self.cache_arg)
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches hold two
        past = cache.get_seq_length(getattr(module, "layer_idx", 0) or 0) if cache is not None else 0
        hidden = kw[self.params[0]]  # every attention module takes its input first
        queries, n = hidden.shape[1], prefix.shape[1]
        kw[self.cache_arg] = PrefixedCache(cache, prefix)
        causal = getattr(module, "is_causal", False)
        kw[self.mask_arg] = widen_mask(kw.get(self.mask_arg), n, queries, past, causal, hidden)
        if hasattr(module, "compute_bias"):
            kw["position_bias"] = widen_bias(module, kw.get("position_bias"), n, queries, past, hidden)
        return (), kw


class PositionHook:
    """Before a decoder-only model runs: number its input's positions after the active prefixes.

    peft passes the prefixes as a key/value cache that already holds n tokens, so the model
    numbers the input from n (explicit position ids too: peft adds n to them); the same numbers
    here make peft's prefixes give peft's forward outputs, and ``generate`` the same as the
    forward pass, since its ids are shifted alike.
    """

    def __init__(self, key_layer: DeltaLayer, model: nn.Module):
        self.key_layer = key_layer
        self.params = list(inspect.signature(model.forward).parameters)

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        n = sum(d.n for d in self.key_layer.active_deltas() if isinstance(d, PrefixDelta))
        if not n:
            return None
        kw = {**dict(zip(self.params, args)), **kwargs}
        positions = kw.get("position_ids")
        if positions is None:  # what the model would count: the cache's tokens, then the input
            tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]
            cache = kw.get("cache") if kw.get("cache") is not None else kw.get("past_key_values")
            start = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        kw["position_ids"] = positions + n
        return (), kw


class PrefixedCache:
    """Stands in for an attention module's cache: its ``update`` returns keys and values with
    the prefixes in front, and the real cache (if any) stores and counts the user's tokens only."""

    def __init__(self, inner: Any, prefix: torch.Tensor):
        self.inner, self.prefix = inner, prefix

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            keys, values = self.inner.update(keys, values, layer_idx, *args, **kwargs)
        batch, heads, _, head_dim = keys.shape
        n = self.prefix.shape[1]
        prefix = self.prefix.to(keys.dtype).view(2, n, heads, head_dim).permute(0, 2, 1, 3)
        prefix = prefix.unsqueeze(1).expand(2, batch, heads, n, head_dim)
        return torch.cat([prefix[0], keys], dim=2), torch.cat([prefix[1], values], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0


def widen_mask(mask: torch.Tensor | None, n: int, queries: int, past: int, causal: bool,
               like: torch.Tensor) -> torch.Tensor | None:
    """Put n always-visible key columns in front of a 4D mask (boolean or additive)."""
    if mask is None:
        if not causal or queries == 1:
            return None  # everything is visible, the prefixes too
        # No mask in a causal layer means "causal" to sdpa, which aligns it wrongly once keys
        # outnumber queries: spell it out, each query seeing its own past.
        visible = torch.ones(queries, past + queries, dtype=torch.bool, device=like.device).tril(past)
        mask = torch.zeros(visible.shape, dtype=like.dtype, device=like.device)
        mask = mask.masked_fill(~visible, torch.finfo(like.dtype).min)[None, None]
    front = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([front(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def widen_bias(module: nn.Module, bias: torch.Tensor | None, n: int, queries: int, past: int,
               like: torch.Tensor) -> torch.Tensor:
    """T5-style relative position bias: none for the prefixes. Later layers reuse the first one's."""
    keys = past + queries
    if bias is None:
        if getattr(module, "has_relative_attention_bias", False):
            bias = module.compute_bias(queries, keys, past_seen_tokens=past)
        else:
            bias = torch.zeros(1, module.n_heads, queries, keys, dtype=like.dtype, device=like.device)
    missing = n + keys - bias.shape[-1]
    if missing <= 0:
        return bias
    return torch.cat([bias.new_zeros(*bias.shape[:-1], missing), bias], dim=-1)

