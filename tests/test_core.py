"""The engine, method-agnostic: config errors, targeting, accounting, verbs and adapter files.

LoRA is the vehicle (every behaviour here is the core's); the numbers are worked out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.targets import resolve_targets
from deltatune.io import adapter_files
from tiny import ROUND_TRIP, assert_close_ulps, build, inputs, output, perturb

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)  # what LoRA adapts


def structure(model: nn.Module) -> tuple:
    """Everything an aborted apply must leave as it was: module names, types, state keys."""
    return ([(n, type(m)) for n, m in model.named_modules()], sorted(model.state_dict()),
            hasattr(model, "_deltatune_state"))


def lora(**kw) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": 4, "target_modules": ["query", "value"], **kw})


# --- configs -----------------------------------------------------------------------------

def test_error_str_has_message_and_fix_line():
    import pickle

    error = dt.ConfigError("bad r.", "use 8.")
    assert str(error) == "bad r.\n  fix: use 8." and str(dt.ConfigError("bad r.")) == "bad r."
    assert error.args == ("bad r.",)  # as any exception: args[0] is the message
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # crosses process boundaries whole


@pytest.mark.parametrize("values,expected", [
    ({"method": "lora", "rank": 8}, ["unknown key 'method.rank'", "allowed keys:", "lora_alpha", "r,"]),
    ({"r": 8}, ["needs a 'method' key"]),
    ({"method": "lorax"}, ["unknown method 'lorax'", "lora"]),
])
def test_config_from_dict_errors_name_the_key(values, expected):
    with pytest.raises(dt.ConfigError) as info:
        dt.config_from_dict(values)
    assert all(part in str(info.value) for part in expected), str(info.value)
    assert "fix:" in str(info.value)


def test_an_unknown_method_is_answered_with_the_closest_name_if_any():
    methods = "adalora, adapter, bitfit, full, ia3, layer, ln_tuning, loha, lokr, lora, oft, prefix, prompt, vera"
    for name, fix in [("lorax", f"did you mean 'lora'? choose one of: {methods}."), ("zzzz", f"choose one of: {methods}.")]:
        with pytest.raises(dt.ConfigError) as info:
            dt.config_from_dict({"method": name})
        assert str(info.value) == f"unknown method '{name}'.\n  fix: {fix}"


@pytest.mark.parametrize("text,words", [("[1, inf)", "at least 1"), ("(0, inf)", "greater than 0"),
                                        ("[0, 1)", "at least 0 and below 1"), ("(0, 1]", "greater than 0 and at most 1"),
                                        ("[2, 100]", "from 2 to 100"), ("(-inf, 5]", "at most 5"),
                                        ("(-inf, inf)", "a finite number")])
def test_a_range_in_words(text, words):
    from deltatune.core.fields import Range

    assert str(Range.parse(text)) == words


def test_type_names_in_errors_read_as_written():
    from typing import Literal, Optional, Union

    from deltatune.core.fields import type_name

    assert type_name(int) == "int" and type_name(list[str]) == "list[str]"
    assert type_name(Literal["none", "all"]) == "'none' | 'all'"
    assert type_name(Optional[int]) == "Optional[int]" and type_name(Union[str, list[str]]) == "Union[str, list[str]]"


def test_a_range_keeps_whole_bounds_whole_and_reads_its_brackets():
    from deltatune.core.fields import Range

    whole = Range.parse("[-2, 5)")
    assert (whole.low, whole.high, whole.open_low, whole.open_high) == (-2, 5, False, True)
    assert type(whole.low) is int and type(whole.high) is int  # errors say "at least -2", not "-2.0"
    half = Range.parse("(0.5, inf]")
    assert (half.low, half.high, half.open_low, half.open_high) == (0.5, float("inf"), True, False)
    assert [x in whole for x in (-2, 4.9, 5, float("nan"))] == [True, True, False, False]
    with pytest.raises(ValueError, match="not an interval"):
        Range.parse("0..1")


def test_help_field_carries_its_help_range_and_typical_value_and_copies_list_defaults():
    import dataclasses

    from deltatune.core.fields import Range, help_field

    @dataclasses.dataclass
    class Fields:
        names: list = help_field(["a"], "some names")
        rate: float = help_field(0.5, "a rate", range="(0, 1]", typical=0.1)
        size: int = help_field(4, "a size")

    names, rate, size = dataclasses.fields(Fields)
    assert names.metadata["help"] == "some names" and names.metadata["range"] is None
    assert rate.metadata["range"] == Range(0, 1, True, False) and rate.metadata["typical"] == 0.1
    assert size.metadata["typical"] == 4  # no typical given: the default
    first, second = Fields(), Fields()
    assert first.names == ["a"] and first.names is not second.names
    assert (first.rate, first.size) == (0.5, 4)
    assert Fields(rate=0.2).rate == 0.2


def test_register_makes_a_method_reachable_and_refuses_an_unknown_family():
    import dataclasses

    from deltatune.core.method import _REGISTRY, Method, MethodConfig, method_class, register

    config_class = dataclasses.dataclass(type("ToyConfig", (MethodConfig,), {}))
    toy = type("Toy", (Method,), {"name": "toy-method", "config_class": config_class, "family": "additive"})
    try:
        assert register(toy) is toy
        assert method_class("toy-method") is toy and config_class.method == "toy-method"
    finally:
        _REGISTRY.pop("toy-method", None)
    odd = type("Odd", (Method,), {"name": "odd", "config_class": config_class, "family": "magic"})
    with pytest.raises(ValueError, match="Odd.family must be one of"):
        register(odd)
    assert "odd" not in dt.registered()


def test_a_method_that_leaves_out_a_step_says_which_class_lacks_it():
    from deltatune.core.method import Method

    toy = type("Toy", (Method,), {})(None)
    with pytest.raises(NotImplementedError, match="^Toy.inject$"):
        toy.inject(nn.Linear(1, 1), "default", None, None)
    assert toy.peft is None  # no peft format unless the method's file gives a codec
    from deltatune.core.method import PeftCodec

    codec = type("ToyPeft", (PeftCodec,), {})()
    with pytest.raises(NotImplementedError, match="^ToyPeft.peft_config$"):
        codec.peft_config(None, {}, {})
    with pytest.raises(NotImplementedError, match="^ToyPeft.config_from_peft$"):
        codec.config_from_peft({})


# --- targeting ---------------------------------------------------------------------------

Q0 = "bert.encoder.layer.0.attention.self.query"
Q1 = "bert.encoder.layer.1.attention.self.query"
V1 = "bert.encoder.layer.1.attention.self.value"


@pytest.mark.parametrize("entries,expected", [
    ([Q0], [Q0]),                                       # exact name
    (["attention.self.query"], [Q0, Q1]),               # dotted suffix
    (["query"], [Q0, Q1]),                              # one-part suffix
    ([r"re:.*layer\.1\..*(query|value)"], [Q1, V1]),    # regex over the whole name
    ("query", [Q0, Q1]),                                # a bare string is one entry
])
def test_target_forms(entries, expected):
    assert resolve_targets(build("bert"), entries, SUPPORTED, "LoRA") == expected


def test_all_linear_skips_heads_and_embeddings():
    names = resolve_targets(build("bert"), "all-linear", SUPPORTED, "LoRA")
    assert len(names) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    assert "classifier" not in names and not any("embeddings" in n for n in names)
    gpt2 = build("gpt2")
    names = resolve_targets(gpt2, "all-linear", SUPPORTED, "LoRA", linear_types=(nn.Linear, Conv1D))
    assert len(names) == 2 * 4 and "transformer.h.0.attn.c_attn" in names
    assert all(isinstance(gpt2.get_submodule(n), Conv1D) for n in names)  # not lm_head, wte, wpe


@pytest.mark.parametrize("config,expected", [
    (lora(target_modules=["query", "valeu"]), ["'valeu'", "matches no module", "did you mean", "value"]),
    (lora(target_modules=["uery"]), ["'uery'", "query"]),  # a suffix is whole name parts only
    (lora(target_modules=["attention.self.quer"]), ["attention.self.query"]),
    (lora(target_modules=["re:.*nothing"]), ["'re:.*nothing'", "matches no module", "query, key, value, dense"]),
    (lora(target_modules=["qkv"]), ["'qkv'", "matches no module", "modules end in: ", "query, key, value, dense"]),
    (lora(target_modules=["re:query("]), ["'re:query('", "not a valid regular expression"]),
    (lora(target_modules=["LayerNorm"]), ["target_modules entry 'LayerNorm' matches 'bert.embeddings.LayerNorm', a "
                                          "LayerNorm, which lora cannot adapt.\n  fix: choose modules of type Linear, "
                                          "Conv1D, Embedding."]),
    (lora(modules_to_save=["classifer"]), ["modules_to_save entry 'classifer'", "classifier"]),
])
def test_bad_targets_name_the_entry_and_leave_the_model_unchanged(config, expected):
    model = build("bert")
    before = structure(model)
    with pytest.raises(dt.TargetError) as info:
        dt.apply(model, config)
    assert all(part in str(info.value) for part in expected), str(info.value)
    assert structure(model) == before


def test_a_bad_second_adapter_leaves_the_first_in_place():
    model = build("bert")
    dt.apply(model, lora(), "a")
    before = structure(model)
    with pytest.raises(dt.TargetError):
        dt.apply(model, lora(target_modules=["key", "nothing"]), "b")
    assert structure(model) == before and dt.active_adapters(model) == ["a"]


class Letters(nn.Module):
    """Linear layers named alpha, bravo, ... (no name close to 'zzz') and one inside a Sequential."""

    def __init__(self, n: int):
        super().__init__()
        for name in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"][:n]:
            setattr(self, name, nn.Linear(1, 1))
        self.seq = nn.Sequential(nn.Linear(1, 1))  # "seq.0": a number is no name to suggest


def hint(model, entry, supported) -> str:
    with pytest.raises(dt.TargetError) as info:
        resolve_targets(model, [entry], supported, "lora")
    assert info.value.message == f"target_modules entry '{entry}' matches no module of {type(model).__name__}."
    return info.value.hint


def test_no_match_lists_the_name_ends_of_modules_the_method_can_adapt():
    assert hint(Letters(10), "zzz", (nn.Linear,)) == \
        "this model's Linear modules end in: alpha, bravo, charlie, delta, echo, foxtrot, golf, hotel, ...."
    assert hint(Letters(8), "zzz", (nn.Linear, Conv1D)) == \
        "this model's Linear/Conv1D modules end in: alpha, bravo, charlie, delta, echo, foxtrot, golf, hotel."
    assert hint(Letters(2), "zzz", (nn.Module,)) == "this model's modules end in: alpha, bravo, seq."
    assert hint(nn.Sequential(nn.ReLU()), "zzz", (nn.Linear,)) == "this model has no Linear module."


def test_no_match_suggests_the_five_closest_name_ends_also_for_a_regex():
    # a regex is compared without its 're:' (as a regex, "dense" is no whole module name here)
    assert hint(build("bert"), "re:dense", SUPPORTED) == \
        "did you mean one of: dense, pooler.dense, output.dense, encoder, bert.pooler.dense?"


def test_all_linear_leaves_out_heads_and_the_output_layer_whatever_its_name():
    from transformers import BertForMaskedLM

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.unembed = nn.Linear(4, 4), nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.unembed

    assert resolve_targets(Decoder(), "all-linear", (nn.Linear,), "lora") == ["block"]
    plain = nn.Sequential()  # no get_output_embeddings at all
    plain.add_module("proj", nn.Linear(4, 4))
    assert resolve_targets(plain, "all-linear", (nn.Linear,), "lora") == ["proj"]
    masked = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32))
    chosen = resolve_targets(masked, "all-linear", (nn.Linear,), "lora")
    assert len(chosen) == 6 and not any(name.startswith("cls.") for name in chosen)  # the MLM head's dense too

def test_target_refusals_word_for_word():
    with pytest.raises(dt.TargetError) as info:
        dt.apply(build("bert"), dt.LoraConfig(r=2, target_modules=["re:("]))
    assert str(info.value) == ("target_modules entry 're:(' is not a valid regular expression (missing ), unterminated "
                               "subpattern at position 0).\n  fix: write a Python regex over whole module names, e.g. "
                               "'re:.*\\.(query|value)'.")
    with pytest.raises(dt.TargetError) as info:
        dt.apply(nn.Sequential(nn.ReLU()), dt.LoraConfig(r=2, target_modules="all-linear"))
    assert str(info.value) == ("'all-linear' found no linear layer in Sequential.\n"
                               "  fix: name the modules in target_modules explicitly.")
    with pytest.raises(dt.ConfigError) as info:
        dt.config_from_dict({"r": 2})
    assert info.value.hint == f"one of: {', '.join(sorted(dt.registered()))}."


def test_all_linear_leaves_out_a_linear_layer_around_a_module_trained_in_full():
    class Gated(nn.Linear):  # a linear layer with a module inside it
        def __init__(self):
            super().__init__(4, 4)
            self.gate = nn.Linear(4, 4)

    model = nn.Module()
    model.plain, model.gated = nn.Linear(4, 4), Gated()
    assert resolve_targets(model, "all-linear", (nn.Linear,), "lora", exclude=["gated.gate"]) == ["plain"]
    assert resolve_targets(model, "all-linear", (nn.Linear,), "lora") == ["plain", "gated", "gated.gate"]

def test_peft_target_modules_a_string_is_one_regex_and_a_list_is_kept():
    from deltatune.core.peft_keys import targets_from_peft

    assert targets_from_peft(".*query") == ["re:.*query"]
    assert targets_from_peft("all-linear") == "all-linear"
    assert targets_from_peft(["query", "value"]) == ["query", "value"]


def test_peft_modules_are_named_by_everything_before_the_last_marker():
    from deltatune.core.peft_keys import modules_with

    keys = {"a.lora_A.b.lora_A.weight": 0, "c.lora_B.weight": 0, "c.lora_A.weight": 0, "d.weight": 0}
    assert modules_with(keys, "lora_A", "lora_B") == ["a.lora_A.b", "c"]


def test_peft_fields_we_do_not_implement_are_refused_unless_off():
    from deltatune.core.peft_keys import refuse_unsupported

    defaults = {"use_dora": False, "loftq_config": {}, "layer_replication": None}
    for off in ({}, {"use_dora": False}, {"loftq_config": None}, {"loftq_config": False}, {"layer_replication": {}}):
        refuse_unsupported(off, defaults)
    with pytest.raises(dt.AdapterFileError) as info:
        refuse_unsupported({"use_dora": True}, defaults)
    assert info.value.message == ("this peft adapter sets use_dora=True, which deltatune does not implement; "
                                  "loading it without would change its outputs.")
    assert info.value.hint == "retrain without use_dora, or use peft for this adapter."


# --- accounting --------------------------------------------------------------------------

class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4096, 4096)


def test_counts_on_one_large_linear():
    model = dt.apply(Big(), dt.LoraConfig(r=8, target_modules=["proj"]))
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == 8 * (4096 + 4096) == 65_536
    assert report.changed == 4096 * 4096  # merging rewrites every weight (not the bias)
    assert report.total == 4096 * 4096 + 4096 + 65_536 == 16_846_848
    assert report.stored_bytes == 4 * 65_536 and report.not_stored == 0
    assert report.trainable_percent == pytest.approx(100 * 65_536 / 16_846_848)
    assert str(report).startswith("trainable params: 65,536 || all params: 16,846,848 || trainable%: 0.3890")


def test_a_model_without_adapters_counts_everything_as_trainable():
    report = dt.parameter_report(Big())
    assert report.trainable == report.stored == report.total == report.changed == 4096 * 4096 + 4096
    assert report.not_stored == 0 and report.stored_bytes == 4 * report.total and report.per_module == {}


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.mid, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)


def test_counts_per_module_are_by_the_modules_own_names():
    """LoRA r=2 on proj (A 2x4 + B 4x2 + its trained bias 4), mid's bias (4), a copy of head
    (4x2 + 2): a wrapped module's base bias counts as the module, as it is saved."""
    model = nn.Module()
    model.body = Three()
    with pytest.warns(UserWarning, match="trains base biases in place"):
        dt.apply(model, dt.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["head"], bias="all"))
    report = dt.parameter_report(model)
    assert report.per_module == {"body.proj": {"trainable": 20, "stored": 20},
                                 "body.mid": {"trainable": 4, "stored": 4}, "body.head": {"trainable": 10, "stored": 10}}
    # merging rewrites proj's weight (4x4) and the head (its copy's 10), the trained biases changed too
    assert report.changed == 16 + 10 + 4 + 4
    assert report.trainable == report.stored == 34 and report.total == 20 + 20 + 10 + 16 + 10


