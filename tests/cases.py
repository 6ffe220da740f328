"""The case table: every method x family combination the shared invariants run on.

A row's knobs say what to expect (identity at init, mergeable); the shared tests never branch
on the method's type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

import deltatune as dt
from tiny import HEADS

ALL = ["bert", "roberta", "distilbert", "gpt2", "llama", "t5"]


@dataclass
class Case:
    id: str
    config: Callable[[str], dt.MethodConfig]  # family -> config
    families: list[str] = field(default_factory=lambda: list(ALL))
    identity_at_init: bool = True  # a fresh adapter leaves outputs unchanged
    mergeable: bool = False
    exact_when_disabled: bool = True  # False where the method trains base weights in place
    #: model -> how many numbers the adapter file holds that no trainable parameter holds, for a
    #: method whose file joins trained and frozen parts in one tensor (PiSSA's rank-2r file holds
    #: its frozen start B0, A0 beside B, A). None: a stored tensor that is not a trainable
    #: parameter is frozen (or computed on save) as a whole.
    frozen_in_stored: Callable[[nn.Module], int] | None = None
    #: each row of a batch can run its own adapter of this kind (deltatune.mixed_batch)
    per_row: bool = True


# DistilBERT's attention takes no key/value cache: prefix tuning refuses it (tests/methods/test_prefix.py).
PREFIX_FAMILIES = [f for f in ALL if f != "distilbert"]


# LLaMA and T5 have no bias terms: BitFit refuses them (tests/methods/test_bitfit.py).
BIAS_FAMILIES = [f for f in ALL if f not in ("llama", "t5")]


def _heads(family: str) -> list[str]:
    return HEADS[family]


def _pissa_start(model: nn.Module) -> int:
    """The numbers of PiSSA's frozen start B0, A0, which its file holds beside B and A."""
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith((".lora_A0", ".lora_B0")))


