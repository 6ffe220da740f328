"""The command line: a fast start, one meaning for ADAPTER in every command, --set method=NAME,
and the package's public names loaded on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import deltatune as dt
from deltatune.cli import main
from deltatune.core.errors import ConfigError
from deltatune.train.config import load_config
from deltatune.train.loop import train

COMMANDS = ["train", "eval", "predict", "compare", "tune", "convert", "inspect", "export", "methods", "demo"]
HEAVY = ("torch", "transformers", "datasets", "accelerate", "optuna")

# Every --help; then the registry as training sees it (deltatune.train registers every method).
START = f"""
import json, sys
from deltatune.cli import main
for argv in [["--help"]] + [[c, "--help"] for c in {COMMANDS!r}]:
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
import deltatune.train
from deltatune.core.method import registered
print(json.dumps({{"heavy": heavy, "registered": sorted(registered())}}))
"""


def test_help_imports_no_torch_and_training_finds_every_method():
    done = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], "deltatune --help must not import these"
    assert result["registered"] == sorted(dt.registered())
    assert "demo" in done.stdout and "ADAPTER" in done.stdout


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in dt.registered())


def test_every_public_name_loads_on_first_use():
    import deltatune.methods

    assert sorted(dt._METHOD_NAMES) == sorted(deltatune.methods.__all__), "list them in deltatune/__init__.py"
    assert all(getattr(dt, name) is not None for name in dt.__all__)
    namespace: dict = {}
    exec("from deltatune import *", namespace)
    assert set(dt.__all__) <= set(namespace) and namespace["LoraConfig"] is dt.LoraConfig
    assert dt.assets.model_path().is_dir() and dt.tune.__module__ == "deltatune.search.runner"
    with pytest.raises(AttributeError):
        dt.LoraConfg  # noqa: B018


# --- --set method=NAME -----------------------------------------------------------------------

@pytest.fixture
def lora_yaml(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("method: {method: lora, r: 8, lora_alpha: 16, modules_to_save: [pooler]}\n")
    return path


def test_set_method_takes_that_methods_defaults_and_keeps_modules_to_save(lora_yaml):
    config = load_config(lora_yaml, ["method=ia3"])
    assert config.method == dt.IA3Config(modules_to_save=["pooler"])
    assert load_config(lora_yaml, ["method=ia3", "method.target_modules=[query]"]).method.target_modules == ["query"]


def test_a_stale_key_after_set_method_method_points_to_set_method(lora_yaml):
    with pytest.raises(ConfigError, match="still holds lora_alpha, r, which ia3 does not take") as info:
        load_config(lora_yaml, ["method.method=ia3"])
    assert "--set method=ia3" in info.value.hint


# --- ADAPTER: a run folder, an adapter folder, a peft folder -----------------------------------

@pytest.fixture(scope="module")
def run(tiny_model_dir, sentiment_csv, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={sentiment_csv}",
                             "model.max_length=32", "data.max_eval_samples=16", "data.max_test_samples=16",
                             f"training.output_dir={folder}", "training.max_steps=2", "training.progress=false"]))
    return folder


@pytest.mark.parametrize("command", [
    ["eval", "{run}"], ["predict", "{run}", "a great film"], ["inspect", "{run}"],
    ["convert", "{run}", "{out}", "--to", "peft"], ["export", "{run}", "{out}"], ["eval", "{run}/adapter"],
], ids=lambda c: " ".join(c[:2]))
def test_every_adapter_command_takes_a_run_folder(command, run, tmp_path, capsys):
    assert main([part.format(run=run, out=tmp_path / "out") for part in command]) == 0
    assert f"using adapter {run / 'adapter'} (best checkpoint of run {run})" in capsys.readouterr().err


def test_an_adapter_folder_says_its_format(run, tmp_path, capsys):
    assert main(["convert", str(run / "adapter"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    err = capsys.readouterr().err
    assert f"using adapter {run / 'adapter'} (best checkpoint" in err
    assert f"using adapter {tmp_path / 'peft'} (peft format)" in err


@pytest.mark.parametrize("command,phrase", [
    (["inspect", "{empty}"], "neither a run folder nor an adapter folder"),
    (["export", "{tmp}/nope", "{tmp}/out"], "(it does not exist)"),
    (["inspect", "{unfinished}"], "has no adapter yet"),
    (["predict", "{peft}", "text"], "a bare adapter has no task or labels"),
])
def test_a_path_that_names_no_adapter(command, phrase, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.yaml").write_text("{}\n")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    folders = {name: tmp_path / name for name in ("empty", "unfinished", "peft")}
    assert main([part.format(tmp=tmp_path, **folders) for part in command]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "fix:" in err and "Traceback" not in err


def test_offline_and_quiet_sets_what_the_user_left_unset(monkeypatch):
    from deltatune.env import SETTINGS, offline_and_quiet

    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    offline_and_quiet()
    assert {k: os.environ[k] for k in SETTINGS} == {**SETTINGS, "TRANSFORMERS_VERBOSITY": "info"}


def test_listing_methods_loads_torch_but_not_transformers():
    """``deltatune methods`` must start fast: the method files import no transformers module."""
    code = "import sys, deltatune.methods; print(sorted(m for m in sys.modules if m.startswith('transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