def test_a_stored_tensor_counts_at_the_innermost_module_that_holds_it():
    """body's own bias (3) trains beside body.proj's LoRA: proj's tensors start with both names
    and count at body.proj, the longer one."""
    model = nn.Module()
    model.body = Three()
    model.body.bias = nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="trains base biases in place"):
        dt.apply(model, dt.LoraConfig(r=2, target_modules=["proj"], bias="all"))
    assert dt.parameter_report(model).per_module == {
        "body": {"trainable": 3, "stored": 3}, "body.proj": {"trainable": 20, "stored": 20},
        "body.mid": {"trainable": 4, "stored": 4}, "body.head": {"trainable": 2, "stored": 2}}


def test_stored_tensors_of_no_module_count_at_the_root():
    """VeRA r=4 on two 32x32 query layers: lambda_d (32) + lambda_b (4) each train; the shared
    projections A (4x32) and B (32x4) are stored once, at the root, and train not at all."""
    model = dt.apply(build("bert"), dt.VeraConfig(r=4, target_modules=["query"]))
    query = "bert.encoder.layer.{}.attention.self.query"
    assert dt.parameter_report(model).per_module == {query.format(0): {"trainable": 36, "stored": 36},
                                                     query.format(1): {"trainable": 36, "stored": 36},
                                                     "": {"trainable": 0, "stored": 256}}


