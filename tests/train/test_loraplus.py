"""LoRA+ (training.loraplus_lr_ratio, dt.loraplus_param_groups): peft's groups, in the training
loop (resume included), under transformers.Trainer and in compare."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import yaml
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import deltatune as dt
from deltatune import ConfigError
from deltatune.compare.config import entry_name, load_compare_config
from deltatune.compare.runner import compare, grid
from deltatune.train.config import load_config
from deltatune.train.loop import train
from deltatune.train.optim import param_groups
from tiny import assert_close_ulps, build, interrupt_at_step

# (family, LoRA config fields, modules_to_save): linear, Conv1D and embedding LoRA, trained biases,
# a task head and a trained norm.
CASES = {
    "bert": ("bert", {"r": 4, "target_modules": ["query", "value", "word_embeddings"], "bias": "all"},
             ["classifier"]),
    "gpt2": ("gpt2", {"r": 4, "target_modules": ["c_attn", "wte"]}, ["ln_f"]),
    "dora": ("bert", {"r": 4, "target_modules": ["query", "value", "word_embeddings"], "use_dora": True},
             ["classifier"]),  # DoRA's magnitudes are 1-D: B's rate, with decay
}


def _ours(name: str) -> str:
    return name.replace(".deltas.default.copy.", ".").replace(".deltas.default.", ".")


def _peft(name: str) -> str:
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    name = name.replace(".default.", ".").removesuffix(".default")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")  # peft's is a module


def _groups(groups: list[dict], names: dict[int, str]) -> list[tuple[set[str], float, float]]:
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in groups if g["params"]]


@pytest.mark.parametrize("case", CASES)
def test_the_groups_are_peft_create_loraplus_optimizers(case):
    family, fields, saved = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bias='all' and LoRA on a tied embedding warn, here as in peft
        ours = dt.apply(build(family), dt.LoraConfig(**fields, modules_to_save=saved))
        theirs = peft.get_peft_model(build(family), peft.LoraConfig(**fields, modules_to_save=saved))
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.01, loraplus_lr_embedding=1e-5)
    got = dt.loraplus_param_groups(ours, lr=2e-3, ratio=16, weight_decay=0.01, lr_embedding=1e-5)
    ours_names = {id(p): _ours(n) for n, p in ours.named_parameters()}
    peft_names = {id(p): _peft(n) for n, p in theirs.named_parameters()}
    assert _groups(got, ours_names) == _groups(expected.param_groups, peft_names)
    assert len(got) == 4  # A, embedding, B, B without decay: every kind is present in both cases


def test_b_gets_ratio_times_a_rate_and_each_trainable_parameter_one_group():
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    groups = dt.loraplus_param_groups(model, lr=1e-3, ratio=16)
    rates = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert rates.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    query = "bert.encoder.layer.0.attention.self.query.deltas.default"
    assert rates[f"{query}.lora_B.weight"] == 16 * rates[f"{query}.lora_A.weight"] == 16e-3
    assert rates["classifier.deltas.default.copy.bias"] == 16e-3  # 1-D, as in peft


def test_loraplus_without_b_matrices_is_refused_before_a_model_is_built():
    with pytest.raises(ConfigError, match=r"training.loraplus_lr_ratio = 16 .* method 'bitfit' has none") as error:
        load_config(None, ["method=bitfit", "training.loraplus_lr_ratio=16"])
    assert "lora" in error.value.hint
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio = 0.5 is out of range: must be at least 1"):
        load_config(None, ["training.loraplus_lr_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"adapters \(bitfit\) train none"):
        dt.loraplus_param_groups(dt.apply(build("bert"), dt.BitFitConfig()), lr=1e-3, ratio=16)
    with pytest.raises(ConfigError, match="no deltatune adapter"):
        dt.loraplus_param_groups(build("bert"), lr=1e-3, ratio=16)
    with pytest.raises(ConfigError, match="ratio = nan must be a finite number"):
        dt.loraplus_param_groups(dt.apply(build("bert"), dt.LoraConfig()), lr=1e-3, ratio=float("nan"))


def _config(folder, csv, *extra):
    return load_config(None, [
        "model.name_or_path=minilm-l6", "model.max_length=32", f"data.train_file={csv}",
        "data.max_train_samples=96", f"training.output_dir={folder}", "training.batch_size=16",
        "training.learning_rate=2e-3", "training.max_steps=6", "training.save_steps=3", "training.warmup_steps=2",
        "training.eval_steps=3", "training.progress=false", "training.loraplus_lr_ratio=16", "method.r=4",
        "method.lora_dropout=0.1", *extra])


def test_a_run_trains_b_at_ratio_times_the_rate_and_resumes_with_its_groups(tmp_path, sentiment_csv, monkeypatch):
    straight = train(_config(tmp_path / "a", sentiment_csv))
    state = json.loads(next((tmp_path / "a" / "checkpoints").glob("step-*/state.json")).read_text())
    assert [g["initial_lr"] for g in state["param_groups"]] == [2e-3, 32e-3, 32e-3]  # A and head, B, biases

    restore_step = interrupt_at_step(monkeypatch, 5)
    assert train(_config(tmp_path / "b", sentiment_csv)).interrupted
    restore_step()
    resumed = train(_config(tmp_path / "b", sentiment_csv), resume=True)
    assert resumed.steps == straight.steps == 6
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    for key in a:
        assert_close_ulps(a[key], b[key])


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(2, 100, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 3}


def _trainer(folder, seed: int = 0) -> Trainer:
    """A tiny LoRA+ run under transformers.Trainer: 4 steps, a checkpoint every 2."""
    model = build("bert")
    torch.manual_seed(seed)  # the LoRA initialisation; resuming must overwrite it
    dt.apply(model, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW(dt.loraplus_param_groups(model, lr=1e-3, ratio=16))
    args = TrainingArguments(output_dir=str(folder), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1)
    return Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(optimizer, None),
                   callbacks=[dt.TrainerCallback()])


def test_transformers_trainer_trains_with_loraplus_groups_and_resumes(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.train()
    assert [g["initial_lr"] for g in straight.optimizer.param_groups] == [1e-3, 16e-3, 16e-3]
    resumed = _trainer(tmp_path / "resumed", seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == [1e-3, 16e-3, 16e-3]
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert_close_ulps(param, expected[name])


def _compare_yaml(tmp_path, **values):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **values}))
    return path


def test_a_compare_entry_with_loraplus_is_its_own_row_and_trains_with_it(tmp_path):
    path = _compare_yaml(tmp_path, methods=["lora", {"method": "lora", "loraplus_lr_ratio": 16}], seeds=[7])
    config = load_compare_config(path)
    assert [entry_name(m) for m in config.methods] == ["lora", "lora+16"]
    assert [c.key for c in grid(config)] == ["lora-seed7", "lora+16-seed7"]
    run = config.run_config(config.methods[1], 7, None, None, tmp_path, 1e-3)
    assert run.training.loraplus_lr_ratio == 16 and run.method == dt.LoraConfig()
    assert config.run_config(config.methods[0], 7, None, None, tmp_path, 1e-3).training.loraplus_lr_ratio is None


@pytest.mark.slow
def test_compare_reports_lora_and_loraplus_as_two_rows(tmp_path):
    path = _compare_yaml(
        tmp_path, model={"max_length": 32}, data={"max_train_samples": 32, "max_eval_samples": 16},
        training={"max_steps": 2, "batch_size": 16, "warmup_steps": 0}, latency_batches=1, forgetting_texts=8,
        evaluations=2, methods=[{"method": "lora", "learning_rate": 1e-3},
                                {"method": "lora", "learning_rate": 1e-3, "loraplus_lr_ratio": 16}])
    report = compare(load_compare_config(path), echo=lambda *_: None)
    assert [r["method"] for r in report["rows"]] == ["lora", "lora+16"]
    ratios = {name: yaml.safe_load(next((tmp_path / "out" / "runs" / f"{name}-seed42").rglob("run.yaml")).read_text())
              ["training"]["loraplus_lr_ratio"] for name in ("lora", "lora+16")}
    assert ratios == {"lora": None, "lora+16": 16}
    assert "| lora+16 |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("values, message", [
    ({"methods": [{"method": "bitfit", "loraplus_lr_ratio": 16}]},
     r"methods\[bitfit\].loraplus_lr_ratio = 16 trains B matrices faster"),
    ({"methods": [{"method": "lora", "loraplus_lr_ratio": 0}]}, r"methods\[lora\].loraplus_lr_ratio = 0 is out of range"),
    ({"methods": ["lora", "bitfit"], "training": {"loraplus_lr_ratio": 16}},
     r"training.loraplus_lr_ratio = 16 .* method 'bitfit' has none"),
    ({"methods": [{"method": "lora", "loraplus_lr_ratio": 16}, {"method": "lora", "loraplus_lr_ratio": 16.0}]},
     "'lora\\+16' appears twice"),
], ids=["method-without-b", "ratio-below-1", "shared-ratio-and-bitfit", "two-entries-one-name"])
def test_a_compare_entry_that_cannot_use_loraplus_is_refused_before_anything_runs(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        load_compare_config(_compare_yaml(tmp_path, **values))
    assert not (tmp_path / "out").exists()


def _undecayed(groups, model) -> set[str]:
    skipped = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    return {n for n, p in model.named_parameters() if any(p is q for q in skipped)}


@pytest.mark.parametrize("family,norms", [("gpt2", ["ln_1", "ln_2", "ln_f"]),
                                          ("llama", ["input_layernorm", "post_attention_layernorm", "norm"])])
def test_one_weight_decay_rule_spares_biases_and_every_norm_in_plain_training_and_loraplus(family, norms):
    full = dt.apply(build(family), dt.config_from_dict({"method": "full"}))
    undecayed = _undecayed(param_groups(full, weight_decay=0.1), full)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    is_norm_or_bias = {n for n in trainable if n.endswith(".bias") or any(f"{m}." in n for m in norms)}
    assert undecayed == is_norm_or_bias and any("ln_f" in n or n.startswith("model.norm") for n in undecayed)
    lora = dt.apply(build(family), dt.LoraConfig(r=2, bias="all", modules_to_save=norms[-1:]))
    plain = _undecayed(param_groups(lora, weight_decay=0.1), lora)
    assert plain == _undecayed(dt.loraplus_param_groups(lora, lr=1e-3, ratio=16, weight_decay=0.1), lora)
    assert any(norms[-1] in n for n in plain)
