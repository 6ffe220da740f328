"""Damaged or foreign adapter files are refused clearly; a kill or a full disk loses nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.train.config import RunConfig
from tiny import build, inputs, output, perturb


@pytest.fixture
def saved(tmp_path):
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    perturb(model)
    dt.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def refused(path, phrase, model=None):
    model = model or build("bert")
    keys = set(model.state_dict())
    with pytest.raises(dt.AdapterFileError, match=phrase):
        dt.load_adapter(model, path)
    assert set(model.state_dict()) == keys, "a refused load must leave the model as it was"


def test_missing_directory(tmp_path):
    refused(tmp_path / "nope", "does not exist")


def test_truncated_weights(saved):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(path, "truncated or corrupted")


def test_garbage_weights(saved):
    _, path = saved
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01not a tensor file")
    refused(path, "not a valid safetensors file")


def test_config_that_is_not_json_and_no_embedded_copy(saved):
    model, path = saved
    dt.save_adapter(model, path, format="peft")  # peft files carry no embedded config
    (path / "adapter_config.json").write_text("{not json")
    refused(path, "is not valid JSON")


def test_config_naming_an_unknown_method(saved):
    model, path = saved
    dt.save_adapter(model, path, format="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "WIZARD"}))
    refused(path, "type 'WIZARD' cannot be read")


def test_pickle_is_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "adapter_config.json").write_text("{}")
    refused(folder, "pickle")


def test_adapter_of_another_base_model(saved):
    _, path = saved
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=3))
    refused(path, "another base model", other)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["model", "task", "data", "method", "training", "extra"]),
                       st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.floats(),
                                                                       st.text(max_size=8), st.booleans()),
                                       max_size=4), max_size=4))
def test_fuzzed_run_configs_give_a_config_or_a_config_error(data):
    try:
        RunConfig.from_dict(data)
    except dt.ConfigError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=400))
def test_fuzzed_adapter_files_give_an_adapter_file_error(tmp_path_factory, blob, cut):
    folder = tmp_path_factory.mktemp("fuzz")
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2))
    dt.save_adapter(model, folder)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] + blob)
    fresh = build("bert")
    try:
        dt.load_adapter(fresh, folder)
    except (dt.AdapterFileError, dt.ConfigError):
        assert not hasattr(fresh, "_deltatune_state")


def test_full_disk_while_saving_keeps_the_old_adapter(saved, monkeypatch):
    model, path = saved
    batch = inputs("bert")
    expected = output(model, batch)
    perturb(model, seed=5)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("deltatune.io.adapter_files.save_file", no_space)
    with pytest.raises(dt.AdapterFileError, match="No space left on device.*\n.*intact"):
        dt.save_adapter(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = build("bert")
    dt.load_adapter(fresh, path)
    torch.testing.assert_close(output(fresh, batch), expected, atol=0, rtol=0)


SAVER = """
import sys, torch, deltatune as dt
sys.path.insert(0, {tests!r})
from tiny import build
model = build("bert")
dt.apply(model, dt.FullFineTuningConfig())
i = 0
while True:
    i += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(i))
    dt.save_adapter(model, {path!r})
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_a_loadable_adapter(tmp_path):
    path = tmp_path / "adapter"
    script = SAVER.format(tests=str(Path(__file__).parents[1]), path=str(path))
    for delay in (0.05, 0.13, 0.29):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one whole save exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = build("bert")
        dt.load_adapter(model, path)
        values = {p.flatten()[0].item() for p in model.parameters()}
        assert len(values) == 1, "a loaded adapter is one whole save, never a mix"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask_like_any_other_tool(tmp_path, mask):
    """Temporary files are created 0o600; the rename must not carry that over."""
    from deltatune.io.atomic import atomic_write_text
    from deltatune.train.checkpoint import save_checkpoint

    old = os.umask(mask)
    try:
        model = build("bert")
        dt.apply(model, dt.LoraConfig(r=4))
        dt.save_adapter(model, tmp_path / "adapter")
        atomic_write_text(tmp_path / "report.json", "{}")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, {})
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), tmp_path / "report.json", *checkpoint.iterdir()]
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~mask
