"""Prompt tuning: learned "soft prompt" embeddings in front of the input (Lester et al., 2021).

    embeds = [ P ; E(x) ]      P: num_virtual_tokens x d, trained;  E: the frozen input embedding

       input_ids ──► E ──────────────┐
       P (n x d) ───────────────► concat ──► frozen model ──► drop the n prompt positions

The only trainable tensor is P: ``num_virtual_tokens * d`` parameters (d = embedding width),
independent of depth. Not mergeable: P lengthens the sequence, and no base weight can hold it.
A fresh prompt changes the outputs (there is no "zero" prompt).

How it reaches the model without a task-specific wrapper: P is a virtual-token delta held at
the model's root (``hf/virtual_tokens.py``), and hooks on the root model, while a prompt
adapter is active and not disabled,

- embed ``input_ids`` themselves and pass ``inputs_embeds = [P ; E(x)]`` instead;
- put ones in front of ``attention_mask``, zeros in front of ``token_type_ids``, ``-100`` in
  front of ``labels`` shaped like the input (token and language-model labels), and give
  ``position_ids`` the prompt's positions 0..n-1 (the user's move up by n);
- afterwards cut the prompt positions out of token-level outputs (``logits`` with a sequence
  axis, ``start_logits``/``end_logits``, hidden states), so ``logits.shape[:2]`` is
  ``input_ids.shape`` again. Sequence-level logits ``[batch, labels]`` are left alone.

With a causal LM the last prompt position predicts the first user token, so the loss has one
term more than the base model's (as in peft). During ``generate`` the prompt is added once:
calls whose cache already holds tokens only widen the mask and move the positions.

Encoder-decoder models (T5) share one embedding between encoder and decoder, so the prompt is
added by a pre-hook on the *encoder* (which ``generate`` also calls directly), and the root
hook only widens the ``attention_mask`` the decoder uses to attend to the encoder. Decoder
logits are never trimmed. Outputs are trimmed only when the model returns a ``ModelOutput``
(``return_dict=True``, the default).

In a per-row batch (``deltatune.mixed_batch``) each row gets its own adapter's prompt, or none,
laid out by ``RowPrompts`` so that every row computes what it computes alone.

``init``: ``vocab`` copies random rows of the embedding matrix (torch's RNG, so seed it);
``random`` draws from N(0, std of the embedding matrix); ``text`` uses the embeddings of
``init_text`` repeated or cut to ``num_virtual_tokens``. Its token ids come from
``init_token_ids`` when given, otherwise from a tokenizer saved locally at the model's
``config._name_or_path``; the applied adapter's config (not the caller's) records them, so
the saved config reloads without the tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..core.errors import AdapterFileError, ConfigError
from ..core.fields import help_field
from ..core.layer import AdapterState, Delta, DeltaLayer
from ..core.method import Method, MethodConfig, PeftCodec, Tuning, register
from ..core.peft_keys import PROMPT_PREFIX
from ..hf import virtual_tokens
from ..hf.anatomy import ANATOMIES, model_type

__all__ = ["PromptTuningConfig"]

# Output fields with a sequence axis at dim 1 that the prompt lengthened.
TOKEN_OUTPUTS = {"logits": 3, "last_hidden_state": 3, "start_logits": 2, "end_logits": 2}


@dataclass
class PromptTuningConfig(MethodConfig):
    num_virtual_tokens: int = help_field(20, "Length n of the learned prompt put before the input.",
                                         range="[1, inf)")
    init: Literal["vocab", "random", "text"] = help_field(
        "vocab", "How the prompt starts: rows of the embedding matrix sampled at random (vocab), "
                 "N(0, embedding std) (random), or the embeddings of init_text (text).")
    init_text: str | None = help_field(
        None, "Text whose token embeddings start the prompt (init: text).")
    init_token_ids: list[int] | None = help_field(
        None, "Token ids of init_text; without them apply() tokenizes init_text with the tokenizer "
              "saved at the model's config._name_or_path and the adapter's saved config records them.",
        range="[0, inf)")

    def validate(self) -> None:
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"prompt.init_text = {self.init_text!r}: init 'text' needs the text.",
                              "set init_text, e.g. 'Classify the sentiment of this review:'.")
        if self.init != "text" and (self.init_text is not None or self.init_token_ids is not None):
            raise ConfigError(f"prompt.init = {self.init!r} ignores init_text and init_token_ids.",
                              "set init: text, or remove init_text and init_token_ids.")
        if self.init_token_ids == []:
            raise ConfigError("prompt.init_token_ids = [] is invalid: it needs at least one id.",
                              "leave it unset to tokenize init_text.")


class PromptDelta(Delta):
    """One adapter's prompt P, (n, d); the hooks put it in front of the input embeddings."""

    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt.detach().float().clone())


