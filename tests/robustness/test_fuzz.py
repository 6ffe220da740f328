"""Fuzzed run configs give a valid config or one ConfigError naming the key; fuzzed adapter
files give an AdapterFileError or exactly what they hold, on an untouched model."""

from __future__ import annotations

import collections
import dataclasses
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import deltatune as dt
from deltatune.data.config import DataConfig
from deltatune.tasks.base import TASKS, task_class
from deltatune.train.config import ModelConfig, RunConfig, TrainingConfig
from tiny import assert_same, build, perturb, snapshot

SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
TASK_KINDS = {t: task_class(t).config_class for t in TASKS}
ODD = st.sampled_from([-1, 0, 1, 0.5, 2, 1e-3, 1e308, math.nan, math.inf, True, None, "", "abc", "1e-4",
                       [], ["query"], {}])
NUMBERS = st.one_of(st.sampled_from([-1, 0, 0.5, 1e308, math.nan, -math.inf, 2**32]), st.integers())


def _fields(kind: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(kind)}


def _rarely(draw) -> bool:
    """One time in 20 (not 0: hypothesis draws the smallest value far more often)."""
    return draw(st.integers(0, 19)) == 10


@st.composite
def run_configs(draw) -> dict:
    """Run configs as a user could write them: real keys (so that the values are checked), each
    set to its default, its typical value or an odd one; rarely an unknown key, an unknown
    method or task, or a section that is not a mapping."""
    config = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "task", "method"]), unique=True, max_size=5)):
        if _rarely(draw):
            config[section] = draw(ODD)
            continue
        head = {}
        if section == "method":
            head = {"method": "wizard" if _rarely(draw) else draw(st.sampled_from(sorted(dt.registered())))}
        elif section == "task":
            head = {"type": "poetry" if _rarely(draw) else draw(st.sampled_from(sorted(TASK_KINDS)))}
        fields = {} if {"wizard", "poetry"} & set(head.values()) else _fields(_kind(section, head))
        names = sorted(set(fields) - {"method", "type"})
        keys = draw(st.lists(st.sampled_from(names), unique=True, max_size=3)) if names else []
        config[section] = {**head, **{key: draw(_value(fields[key])) for key in keys}}
        if _rarely(draw):
            config[section]["colour"] = "blue"
    if _rarely(draw):
        config["extra"] = {}
    return config


def _kind(section: str, head: dict) -> type:
    if section == "method":
        return dt.registered()[head["method"]].config_class
    return TASK_KINDS[head["type"]] if section == "task" else SECTIONS[section]


def _value(f: dataclasses.Field):
    """The field's default or typical value (most configs stay valid), or an odd one; a number
    for a field with a range, so that the range is checked."""
    default = None if f.default is dataclasses.MISSING else f.default
    typical = f.metadata.get("typical", default)
    return st.one_of(st.just(default), st.just(typical), NUMBERS if f.metadata.get("range") else ODD)


def _names_a_key(message: str, data: dict) -> bool:
    """The message names a key the user wrote: ``training.epochs``, ``lora.r`` (a method's
    keys go by the method's name), ``'extra'``, or the unknown method or task."""
    names = set()
    for section, values in data.items():
        names.add(f"'{section}'")
        if isinstance(values, dict):
            prefixes = {section, str(values.get("method"))}
            names |= {f"{prefix}.{key}" for prefix in prefixes for key in values}
            names |= {f"'{values[key]}'" for key in ("method", "type") if key in values}
    return any(name in message for name in names)


def _check_valid(config: RunConfig, data: dict) -> None:
    """A config that was accepted holds what the user wrote, and only values in range."""
    for section in ("model", "data", "training", "task", "method"):
        built = getattr(config, section)
        given = data.get(section) or {}
        for name, f in _fields(type(built)).items():
            value = getattr(built, name)
            if name in given and not isinstance(given[name], str):
                assert value == given[name], f"{section}.{name}: wrote {given[name]!r}, got {value!r}"
            allowed = f.metadata.get("range")
            numbers = [v for v in (value if isinstance(value, list) else [value])
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            assert allowed is None or all(v in allowed for v in numbers), f"{section}.{name} = {value!r}"


@settings(max_examples=150, deadline=None, database=None)
@given(data=run_configs())
def fuzz_run_configs(outcomes, data):
    try:
        config = RunConfig.from_dict(data)
    except dt.ConfigError as error:
        assert _names_a_key(error.message, data), (error.message, data)
        outcomes[next((k for k in ("unknown key", "out of range", "wrong type") if k in error.message), "other")] += 1
        return
    _check_valid(config, data)
    outcomes["valid"] += 1


def test_fuzzed_run_configs_give_a_config_or_a_config_error_naming_the_key():
    outcomes = collections.Counter()
    fuzz_run_configs(outcomes)
    # the fuzzer reaches every stage: keys, types, ranges, and whole valid configs
    assert min(outcomes[k] for k in ("unknown key", "wrong type", "out of range", "valid")) >= 1, outcomes


@st.composite
def damage(draw, header: int, size: int) -> tuple[str, int, bytes]:
    """Where and how to damage a safetensors file of ``size`` bytes whose header (the 8-byte
    length, then JSON) ends at ``header``: overwrite bytes in the header or in the tensor
    data, cut the file anywhere, or append bytes."""
    how = draw(st.sampled_from(["header", "tensors", "cut", "append"]))
    at = {"header": st.integers(0, header - 1), "tensors": st.integers(header, size - 1),
          "cut": st.integers(0, size - 1), "append": st.just(size)}[how]
    return how, draw(at), draw(st.binary(min_size=1, max_size=16))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-source")
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2, modules_to_save=["classifier"]))
    perturb(model)
    dt.save_adapter(model, folder)
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_adapter_files_give_an_adapter_file_error_or_exactly_what_they_hold(tmp_path_factory, lora_file, data):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(lora_file, folder, dirs_exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    original = weights.read_bytes()
    header = 8 + int.from_bytes(original[:8], "little")
    how, at, blob = data.draw(damage(header, len(original)))
    damaged = original[:at] + (blob[: len(original) - at] + original[at + len(blob):] if how in ("header", "tensors")
                               else b"" if how == "cut" else blob)
    weights.write_bytes(damaged)
    fresh = build("bert")
    before = snapshot(fresh)
    try:
        dt.load_adapter(fresh, folder)
    except dt.AdapterFileError as error:
        assert error.message and error.hint
        assert not hasattr(fresh, "_deltatune_state")
        assert_same(fresh, before, "a refused load must leave every tensor as it was")
        return
    # Accepted: safetensors holds no checksum, so damaged tensor bytes read as other numbers.
    # The model then holds exactly what the file holds, on an untouched base model.
    held = load_file(weights)
    assert dt.adapter_state_dict(fresh).keys() == held.keys()
    for key, value in dt.adapter_state_dict(fresh).items():
        torch.testing.assert_close(value, held[key], rtol=0, atol=0, equal_nan=True, msg=key)
    dt.delete_adapter(fresh, "default")
    assert_same(fresh, before, "loading an adapter must not touch the base model")