def test_the_report_counts_the_named_adapter_else_the_active_one():
    model = dt.apply(Three(), dt.LoraConfig(r=1, target_modules=["proj"]), adapter_name="small")
    dt.apply(model, dt.LoraConfig(r=3, target_modules=["proj"]), adapter_name="big")
    assert dt.parameter_report(model).stored == 3 * 8  # "big", applied last, is active
    assert dt.parameter_report(model, "small").stored == 1 * 8
    dt.set_adapter(model, "small")
    assert dt.parameter_report(model).stored == 8
    dt.set_adapter(model, [])
    assert dt.parameter_report(model).stored == 8  # none active: the first applied


@pytest.mark.parametrize("nbytes,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                         (1024 ** 2 - 1, "1024.0 KiB"), (1024 ** 2, "1.0 MiB"),
                                         (5 * 1024 ** 3, "5.0 GiB")])
def test_stored_bytes_are_written_in_binary_units(nbytes, text):
    report = dt.ParameterReport(total=10, trainable=1, stored=2, not_stored=0, changed=0, stored_bytes=nbytes)
    assert f"stored params: 2 ({text}) ||" in str(report)


def test_report_as_data_and_text_has_percentages_and_regenerable_only_when_there_is_some():
    report = dt.ParameterReport(total=400, trainable=3, stored=6, not_stored=1, changed=8, stored_bytes=24)
    data = report.to_dict()
    assert data["trainable_percent"] == 0.75 and data["stored_percent"] == 1.5
    assert {k: data[k] for k in ("total", "trainable", "stored", "not_stored", "changed", "regenerable")} == \
        {"total": 400, "trainable": 3, "stored": 6, "not_stored": 1, "changed": 8, "regenerable": 0}
    assert str(report).endswith("trained, not stored: 1 || changed params: 8")
    report.regenerable = 1_024
    assert str(report).endswith("changed params: 8 || regenerable from the config: 1,024")
    assert dt.ParameterReport(0, 0, 0, 0, 0, 0).to_dict()["stored_percent"] == 0.0


