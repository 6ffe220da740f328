"""Where things are inside each transformer family: a role map per ``model_type``.

Methods that need roles rather than names (adapters go after the attention and feed-forward
output projections, IA3 scales keys, values and the feed-forward activation, layer tuning
picks the top blocks) ask here. Each role is a list of ``target_modules`` entries, so users
can always override them with names of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.errors import ConfigError

_BLOCK = r"\.\d+"


@dataclass(frozen=True)
class Anatomy:
    """Roles of one architecture family. Every role is a list of target-module entries."""

    blocks: str  # regex of the repeated transformer blocks, in depth order
    query: list[str]
    key: list[str]
    value: list[str]
    attn_out: list[str]  # attention output projection (before residual and norm)
    ffn_out: list[str]  # feed-forward output projection (its input is the activation)
    ffn: list[str]  # the whole feed-forward sub-layer, for parallel adapters
    ffn_input_arg: int = 0  # which positional argument of `ffn` is the sub-layer's input
    final_norm: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # attention modules (cross-attention too)
    #: the self-attention modules among them, where they differ (T5's SelfAttention, not EncDecAttention)
    self_attention_only: list[str] | None = None
    hidden_size_attr: str = "hidden_size"
    # A causal decoder without an encoder: it numbers its input's positions after whatever a
    # key/value cache already holds, so a prefix counts as that many earlier tokens.
    decoder_only: bool = False

    @property
    def self_attention(self) -> list[str]:
        """The self-attention modules (those a prefix of virtual tokens joins)."""
        return self.attention if self.self_attention_only is None else self.self_attention_only

    @property
    def fused_qkv(self) -> bool:
        """One projection computes queries, keys and values (GPT-2's c_attn)."""
        return self.key == self.query


_BERT = Anatomy(
    blocks=r"(.*\.)?encoder\.layer" + _BLOCK,
    query=["attention.self.query"], key=["attention.self.key"], value=["attention.self.value"],
    attn_out=["attention.output.dense"], ffn_out=[r"re:.*layer\.\d+\.output\.dense"],
    # BertOutput(hidden, input_tensor): input_tensor is the feed-forward sub-layer's input.
    ffn=[r"re:.*layer\.\d+\.output"], ffn_input_arg=1, attention=["attention.self"],
)

ANATOMIES: dict[str, Anatomy] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "mpnet": Anatomy(
        blocks=r"(.*\.)?encoder\.layer" + _BLOCK,
        query=["attention.attn.q"], key=["attention.attn.k"], value=["attention.attn.v"],
        attn_out=["attention.attn.o"], ffn_out=[r"re:.*layer\.\d+\.output\.dense"],
        ffn=[r"re:.*layer\.\d+\.output"], ffn_input_arg=1, attention=["attention.attn"],
    ),
    "distilbert": Anatomy(
        blocks=r"(.*\.)?transformer\.layer" + _BLOCK,
        query=["attention.q_lin"], key=["attention.k_lin"], value=["attention.v_lin"],
        attn_out=["attention.out_lin"], ffn_out=["ffn.lin2"], ffn=["ffn"],
        attention=["attention"], hidden_size_attr="dim",
    ),
    "gpt2": Anatomy(
        blocks=r"(.*\.)?h" + _BLOCK,
        query=["attn.c_attn"], key=["attn.c_attn"], value=["attn.c_attn"],  # one fused projection
        attn_out=["attn.c_proj"], ffn_out=["mlp.c_proj"], ffn=["mlp"],
        final_norm=["ln_f"], attention=["attn"], hidden_size_attr="n_embd", decoder_only=True,
    ),
    "t5": Anatomy(
        blocks=r"(encoder|decoder)\.block" + _BLOCK,
        query=["SelfAttention.q", "EncDecAttention.q"], key=["SelfAttention.k", "EncDecAttention.k"],
        value=["SelfAttention.v", "EncDecAttention.v"],
        attn_out=["SelfAttention.o", "EncDecAttention.o"], ffn_out=["DenseReluDense.wo"],
        ffn=["DenseReluDense"], final_norm=["encoder.final_layer_norm", "decoder.final_layer_norm"],
        attention=["SelfAttention", "EncDecAttention"], self_attention_only=["SelfAttention"],
        hidden_size_attr="d_model",
    ),
}
_LLAMA = Anatomy(
    blocks=r"(.*\.)?layers" + _BLOCK,
    query=["self_attn.q_proj"], key=["self_attn.k_proj"], value=["self_attn.v_proj"],
    attn_out=["self_attn.o_proj"], ffn_out=["mlp.down_proj"], ffn=["mlp"],
    final_norm=["re:(.*\\.)?model\\.norm"], attention=["self_attn"], decoder_only=True,
)
for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3"):
    ANATOMIES[_name] = _LLAMA


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def anatomy_of(model: nn.Module, method: str = "this method") -> Anatomy:
    """The role map of the model's family.

    Raises:
        ConfigError: the family has no role map; the fix is to name modules explicitly.
    """
    kind = model_type(model)
    if kind not in ANATOMIES:
        known = ", ".join(sorted(ANATOMIES))
        raise ConfigError(f"{method} does not know where the layers of model type '{kind}' are "
                          f"(known: {known}).", "set target_modules to the module names to adapt.")
    return ANATOMIES[kind]


def query_and_value(model: nn.Module, method: str) -> list[str]:
    """The attention's query and value projections: the default targets of LoRA-like methods
    (peft's defaults for LoRA, VeRA, LoHa and LoKr)."""
    roles = anatomy_of(model, f"{method}'s default target_modules")
    return list(dict.fromkeys(roles.query + roles.value))


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return getattr(config, anatomy_of(model).hidden_size_attr)
