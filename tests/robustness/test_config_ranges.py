"""Every numeric key of every config (run, method, compare, search) declares its range where it
is declared; any value, however odd, gives a valid config or one ConfigError naming the key,
never another exception. Fields are found by introspection, so a new one is covered as it lands."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.compare.config import CompareConfig, load_compare_config
from deltatune.core.fields import Range
from deltatune.data.config import DataConfig
from deltatune.search.space import Param, load_tune_config
from deltatune.tasks.base import TASKS, task_class
from deltatune.train.config import ModelConfig, RunConfig, TrainingConfig, load_config

# Values that make other keys of the same config meaningful (a case's knobs, not branches).
CONTEXT = {("prompt", "init_token_ids"): {"init": "text", "init_text": "hi"}}


def _method(name):
    return lambda key, value: dt.config_from_dict({"method": name, **CONTEXT.get((name, key), {}), key: value})


def _section(section, extra=None):
    return lambda key, value: RunConfig.from_dict({section: {**(extra or {}), key: value}})


KINDS = {  # config class -> (builder from one key's value, the key's name in messages)
    **{cls.config_class: (_method(name), f"{name}.") for name, cls in dt.registered().items()},
    ModelConfig: (_section("model"), "model."),
    DataConfig: (_section("data"), "data."),
    TrainingConfig: (_section("training"), "training."),
    **{task_class(t).config_class: (_section("task", {"type": t}), "task.") for t in TASKS},
    CompareConfig: (lambda key, value: CompareConfig(base={}, methods=[{"method": "lora"}], **{key: value}), ""),
    Param: (lambda key, value: Param("training.learning_rate", **{"low": 1e-4, "high": 1e-2, key: value}),
            "search.training.learning_rate."),
}


def _leaves(tp) -> set:
    """int, float, ... inside a type hint (through unions and lists)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list, tuple):
        return set().union(*(_leaves(t) for t in typing.get_args(tp)))
    return {tp}


NUMERIC = [(cls, f) for cls in KINDS for f in dataclasses.fields(cls)
           if _leaves(typing.get_type_hints(cls)[f.name]) & {int, float}]
IDS = [f"{cls.__name__}.{f.name}" for cls, f in NUMERIC]

ODD = st.one_of(
    st.sampled_from([-1, 0, -0.0, 1e-12, 10**30, 1e308, -1e308, 2**32, math.nan, math.inf, -math.inf,
                     True, False, None, "abc", "", "1e-4", "nan", "-inf", [], {}, [1, -1]]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True))


def test_the_discovery_finds_every_kind_of_config():
    names = {f"{cls.__name__}.{f.name}" for cls, f in NUMERIC}
    assert {"TrainingConfig.epochs", "LoraConfig.r", "CompareConfig.seeds", "Param.step",
            "QaTaskConfig.n_best"} <= names
    assert len(NUMERIC) >= 40


@pytest.mark.parametrize("cls,f", NUMERIC, ids=IDS)
def test_every_numeric_field_declares_its_range(cls, f):
    assert isinstance(f.metadata.get("range"), Range), f"{cls.__name__}.{f.name} has no range= in its help_field"


@pytest.mark.parametrize("cls,f", NUMERIC, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(value=ODD, as_list=st.booleans())
def test_any_value_gives_a_valid_config_or_one_error_naming_the_key(cls, f, value, as_list):
    build, prefix = KINDS[cls]
    value = [value] if as_list else value
    try:
        build(f.name, value)
    except dt.ConfigError as error:
        assert error.message.startswith(f"{prefix}{f.name} = "), error.message
        assert error.hint
        return
    numbers = value if isinstance(value, list) else [value]
    assert all(n in f.metadata["range"] for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool))


# --- the exact message, one hand-picked value per kind of config ------------------------------

def test_a_method_key_out_of_range():
    with pytest.raises(dt.ConfigError) as error:
        dt.LoraConfig(lora_dropout=1.0)
    assert str(error.value) == ("lora.lora_dropout = 1.0 is out of range: must be at least 0 and below 1.\n"
                                "  fix: e.g. lora_dropout: 0.05.")


def test_a_key_without_a_typical_value_says_leave_it_unset():
    with pytest.raises(dt.ConfigError) as error:
        dt.PromptTuningConfig(init="text", init_text="hi", init_token_ids=[3, -1])
    assert str(error.value) == ("prompt.init_token_ids = [3, -1] is out of range: each item must be at least 0.\n"
                                "  fix: leave init_token_ids unset (null).")


@pytest.mark.parametrize("override,message", [
    ("training.epochs=-1", "training.epochs = -1 is out of range: must be greater than 0.\n  fix: e.g. epochs: 2."),
    ("training.batch_size=0", "training.batch_size = 0 is out of range: must be at least 1.\n  fix: e.g. batch_size: 32."),
    ("training.learning_rate=.inf", "training.learning_rate = inf is out of range: must be a finite number "
                                    "at least 0.\n  fix: e.g. learning_rate: 0.001."),
    ("training.learning_rate=0", None),  # the base model's own scores: how the README measures them
    ("task.type=qa", None),
    ("data.max_train_samples=0", "data.max_train_samples = 0 is out of range: must be at least 1.\n"
                                 "  fix: e.g. max_train_samples: 1000."),
])
def test_a_run_key_out_of_range(override, message):
    if message is None:
        load_config(None, [override])  # a valid value stays valid
        return
    with pytest.raises(dt.ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == message


def test_a_compare_key_out_of_range():
    with pytest.raises(dt.ConfigError) as error:
        load_compare_config(None, ["seeds=[1, -2]"])
    assert str(error.value) == ("seeds = [1, -2] is out of range: each item must be from 0 to 4294967295.\n"
                                "  fix: e.g. seeds: [42].")
    with pytest.raises(dt.ConfigError) as error:
        load_compare_config(None, ["methods=[{method: lora, learning_rate: -1}]"])
    assert str(error.value) == ("methods[lora].learning_rate = -1 is out of range: must be at least 0.\n"
                                "  fix: e.g. learning_rate: 0.001.")


def test_a_search_key_out_of_range(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"search": {"training.epochs": {"low": 1, "high": 3, "step": 0}}}))
    with pytest.raises(dt.ConfigError) as error:
        load_tune_config(path)
    assert str(error.value) == ("search.training.epochs.step = 0 is out of range: must be greater than 0.\n"
                                "  fix: e.g. step: 1.")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,words,inside,outside", [
    ("[1, inf)", "at least 1", [1, 10**30], [0, 0.5, math.inf]),
    ("(0, inf)", "greater than 0", [1e-12, 1e308], [0, -1, math.inf, math.nan]),
    ("[0, 1)", "at least 0 and below 1", [0, 0.999], [1, -1e-9, math.nan]),
    ("[2, 100]", "from 2 to 100", [2, 100], [1, 101]),
    ("(-inf, inf)", "a finite number", [-1e308, 0], [math.inf, -math.inf, math.nan]),
    ("[0, inf]", "at least 0", [0, math.inf], [-1, math.nan]),  # an interval that closes on inf allows it
])
def test_a_range_reads_as_an_interval_and_says_itself_in_words(text, words, inside, outside):
    allowed = Range.parse(text)
    assert str(allowed) == words
    assert all(x in allowed for x in inside) and not any(x in allowed for x in outside)


def test_a_malformed_range_is_a_programming_error():
    with pytest.raises(ValueError, match="not an interval"):
        Range.parse(">= 1")