# --- verbs -------------------------------------------------------------------------------

class Tiny(nn.Module):
    """One linear layer: adapter deltas add up exactly at its output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)

    def forward(self, x):
        return self.proj(x)


def tiny_with(*names: str) -> nn.Module:
    model = Tiny()
    for i, name in enumerate(names):
        dt.apply(model, dt.LoraConfig(r=2, target_modules=["proj"]), name)
        perturb(model, seed=10 + i)
    return model


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))


def run(model, adapters) -> torch.Tensor:
    dt.set_adapter(model, adapters)
    with torch.no_grad():
        return model(X)


def own_output(model, name: str, base: torch.Tensor) -> torch.Tensor:
    """base + (alpha/r) B A x with adapter ``name``'s own weights (alpha 16, r 2)."""
    delta = model.proj.deltas[name]
    return (base + 8.0 * X @ delta.lora_A.weight.T @ delta.lora_B.weight.T).detach()


def test_set_adapter_switches_and_combines():
    model = tiny_with("a", "b")
    with torch.no_grad():
        base = model.proj.base_layer(X)
    out_a, out_b, both = run(model, "a"), run(model, "b"), run(model, ["a", "b"])
    torch.testing.assert_close(out_a, own_output(model, "a", base))
    torch.testing.assert_close(out_b, own_output(model, "b", base))
    assert not torch.allclose(out_a, out_b, atol=1e-3)  # differ by far more than any rounding
    assert_close_ulps(both - base, (out_a - base) + (out_b - base))
    assert dt.active_adapters(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"proj.deltas.{a}.lora_{m}.weight" for a in "ab" for m in "AB"}