class PromptTuningPeft(PeftCodec):
    """Prompt tuning in peft's format."""

    peft_type = "PROMPT_TUNING"
    prompt_learning = True
    ignored = ("num_attention_heads", "num_layers", "token_dim", "tokenizer_name_or_path", "tokenizer_kwargs",
                    "prompt_tuning_init", "prompt_tuning_init_text")

    def config_from_peft(self, peft: dict[str, Any]) -> dict[str, Any]:
        if (peft.get("num_transformer_submodules") or 1) != 1:
            raise AdapterFileError("this peft prompt has prompts for an encoder and a decoder; deltatune "
                                   "prompts the encoder only.", "use peft for encoder-decoder prompts.")
        return {"method": "prompt", "num_virtual_tokens": peft["num_virtual_tokens"]}

    def peft_config(self, config: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"num_virtual_tokens": config.num_virtual_tokens, "token_dim": tensors[PROMPT_KEY].shape[1],
                "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}

    def tensors_to_peft(self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings" if k == PROMPT_KEY else PROMPT_PREFIX + k: v for k, v in tensors.items()}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor], peft: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY if k == "prompt_embeddings" else k.removeprefix(PROMPT_PREFIX): v for k, v in tensors.items()}


@register
class PromptTuning(Method):
    name = "prompt"
    config_class = PromptTuningConfig
    family = "additive"
    # a handful of input vectors: they need far larger steps than weights
    tuning = Tuning(default_learning_rate=3e-2, learning_rates=(1e-2, 3e-2, 1e-1))
    count_formula = "num_virtual_tokens * d (d = embedding width)"
    merge_refusal = "the prompt adds input positions, which no base weight can hold"

    def plan(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The virtual-token holder -> the prompt's starting value."""
        embedding = input_embedding(model)
        ids = None
        if self.config.init == "text":
            ids = self._token_ids(model, embedding.num_embeddings)
            # The adapter's own config (the caller's is left alone) records the ids, so the
            # saved config reloads without the tokenizer.
            self.config = dataclasses.replace(self.config, init_token_ids=ids)
        return {virtual_tokens.HOLDER: initial_prompt(embedding.weight.detach(), self.config.init,
                                                      self.config.num_virtual_tokens, ids)}

    def inject(self, model: nn.Module, adapter_name: str, state: AdapterState, plan: dict[str, torch.Tensor]) -> None:
        virtual_tokens.add(model, adapter_name, state, PromptDelta(plan[virtual_tokens.HOLDER]),
                           lambda: PromptHooks(model).handles)

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        virtual_tokens.release(model, adapter_name)

    def _token_ids(self, model: nn.Module, vocab: int) -> list[int]:
        ids = self.config.init_token_ids or tokenize(model, self.config.init_text)
        if not ids:
            raise ConfigError(f"prompt.init_text = {self.config.init_text!r} has no tokens.",
                              "use text with words in it.")
        if max(ids) >= vocab:
            raise ConfigError(f"prompt.init_token_ids has id {max(ids)}, beyond the model's "
                              f"vocabulary of {vocab}.", "use ids from this model's tokenizer.")
        return list(ids)

    peft = PromptTuningPeft()


PROMPT_KEY = f"{virtual_tokens.HOLDER}.prompt"  # the prompt's key in adapter files


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input embedding (the module itself, if an adapter wraps it)."""
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if getter else None
    base = module.base_layer if isinstance(module, DeltaLayer) else module
    if not isinstance(base, nn.Embedding):
        raise ConfigError(f"prompt tuning needs the input embedding of {type(model).__name__}, and "
                          "get_input_embeddings() gives none.", "use a transformers model.")
    return base


def tokenize(model: nn.Module, text: str) -> list[int]:
    """Token ids of ``text`` from a tokenizer saved locally where the model came from."""
    from transformers import AutoTokenizer

    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"prompt.init_text needs a tokenizer, and none is saved at '{path}' "
                          f"({error}).", "pass the text's ids as init_token_ids, e.g. "
                          "tokenizer(text, add_special_tokens=False)['input_ids'].") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def initial_prompt(weight: torch.Tensor, init: str, n: int, token_ids: list[int] | None) -> torch.Tensor:
    """The prompt's starting value, n x d, from the embedding matrix ``weight`` (vocab x d)."""
    weight = weight.float()
    if init == "random":
        return torch.randn(n, weight.shape[1], device=weight.device) * weight.std()
    if init == "text":
        ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        return weight[torch.tensor(ids, device=weight.device)].clone()
    return weight[torch.randint(0, weight.shape[0], (n,))].clone()


class RowPrompts:
    """The prompts of a batch: row r's own n_r prompt vectors laid out with its tokens in n + seq
    columns, n the longest prompt. An ordinary batch is the case where every row has the same
    prompt (the active prompts one after the other); in a per-row batch (``deltatune.mixed_batch``)
    each row has its own adapter's, or none (n_r = 0 for rows of other adapters and the base).

    Where rows differ, a decoder-only model reads the last column (a classifier pools it,
    ``generate`` continues from it), so there each row's prompt sits just before its tokens, the
    padding in front, and the tokens' positions move up by n_r (``front=True``)::

        [pad (n - n_r) ; P_r ; x]

    An encoder pools the first column and counts positions itself, so there the padding goes last::

        [P_r ; x ; pad (n - n_r)]

    Padding columns are masked out: every row sees what it sees alone. Where all rows agree
    (``uniform``) both layouts are ``[P ; x]``, and a mask or positions the caller left out stay out.
    """

    def __init__(self, prompts: list[tuple[torch.Tensor, torch.Tensor]], batch: int, device: torch.device,
                 front: bool, uniform: bool):
        self.prompts, self.front, self.uniform = prompts, front, uniform
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (batch,): n_r
        for prompt, index in prompts:
            self.lengths[index] = len(prompt)
        self.n = max(len(prompt) for prompt, _ in prompts)
        self.starts = torch.full_like(self.lengths, self.n) if front else self.lengths  # (batch,): x's first column
        self.rows = torch.arange(batch, device=device)[:, None]  # (batch, 1)

    @classmethod
    def of(cls, model: nn.Module, batch: int, device: torch.device, encoder: bool = False) -> RowPrompts | None:
        """The batch's layout, or None when none of its rows has a prompt.
        ``encoder``: for an encoder-decoder model's encoder."""
        groups = virtual_tokens.in_rows(model, PromptDelta, batch, device)
        if groups is None:  # an ordinary batch: the active prompts, concatenated, on every row
            active = [d.prompt for d in virtual_tokens.active(model, PromptDelta)]
            if not active:
                return None
            every_row = torch.arange(batch, device=device)
            return cls([(torch.cat(active), every_row)], batch, device, front=False, uniform=True)
        if not groups:
            return None
        prompts = [(delta.prompt, index) for delta, index in groups.values()]
        uniform = len(prompts) == 1 and len(prompts[0][1]) == batch
        front = not uniform and not encoder and _decoder_only(model)
        return cls(prompts, batch, device, front, uniform)

    def columns(self, seq: int) -> torch.Tensor | int:
        """(batch, seq): the column of each row's tokens (an int, the first, where all rows agree)."""
        if self.uniform:
            return self.n
        return self.starts[:, None] + torch.arange(seq, device=self.starts.device)

    def prompt_columns(self, seq: int) -> torch.Tensor:
        """(batch, n + seq), True where a row's prompt is."""
        column = torch.arange(self.n + seq, device=self.starts.device)[None]  # (1, n + seq)
        first = (self.n - self.lengths if self.front else torch.zeros_like(self.lengths))[:, None]  # (batch, 1)
        return (column >= first) & (column < first + self.lengths[:, None])

    def laid_out(self, tokens: torch.Tensor, fill: float) -> torch.Tensor:
        """(batch, seq, ...) -> (batch, n + seq, ...): each row's values in its token columns, ``fill`` elsewhere."""
        out = tokens.new_full((len(tokens), self.n + tokens.shape[1], *tokens.shape[2:]), fill)
        columns = self.columns(tokens.shape[1])
        if isinstance(columns, int):
            out[:, columns:] = tokens
        else:
            out[self.rows, columns] = tokens
        return out

    def embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (batch, n + seq, d), every row's prompt in place."""
        out = self.laid_out(embeds, 0)
        for prompt, index in self.prompts:
            first = self.n - len(prompt) if self.front else 0
            out[index, first:first + len(prompt)] = prompt.to(out.dtype)
        return out

    def mask(self, mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        """(batch, seq) -> (batch, n + seq): the prompt visible, the padding not (no mask where
        all rows agree and none was given: everything is visible)."""
        if mask is None:
            if self.uniform:
                return None
            mask = torch.ones(batch, seq, dtype=torch.long, device=self.starts.device)
        return self.laid_out(mask, 0).masked_fill(self.prompt_columns(mask.shape[1]), 1)

    def positions(self, positions: torch.Tensor, with_prompt: bool) -> torch.Tensor:
        """The tokens' positions moved up by n_r; with the prompt in the call, (batch, n + seq),
        the prompt's 0..n_r-1 in front."""
        moved = positions.expand(len(self.lengths), -1) + self.lengths[:, None]  # (batch, seq)
        if not with_prompt:
            return moved
        column = torch.arange(self.n + moved.shape[1], device=moved.device)[None]  # (1, n + seq)
        inside = column - (self.starts - self.lengths)[:, None]  # (batch, n + seq): place within the prompt
        return torch.where(self.prompt_columns(moved.shape[1]), inside, self.laid_out(moved, 0))

    def front_mask(self, mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        """A later ``generate`` step's (batch, past + seq) mask with the cached prompt columns in
        front (``seq``: past + seq, the length of a mask left out)."""
        if mask is None:
            if self.uniform:
                return None
            mask = torch.ones(batch, seq, dtype=torch.long, device=self.starts.device)
        front = self.prompt_columns(0).to(mask.dtype)  # (batch, n)
        return torch.cat([front, mask], dim=1)


def _cut(value: torch.Tensor, columns: int | torch.Tensor) -> torch.Tensor:
    """(batch, n + seq, ...) -> (batch, seq, ...): the tokens' columns, from n on or per row."""
    if isinstance(columns, int):
        return value[:, columns:]
    return value[torch.arange(len(value), device=value.device)[:, None], columns]


class PromptHooks:
    """The hooks that put the active prompts in front of the input: one set per model, shared by
    its prompt adapters (several active prompts are concatenated; in a per-row batch, each row's own)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.made: tuple[torch.Tensor, int | torch.Tensor] | None = None  # (inputs_embeds built, token columns)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            encoder = model.get_encoder()
            self.handles = [model.register_forward_pre_hook(self.widen_encoder_mask, with_kwargs=True),
                            encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True)]
        else:
            self.handles = [model.register_forward_pre_hook(self.before_model, with_kwargs=True),
                            model.register_forward_hook(self.after_model, with_kwargs=True)]

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kw = virtual_tokens.arguments(model, args, kwargs)
        tokens = virtual_tokens.tokens(kw)
        rows = RowPrompts.of(model, len(tokens), tokens.device)
        if rows is None:
            return None
        cached = virtual_tokens.cached_length(kw)
        if rows.front:  # rows that differ on a decoder-only model: every row's positions given explicitly
            if kw.get("position_ids") is None:
                kw["position_ids"] = virtual_tokens.positions(kw) - (rows.n if cached else 0)  # (1, seq)
            kw["position_ids"] = rows.positions(kw["position_ids"], with_prompt=not cached)
        else:
            _update(kw, "position_ids", lambda p: rows.positions(p, with_prompt=not cached))
        if cached:  # generating: the cache holds the prompts
            past = cached - rows.n
            kw["attention_mask"] = rows.front_mask(kw.get("attention_mask"), len(tokens), past + tokens.shape[1])
            return (), kw
        embeds = self._embed(kw)  # (batch, seq, d)
        kw["attention_mask"] = rows.mask(kw.get("attention_mask"), *embeds.shape[:2])
        kw["inputs_embeds"], kw["input_ids"] = rows.embeds(embeds), None  # (batch, n + seq, d)
        self.made = (kw["inputs_embeds"], rows.columns(embeds.shape[1]))
        if kw.get("labels") is not None and kw["labels"].shape == embeds.shape[:2]:
            kw["labels"] = rows.laid_out(kw["labels"], -100)  # token and language-model labels
        _update(kw, "token_type_ids", lambda t: rows.laid_out(t, 0))
        return (), kw

    def after_model(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        made, self.made = self.made, None
        if made is None or kwargs.get("inputs_embeds") is not made[0] or not hasattr(output, "keys"):
            return None
        length, columns = made[0].shape[1], made[1]
        for key in list(output.keys()):
            value = output[key]
            if key == "hidden_states" and isinstance(value, tuple):
                output[key] = tuple(_cut(h, columns) if h.shape[1] == length else h for h in value)  # (batch, seq, d)
            elif key in TOKEN_OUTPUTS and value.dim() >= TOKEN_OUTPUTS[key] and value.shape[1] == length:
                output[key] = _cut(value, columns)  # (batch, seq, ...)
        return output

    def before_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kw = virtual_tokens.arguments(encoder, args, kwargs)
        embeds = self._embed(kw)  # (batch, seq, d)
        rows = RowPrompts.of(self.model, len(embeds), embeds.device, encoder=True)
        if rows is None:
            return None
        mask = kw.get("attention_mask")
        if mask is None or mask.shape[1] == embeds.shape[1]:  # else the root hook has widened it
            kw["attention_mask"] = rows.mask(mask, *embeds.shape[:2])
        kw["inputs_embeds"], kw["input_ids"] = rows.embeds(embeds), None  # (batch, n + seq, d)
        return (), kw

    def widen_encoder_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """The decoder attends to the encoder's output, which is n positions longer."""
        kw = virtual_tokens.arguments(model, args, kwargs)
        mask, encoded = kw.get("attention_mask"), kw.get("encoder_outputs")
        tokens = virtual_tokens.tokens(kw)
        batch = len(encoded[0]) if encoded is not None else len(tokens)
        rows = RowPrompts.of(model, batch, encoded[0].device if encoded is not None else tokens.device, encoder=True)
        if rows is None:
            return None
        seq = encoded[0].shape[1] - rows.n if encoded is not None else tokens.shape[1]
        if mask is None or mask.shape[1] == seq:
            kw["attention_mask"] = rows.mask(mask, batch, seq)
        return (), kw

    def _embed(self, kw: dict) -> torch.Tensor:
        """The input's embeddings, (batch, seq, d), through the embedding module (and any adapter on it)."""
        if kw.get("inputs_embeds") is not None:
            return kw["inputs_embeds"]
        return self.model.get_input_embeddings()(kw["input_ids"])


def _decoder_only(model: nn.Module) -> bool:
    """Whether per-row prompts go just before each row's tokens (a decoder-only model) or first."""
    kind = model_type(model)
    if kind not in ANATOMIES:
        raise ConfigError(f"per-row prompts need to know whether a '{kind}' model reads its last or its first "
                          f"position, and deltatune knows the layouts of {', '.join(sorted(ANATOMIES))}.",
                          "give each prompt adapter's rows a batch of their own.")
    if ANATOMIES[kind].decoder_only and "position_ids" not in virtual_tokens.parameter_names(type(model)):
        raise ConfigError(f"per-row prompts move each row's positions, and {type(model).__name__}'s forward "
                          "takes no position_ids.", "give each prompt adapter's rows a batch of their own.")
    return ANATOMIES[kind].decoder_only


def _update(kw: dict, key: str, change: Any) -> None:
    """Rewrite an argument the caller passed; leave absent ones absent."""
    if kw.get(key) is not None:
        kw[key] = change(kw[key])
