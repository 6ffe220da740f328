"""Fitting the ecosystem: convert and inspect on the command line, merged export, Trainer."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import deltatune as dt
from deltatune.cli import main
from tiny import assert_close_ulps, build, inputs, output, perturb


@pytest.fixture
def lora_adapter(tmp_path):
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    perturb(model)
    dt.save_adapter(model, tmp_path / "native")
    return model, tmp_path


def test_convert_to_peft_and_back_on_the_command_line(lora_adapter):
    model, tmp = lora_adapter
    batch = inputs("bert")
    assert main(["convert", str(tmp / "native"), str(tmp / "peft"), "--to", "peft"]) == 0
    in_peft = peft.PeftModel.from_pretrained(build("bert"), tmp / "peft").eval()
    assert_close_ulps(output(in_peft, batch), output(model, batch))
    assert main(["convert", str(tmp / "peft"), str(tmp / "back"), "--to", "deltatune"]) == 0
    again = build("bert")
    dt.load_adapter(again, tmp / "back")
    assert_close_ulps(output(again, batch), output(model, batch))


def test_inspect_prints_method_tensors_and_sizes(lora_adapter, capsys):
    _, tmp = lora_adapter
    assert main(["inspect", str(tmp / "native")]) == 0
    text = capsys.readouterr().out
    assert "method:      lora" in text and "fingerprint: sha256:" in text
    assert "bert.encoder.layer.0.attention.self.query.lora_A.weight  (4, 32)" in text
    assert "tensors:     10, 1,123 parameters, 4,492 bytes" in text  # 4 x 4 x (32+32) + 32 x 3 + 3


def test_export_writes_a_plain_model_with_the_adapted_outputs(tmp_path):
    base_dir = tmp_path / "base"
    build("bert").save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    dt.apply(model, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    perturb(model)
    batch = inputs("bert")
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert_close_ulps(output(plain, batch), expected)
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "merged").iterdir()} == {0o666 & ~mask}


def test_export_refuses_a_method_that_cannot_merge(tmp_path, capsys):
    base_dir = tmp_path / "base"
    build("bert").save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    dt.apply(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    dt.save_adapter(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 100, (16, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 3}


def _trainer(folder, seed: int = 0) -> Trainer:
    """A tiny LoRA run under transformers.Trainer: 4 steps, a checkpoint every 2."""
    model = build("bert")
    torch.manual_seed(seed)  # the LoRA initialisation; resuming must overwrite it
    dt.apply(model, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=str(folder), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1)
    return Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[dt.TrainerCallback()])


def test_an_adapted_model_trains_under_the_transformers_trainer(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".deltas.default." in n for n in changed)
    batch = inputs("bert")
    fresh = build("bert")
    dt.load_adapter(fresh, tmp_path / "checkpoint-4" / "adapter")
    assert_close_ulps(output(fresh, batch), output(model.eval(), batch))
    assert (tmp_path / "checkpoint-2" / "adapter" / "adapter_model.safetensors").is_file()


def test_trainer_checkpoints_hold_the_trainable_tensors_not_the_base_model(tmp_path):
    trainer = _trainer(tmp_path / "out")
    trainer.train()
    model = trainer.model
    checkpoint = tmp_path / "out" / "checkpoint-4"
    sizes = {f.name: f.stat().st_size for f in checkpoint.iterdir() if f.is_file()}
    assert set(sizes) == {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                          "trainer_state.json", "training_args.bin"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(load_file(checkpoint / "model.safetensors")) == trainable
    adapter = (checkpoint / "adapter" / "adapter_model.safetensors").stat().st_size
    assert sizes["model.safetensors"] < 2 * adapter  # the same tensors, under longer names
    assert not model._keys_to_ignore_on_save  # put back: a save after training is whole again
    model.save_pretrained(tmp_path / "whole")
    whole = (tmp_path / "whole" / "model.safetensors").stat().st_size
    assert sum(sizes.values()) < whole / 2 and sizes["model.safetensors"] < whole / 10


def test_a_trainer_run_resumed_from_an_adapter_only_checkpoint_ends_with_the_same_weights(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.train()
    resumed = _trainer(tmp_path / "resumed", seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert_close_ulps(param, expected[name])