def test_set_adapter_to_one_freezes_the_other():
    model = tiny_with("a", "b")
    dt.set_adapter(model, "a")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "proj.deltas.a.lora_A.weight", "proj.deltas.a.lora_B.weight"}


def test_delete_adapter_restores_the_plain_module_when_last():
    model = tiny_with("a", "b")
    keys = sorted(Tiny().state_dict())
    dt.set_adapter(model, "b")
    expected_b = run(model, "b")
    dt.delete_adapter(model, "a")
    assert type(model.proj).__name__ == "DeltaLayer" and dt.active_adapters(model) == ["b"]
    torch.testing.assert_close(model(X).detach(), expected_b)
    dt.delete_adapter(model, "b")
    assert type(model.proj) is nn.Linear and sorted(model.state_dict()) == keys
    assert not hasattr(model, "_deltatune_state")
    torch.testing.assert_close(model(X).detach(), Tiny()(X).detach())


def test_disable_adapters_restores_state_after_an_exception():
    model = tiny_with("a")
    adapted = run(model, "a")
    with pytest.raises(RuntimeError, match="boom"):
        with dt.disable_adapters(model):
            torch.testing.assert_close(model(X).detach(), Tiny()(X).detach())
            raise RuntimeError("boom")
    torch.testing.assert_close(model(X).detach(), adapted)


@pytest.mark.parametrize("action,error,match", [
    (lambda m: dt.apply(m, dt.LoraConfig(r=2, target_modules=["proj"]), "a"), dt.ConfigError,
     "already has an adapter named 'a'"),
    (lambda m: dt.unmerge(m), dt.MergeError, "nothing is merged"),
    (lambda m: dt.set_adapter(m, "zz"), dt.ConfigError, "no adapter named 'zz'"),
    (lambda m: dt.delete_adapter(m, "zz"), dt.ConfigError, "no adapter named 'zz'"),
])
def test_refused_verbs_leave_the_model_as_it_was(action, error, match):
    model = tiny_with("a")
    expected, before = run(model, "a"), structure(model)
    with pytest.raises(error, match=match):
        action(model)
    assert structure(model) == before
    torch.testing.assert_close(model(X).detach(), expected)