CASES = [
    Case("lora", lambda f: dt.LoraConfig(r=4, modules_to_save=_heads(f)), mergeable=True),
    Case("lora-all-linear", lambda f: dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.1),
         mergeable=True),
    Case("lora-rslora-bias", lambda f: dt.LoraConfig(r=4, use_rslora=True, bias="lora_only"),
         families=["bert", "gpt2"], mergeable=True, exact_when_disabled=False, per_row=False),
    Case("lora-dora", lambda f: dt.LoraConfig(r=4, use_dora=True, modules_to_save=_heads(f)), mergeable=True),
    Case("lora-dora-all-linear-dropout", lambda f: dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.1,
                                                                 use_dora=True), families=["bert", "gpt2", "t5"],
         mergeable=True),
    Case("lora-pissa", lambda f: dt.LoraConfig(r=4, init="pissa", modules_to_save=_heads(f)), mergeable=True,
         frozen_in_stored=_pissa_start),
    Case("lora-pissa-niter-rslora-dora", lambda f: dt.LoraConfig(r=4, init="pissa_niter_2", use_rslora=True,
                                                                 use_dora=True, target_modules="all-linear"),
         families=["bert", "gpt2", "llama"], mergeable=True, frozen_in_stored=_pissa_start),
    Case("full", lambda f: dt.FullFineTuningConfig(modules_to_save=_heads(f)), exact_when_disabled=False,
         per_row=False),
    Case("layer", lambda f: dt.LayerTuningConfig(top_k=1, modules_to_save=_heads(f)), mergeable=True, per_row=False),
    Case("prompt", lambda f: dt.PromptTuningConfig(num_virtual_tokens=4, modules_to_save=_heads(f)),
         identity_at_init=False),
    Case("prompt-random", lambda f: dt.PromptTuningConfig(num_virtual_tokens=3, init="random"),
         families=["bert", "llama"], identity_at_init=False),
    Case("prefix", lambda f: dt.PrefixTuningConfig(num_virtual_tokens=3, hidden=16, modules_to_save=_heads(f)),
         families=PREFIX_FAMILIES, identity_at_init=False),
    Case("prefix-plain", lambda f: dt.PrefixTuningConfig(num_virtual_tokens=3, reparameterize=False),
         families=PREFIX_FAMILIES, identity_at_init=False),
    Case("adapter-houlsby", lambda f: dt.AdapterConfig(bottleneck=8, modules_to_save=_heads(f))),
    Case("adapter-pfeiffer", lambda f: dt.AdapterConfig(bottleneck=4, placement="pfeiffer", activation="relu")),
    Case("adapter-parallel", lambda f: dt.AdapterConfig(bottleneck=8, placement="parallel", scaling=2.0,
                                                        init="kaiming", modules_to_save=_heads(f))),
    Case("ia3", lambda f: dt.IA3Config(modules_to_save=_heads(f)), mergeable=True),
    Case("ia3-all-linear-random", lambda f: dt.IA3Config(target_modules="all-linear", init_ia3_weights=False),
         identity_at_init=False, mergeable=True),
    Case("adalora", lambda f: dt.AdaLoraConfig(init_r=4, target_r=2, modules_to_save=_heads(f)), mergeable=True),
    # (E, A, B ~ N(0, 1): a small alpha keeps the update near W0's size, as training would)
    Case("adalora-all-linear-random", lambda f: dt.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=0.1, target_modules="all-linear",
                                                                 init_lora_weights=False, lora_dropout=0.1),
         families=["bert", "gpt2", "llama"], identity_at_init=False, mergeable=True),
    Case("bitfit", lambda f: dt.BitFitConfig(modules_to_save=_heads(f)), families=BIAS_FAMILIES, mergeable=True),
    Case("ln-tuning", lambda f: dt.LNTuningConfig(modules_to_save=_heads(f)), mergeable=True),
    Case("ln-tuning-attention-output", lambda f: dt.LNTuningConfig(target_modules=["re:.*attention.*LayerNorm"]),
         families=["bert", "roberta"], mergeable=True),
    Case("loha", lambda f: dt.LoHaConfig(r=2, modules_to_save=_heads(f)), mergeable=True),
    Case("loha-all-linear-random", lambda f: dt.LoHaConfig(r=2, alpha=4, target_modules="all-linear", init_weights=False,
                                                           rank_dropout=0.1, module_dropout=0.1),
         families=["bert", "gpt2", "llama"], identity_at_init=False, mergeable=True),
    Case("lokr", lambda f: dt.LoKrConfig(r=2, modules_to_save=_heads(f)), mergeable=True),
    Case("lokr-both-all-linear-random", lambda f: dt.LoKrConfig(r=1, target_modules="all-linear", decompose_both=True,
                                                                init_weights=False, rank_dropout=0.1, module_dropout=0.1),
         families=["bert", "gpt2"], identity_at_init=False, mergeable=True),
    # (random Kronecker factors on all of LLaMA's layers grow its hidden states far past its outputs:
    # merged and unmerged differ there by more than a few ulps of the outputs)
    Case("lokr-lycoris-factor-all-linear", lambda f: dt.LoKrConfig(r=2, target_modules="all-linear", init_weights="lycoris",
                                                                   decompose_factor=4, rank_dropout=0.1,
                                                                   rank_dropout_scale=True),
         families=["llama", "t5"], mergeable=True),
    Case("oft", lambda f: dt.OFTConfig(oft_block_size=8, modules_to_save=_heads(f)), mergeable=True),
    Case("oft-exact-shared-all-linear-random", lambda f: dt.OFTConfig(
        r=4, oft_block_size=0, target_modules="all-linear", use_cayley_neumann=False, block_share=True,
        init_weights=False, module_dropout=0.5), families=["bert", "gpt2", "llama"], identity_at_init=False,
        mergeable=True),
    Case("vera", lambda f: dt.VeraConfig(r=4, modules_to_save=_heads(f)), mergeable=True),
    # layers of several shapes slice one pair of projections; the file holds only the vectors
    Case("vera-no-projection-all-linear", lambda f: dt.VeraConfig(
        r=8, target_modules="all-linear", save_projection=False, projection_prng_key=7, vera_dropout=0.1),
        families=["bert", "gpt2", "llama"], mergeable=True),
]


def case_params(families_filter: Callable[[Case], bool] = lambda c: True):
    """(case, family) pairs for pytest.mark.parametrize, with readable ids."""
    import pytest

    return [pytest.param(case, family, id=f"{case.id}-{family}")
            for case in CASES if families_filter(case) for family in case.families]
