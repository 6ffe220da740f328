"""Adapter files without a model: ``inspect_adapter`` says what a file holds, line by line, and
``convert`` rewrites it into the other format with the same tensors and outputs."""

from __future__ import annotations

import json
import re

import torch

import deltatune as dt
from deltatune.io.adapter_files import read_adapter
from deltatune.io.convert import convert, inspect_adapter
from tiny import assert_close_ulps, build, inputs, output, perturb

KEY = "bert.encoder.layer.{}.attention.self.query.lora_{}.weight"


def saved_lora(folder):
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    perturb(model)
    dt.save_adapter(model, folder)
    return model


def test_inspect_lists_method_base_config_and_every_tensor(tmp_path):
    saved_lora(tmp_path / "a")
    lines = inspect_adapter(tmp_path / "a").splitlines()
    # 2 blocks x query x (A: 2 x 32, B: 32 x 2) = 256 float32 numbers = 1,024 bytes
    assert lines[:3] == [f"adapter:     {tmp_path / 'a'} (deltatune format)", "method:      lora",
                         "base model:  unknown (BertForSequenceClassification)"]
    assert re.fullmatch(r"fingerprint: sha256:[0-9a-f]{16}", lines[3])
    assert lines[4] == "base held:   full precision"
    assert lines[5] == ("config:      modules_to_save=[], r=2, lora_alpha=4, lora_dropout=0.0, target_modules=['query'], "
                        "bias='none', use_rslora=False, use_dora=False, init='kaiming'")
    assert lines[6] == "tensors:     4, 256 parameters, 1,024 bytes"
    width = len(KEY.format(0, "A"))
    assert lines[7:] == [f"  {KEY.format(i, ab):<{width}}  {shape:<14} float32"
                         for i in (0, 1) for ab, shape in (("A", "(2, 32)"), ("B", "(32, 2)"))]


def test_inspect_of_a_file_emptied_of_tensors_says_it_holds_none(tmp_path):
    from safetensors.torch import safe_open, save_file

    saved_lora(tmp_path / "a")
    weights = str(tmp_path / "a" / "adapter_model.safetensors")
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    save_file({}, weights, metadata=metadata)
    assert inspect_adapter(tmp_path / "a").splitlines()[6:] == ["tensors:     0, 0 parameters, 0 bytes"]


def test_inspect_of_a_peft_file_that_records_no_model_class(tmp_path):
    saved_lora(tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config.pop("auto_mapping")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    lines = inspect_adapter(tmp_path / "peft").splitlines()
    assert lines[2] == "base model:  unknown (?)" and lines[4] == "base held:   not recorded"  # peft does not record it


def test_inspect_names_the_base_model_by_its_path(tmp_path):
    model = build("bert")
    model.config._name_or_path = "models/my-bert"
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["query"]))
    dt.save_adapter(model, tmp_path / "a")
    assert inspect_adapter(tmp_path / "a").splitlines()[2] == "base model:  models/my-bert (BertForSequenceClassification)"


def test_convert_to_peft_and_back_keeps_tensors_and_outputs(tmp_path):
    model = saved_lora(tmp_path / "a")
    batch = inputs("bert")
    expected = output(model, batch)
    assert convert(tmp_path / "a", tmp_path / "peft", "peft") == tmp_path / "peft"
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert inspect_adapter(tmp_path / "peft").splitlines()[:4] == [
        f"adapter:     {tmp_path / 'peft'} (peft format)", "method:      lora",
        "base model:  unknown (BertForSequenceClassification)", "fingerprint: -"]  # peft keeps no fingerprint
    convert(tmp_path / "peft", tmp_path / "back", "deltatune")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["method"] == "lora"  # as saved
    (_, original), (description, back) = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "back")
    assert description["format"] == "deltatune" and description["config"]["method"] == "lora"
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    for folder in ("peft", "back"):
        fresh = build("bert")
        dt.load_adapter(fresh, tmp_path / folder)
        assert_close_ulps(output(fresh, batch), expected)


def test_ia3_on_keys_and_values_only_converts_to_peft_and_loads_back(tmp_path):
    import peft

    model = build("bert")
    dt.apply(model, dt.IA3Config(target_modules=["key", "value"]))  # no feed-forward layer among them
    perturb(model)
    dt.save_adapter(model, tmp_path / "a")
    batch = inputs("bert")
    expected = output(model, batch)
    convert(tmp_path / "a", tmp_path / "peft", "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["feedforward_modules"] == []
    for folder in ("a", "peft"):
        fresh = build("bert")
        dt.load_adapter(fresh, tmp_path / folder)
        assert_close_ulps(output(fresh, batch), expected)
    theirs = peft.PeftModel.from_pretrained(build("bert"), tmp_path / "peft").eval()
    assert_close_ulps(output(theirs, batch), expected)