@pytest.mark.parametrize("action,doing", [
    (lambda m: dt.merge(m), "merge again"), (lambda m: dt.set_adapter(m, "a"), "switch adapters"),
    (lambda m: dt.delete_adapter(m, "a"), "delete an adapter"),
    (lambda m: dt.disable_adapters(m).__enter__(), "disable adapters"),
    (lambda m: dt.apply(m, dt.LoraConfig(r=2, target_modules=["proj"]), "b"), "add an adapter"),
])
def test_merged_model_refuses_what_would_lose_the_merge(action, doing):
    model = tiny_with("a")
    dt.merge(model)
    with pytest.raises(dt.MergeError) as info:
        action(model)
    assert str(info.value) == (f"cannot {doing} while adapters are merged into the base weights.\n"
                               "  fix: call deltatune.unmerge(model) first.")


def test_merge_and_unload_after_merge_unloads_what_is_merged():
    """The README's order: merge, then merge_and_unload; the weights are folded in once."""
    model = tiny_with("a")
    expected = run(model, "a")
    dt.merge(model)
    plain = dt.merge_and_unload(model)
    assert isinstance(plain.proj, nn.Linear)
    assert_close_ulps(plain(X).detach(), expected)


def test_a_merge_that_fails_on_any_error_leaves_nothing_merged(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5))
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["0", "1"]), "a")
    perturb(model, seed=3)
    expected, weights = run(model, "a"), {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = [layer for _, layer in dt.core.method.iter_layers(model)]
    real_merge, calls = type(layers[0]).merge, []

    def fail_on_the_second(layer, name):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real_merge(layer, name)

    monkeypatch.setattr(type(layers[0]), "merge", fail_on_the_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        dt.merge(model)
    assert dt.core.verbs.merged_adapters(model) == []
    for name, param in model.named_parameters():
        assert_close_ulps(param.detach(), weights[name], ROUND_TRIP)  # W + d - d
    torch.testing.assert_close(run(model, "a"), expected)


def test_verbs_on_a_model_without_adapters_say_apply_first():
    with pytest.raises(dt.ConfigError) as info:
        dt.merge(Tiny())
    assert str(info.value) == "this model has no deltatune adapter.\n  fix: call deltatune.apply(model, config) first."


def test_an_unknown_adapter_name_is_answered_with_the_names_there_are():
    model = tiny_with("a", "b")
    with pytest.raises(dt.ConfigError) as info:
        dt.set_adapter(model, "c")
    assert str(info.value) == "no adapter named 'c'.\n  fix: the model has: a, b."


def test_a_target_that_holds_a_module_trained_in_full_is_refused():
    """The other direction of the modules_to_save overlap: a whole block adapted, one of its layers saved."""
    config = dt.LayerTuningConfig(top_k=1, modules_to_save=["bert.encoder.layer.1.output.dense"])
    with pytest.raises(dt.ConfigError) as info:
        dt.apply(build("bert"), config)
    assert str(info.value) == ("'bert.encoder.layer.1' is a layer target and overlaps 'bert.encoder.layer.1.output.dense'"
                               " in modules_to_save.\n  fix: a module is either adapted or trained in full, not both.")


def test_adapters_may_share_a_module_but_not_nest():
    """A second adapter whose module holds (or sits inside) one the first adapter wraps is refused
    before the model changes; both directions, word for word."""
    model = dt.apply(build("bert"), lora(target_modules=["query"]), adapter_name="a")
    before = structure(model)
    with pytest.raises(dt.ConfigError) as info:
        dt.apply(model, lora(target_modules=["classifier"], modules_to_save=["bert.encoder.layer.0.attention.self"]),
                 adapter_name="b")
    assert str(info.value) == ("'bert.encoder.layer.0.attention.self' overlaps 'bert.encoder.layer.0.attention.self."
                               "query', which another adapter already wraps.\n  fix: adapters may share a module but "
                               "not nest: target other modules or delete_adapter() the other adapter first.")
    assert structure(model) == before
    outer = dt.apply(build("bert"), dt.LayerTuningConfig(top_k=1), adapter_name="outer")
    with pytest.raises(dt.ConfigError, match="^'bert.encoder.layer.1.attention.self.query' overlaps 'bert.encoder.layer.1'"):
        dt.apply(outer, lora(target_modules=["query"]), adapter_name="inner")
    dt.apply(model, lora(target_modules=["query"]), adapter_name="shared")  # the same modules: allowed


def test_a_new_delta_lives_on_its_modules_device():
    """Deltas are built on the CPU and moved next to the module they adapt; the meta device stands
    in for a GPU here (a delta left on the CPU would show as 'cpu')."""
    model = dt.apply(build("bert").to("meta"), lora())
    added = {name: p.device.type for name, p in model.named_parameters() if "lora_" in name}
    assert len(added) == 2 * 2 * 2 and set(added.values()) == {"meta"}  # 2 layers x query, value x A, B


def test_a_second_adapter_under_a_taken_name_is_refused():
    model = tiny_with("a")
    with pytest.raises(dt.ConfigError) as info:
        dt.apply(model, dt.LoraConfig(r=2, target_modules=["proj"]), "a")
    assert str(info.value) == ("the model already has an adapter named 'a'.\n"
                               "  fix: pass another adapter_name, or delete_adapter() the old one.")


def test_modules_to_save_inside_another_are_saved_once_with_it():
    """'pooler' holds 'pooler.dense': one copy of the pooler trains, not a second one of its layer."""
    model = dt.apply(build("bert"), lora(modules_to_save=["pooler", "pooler.dense"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad and "pooler" in n] == [
        "bert.pooler.deltas.default.copy.dense.weight", "bert.pooler.deltas.default.copy.dense.bias"]


def test_merge_refusals_say_what_to_call_first():
    model = dt.apply(build("bert"), lora())
    with pytest.raises(dt.MergeError) as info:
        dt.unmerge(model)
    assert str(info.value) == "nothing is merged.\n  fix: call deltatune.merge(model) first."
    dt.merge(model)
    with pytest.raises(dt.MergeError) as info:
        dt.delete_adapter(model, "default")
    assert str(info.value) == ("cannot delete an adapter while adapters are merged into the base weights.\n"
                               "  fix: call deltatune.unmerge(model) first.")


def test_merge_refusals_name_the_adapter_and_the_methods_that_merge():
    model = dt.apply(build("bert"), lora())
    dt.merge(model)
    with pytest.raises(dt.MergeError) as info:
        dt.merge(model)
    assert str(info.value) == ("cannot merge again while adapters are merged into the base weights.\n"
                               "  fix: call deltatune.unmerge(model) first.")
    full = dt.apply(build("bert"), dt.FullFineTuningConfig())
    with pytest.raises(dt.MergeError) as info:
        dt.merge(full)
    mergeable = ", ".join(name for name, cls in dt.registered().items() if cls.mergeable)
    assert str(info.value) == ("adapter 'default' (full) cannot be merged: full fine-tuning already changed the base "
                               "weights; there is nothing to merge.\n"
                               f"  fix: serve it unmerged, or train a mergeable method ({mergeable}).")
    assert {"lora", "ia3", "bitfit"} <= set(mergeable.split(", ")) and "prompt" not in mergeable


def test_unload_leaves_a_plain_model_that_trains_in_full():
    model = dt.apply(build("bert"), lora())
    dt.unload(model)
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "_deltatune_state")


def test_deleting_the_last_adapter_leaves_a_model_that_trains_in_full():
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=2))
    assert not all(p.requires_grad for p in model.parameters()) and "generate" in vars(model)  # adapter_names=
    dt.delete_adapter(model, "default")
    assert all(p.requires_grad for p in model.parameters()) and "generate" not in vars(model)


def test_a_delta_that_cannot_merge_says_which():
    from deltatune.core.layer import Delta

    class Shift(Delta):
        pass

    for verb in (Shift().merge, Shift().unmerge):
        with pytest.raises(dt.MergeError, match="^Shift cannot be folded into the base weights.$"):
            verb(nn.Linear(1, 1))


# --- adapter files -----------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A tiny BERT with a trained-looking adapter, its outputs, and its saved directory."""
    model = dt.apply(build("bert"), lora(modules_to_save=["classifier"]))
    perturb(model)
    expected = output(model, inputs("bert"))
    return model, expected, dt.save_adapter(model, tmp_path / "adapter")


def test_saved_files_hold_the_config_and_only_the_stored_tensors(saved):
    model, _, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["config"]["r"] == 4
    assert config["deltatune_version"] == dt.__version__ and config["base_model_type"] == "bert"
    assert config["base_fingerprint"].startswith("sha256:")
    _, tensors = dt.read_adapter(path)
    layers = [f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
              for i in (0, 1) for m in ("query", "value") for ab in "AB"]
    assert sorted(tensors) == sorted(layers + ["classifier.weight", "classifier.bias"])
    assert not any(part in key for key in tensors for part in ("default", "base_layer", "deltas"))
    torch.testing.assert_close(tensors[layers[0]], model.get_parameter(
        "bert.encoder.layer.0.attention.self.query.deltas.default.lora_A.weight").detach())
    from safetensors import safe_open

    with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "deltatune": json.dumps(config)}  # "pt": what transformers reads
    assert (path / "adapter_config.json").read_text().startswith('{\n  "format": "deltatune",\n')  # as peft: indent 2
    dt.save_adapter(model, path.parent / "new" / "deeper" / "peft", format="peft")  # missing folders are made
    with safe_open(path.parent / "new" / "deeper" / "peft" / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_the_base_fingerprint_covers_every_adapted_module():
    """Two bases whose adapted layers differ only in the first one's bias: the LoRA tensors fit
    both, the fingerprint tells them apart."""
    from deltatune.io.adapter_files import base_fingerprint

    def two_layers(first_bias: bool) -> nn.Module:
        model = nn.Module()
        model.first, model.second = nn.Linear(4, 4, bias=first_bias), nn.Linear(4, 4)
        return dt.apply(model, dt.LoraConfig(r=2, target_modules=["first", "second"]))

    assert base_fingerprint(two_layers(True), "default") != base_fingerprint(two_layers(False), "default")
    assert base_fingerprint(two_layers(True), "default") == base_fingerprint(two_layers(True), "default")


def test_load_into_another_shaped_base_names_the_module_and_changes_nothing(saved):
    _, _, path = saved
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(
        vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3))
    before = structure(other)
    with pytest.raises(dt.AdapterFileError, match=r"attention\.self\.query\.lora_A\.weight.*shape"):
        dt.load_adapter(other, path)
    assert structure(other) == before


@pytest.mark.parametrize("cut", [slice(0, 4), slice(0, 200), slice(0, -4)])  # prefix, header, data
def test_truncated_weights_are_reported_as_corrupted(saved, cut):
    _, _, path = saved
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[cut])
    with pytest.raises(dt.AdapterFileError, match="corrupted"):
        dt.load_adapter(build("bert"), path)


def test_broken_json_config_falls_back_to_the_embedded_one(saved):
    _, expected, path = saved
    (path / "adapter_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="not valid JSON"):
        model = dt.load_adapter(build("bert"), path)
    assert_close_ulps(output(model, inputs("bert")), expected)


def test_pickle_only_directory_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(dt.AdapterFileError, match="pickle"):
        dt.load_adapter(build("bert"), tmp_path)


def test_save_to_a_file_path_is_refused(saved, tmp_path):
    model, _, _ = saved
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(dt.AdapterFileError) as info:
        dt.save_adapter(model, tmp_path / "a_file")
    assert str(info.value) == (f"cannot save the adapter to '{tmp_path / 'a_file'}': it is a file, not a directory.\n"
                               "  fix: choose a directory path.")
    with pytest.raises(dt.ConfigError) as info:
        dt.save_adapter(model, tmp_path / "onnx", format="onnx")
    assert str(info.value) == "unknown adapter format 'onnx'.\n  fix: use 'deltatune' or 'peft'."
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_failed_save_keeps_the_previous_adapter(saved, monkeypatch):
    model, expected, path = saved
    first = (path / "adapter_model.safetensors").read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_files, "save_file", fail_midway)
    perturb(model, seed=7)
    with pytest.raises(dt.AdapterFileError, match="No space left"):
        dt.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = dt.load_adapter(build("bert"), path)
    torch.testing.assert_close(output(fresh, inputs("bert")), expected, atol=0, rtol=0)


def _fail_after(monkeypatch, owner, attribute: str, calls_before_failure: int) -> None:
    """``owner.attribute`` raises RuntimeError (not a deltatune error) on call number N + 1."""
    real, calls = getattr(owner, attribute), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before_failure:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)


def _everything(model: nn.Module) -> tuple:
    """structure() plus what trains, the active adapters and the hooks the model carries."""
    state = getattr(model, "_deltatune_state", None)
    return (structure(model), [(n, p.requires_grad) for n, p in model.named_parameters()],
            list(state.active) if state else None, len(model._forward_pre_hooks), len(model._forward_hooks),
            "generate" in model.__dict__)


@pytest.mark.parametrize("first", [None, "lora"])
@pytest.mark.parametrize("failing,config", [
    (("deltatune.methods.lora", "PlainLora", "__init__", 3), dt.LoraConfig(r=2, target_modules=["query", "value"])),
    (("deltatune.core.verbs", None, "set_adapter", 0), dt.LoraConfig(r=2, target_modules=["key"])),
    (("deltatune.methods.prompt", "PromptHooks", "__init__", 0), dt.config_from_dict({"method": "prompt"})),
    (("deltatune.methods.prefix", None, "prefix_hooks", 0), dt.config_from_dict({"method": "prefix"})),
], ids=["lora-third-delta", "lora-set-adapter", "prompt-hooks", "prefix-hooks"])
def test_an_apply_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch, failing, config, first):
    import importlib

    model = build("bert")
    if first:
        dt.apply(model, dt.LoraConfig(r=2, target_modules=["query"]), "first")
    before, batch = _everything(model), inputs("bert")
    expected = output(model, batch)
    module, cls, attribute, calls = failing
    owner = importlib.import_module(module)
    _fail_after(monkeypatch, getattr(owner, cls) if cls else owner, attribute, calls)
    with pytest.raises(RuntimeError, match="out of memory"):
        dt.apply(model, config, "second")
    monkeypatch.undo()
    assert _everything(model) == before
    torch.testing.assert_close(output(model, batch), expected, rtol=0, atol=0)
    dt.apply(model, config, "second")  # the name is free again


def test_a_load_that_fails_on_any_error_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    saved = build("bert")
    dt.apply(saved, dt.config_from_dict({"method": "prompt"}))
    dt.save_adapter(saved, tmp_path / "a")
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["query"]), "first")
    before = _everything(model)
    _fail_after(monkeypatch, adapter_files, "load_adapter_state_dict", 0)
    with pytest.raises(RuntimeError, match="out of memory"):
        dt.load_adapter(model, tmp_path / "a", "second")
    assert _everything(model) == before
