"""A method's training hooks (Method.training_hooks): an extra loss term, a call after every
optimizer step with the gradients still there, and state that checkpoints keep, all without a
branch in the loop. A method defined here (LoRA whose B shrinks by a schedule that counts its
own calls) exercises each part."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from deltatune.core import method as core_method
from deltatune.core.fields import help_field
from deltatune.core.method import TrainingHooks, register
from deltatune.methods.lora import Lora, LoraConfig
from deltatune.train.config import load_config
from deltatune.train.loop import train
from tiny import assert_close_ulps, interrupt_at_step, logged_losses


@dataclass
class ShrinkingConfig(LoraConfig):
    offset: float = help_field(0.0, "A constant added to the loss.")
    shrink: float = help_field(0.01, "B is multiplied by 1 - shrink * (steps so far) after each step.")


class Shrinking(TrainingHooks):
    def __init__(self, model, adapter_name, config):
        self.config = config
        self.b = [p for n, p in model.named_parameters() if f"deltas.{adapter_name}.lora_B" in n]
        self.steps = torch.zeros((), dtype=torch.int64)
        self.calls: list[tuple[int, int, bool]] = []

    def extra_loss(self):
        return torch.tensor(self.config.offset) if self.config.offset else None

    def after_step(self, step, total_steps):
        self.steps += 1
        self.calls.append((step, total_steps, all(b.grad is not None for b in self.b)))
        with torch.no_grad():
            for b in self.b:
                b.mul_(1 - self.config.shrink * float(self.steps))

    def state_dict(self):
        return {"steps": self.steps.clone()}

    def load_state_dict(self, tensors):
        self.steps.copy_(tensors["steps"])


HOOKS: list[Shrinking] = []


@pytest.fixture
def shrinking():
    class ShrinkingLora(Lora):
        name = "shrinking-lora"
        config_class = ShrinkingConfig

        def training_hooks(self, model, adapter_name):
            HOOKS.append(Shrinking(model, adapter_name, self.config))
            return HOOKS[-1]

    register(ShrinkingLora)
    HOOKS.clear()
    yield HOOKS
    del core_method._REGISTRY["shrinking-lora"]


def config(folder, csv, *extra):
    return load_config(None, [
        "model.name_or_path=minilm-l6", "model.max_length=32", f"data.train_file={csv}",
        "data.max_train_samples=96", "data.max_eval_samples=16", f"training.output_dir={folder}",
        "training.batch_size=8", "training.learning_rate=5e-3", "training.max_steps=8", "training.save_steps=2",
        "training.logging_steps=1", "training.progress=false", "method=shrinking-lora", "method.r=2",
        "method.target_modules=[query]", *extra])


def test_after_step_runs_once_per_step_with_the_gradients_still_there(tmp_path, sentiment_csv, shrinking):
    train(config(tmp_path / "a", sentiment_csv))
    [hooks] = shrinking
    assert hooks.calls == [(step, 8, True) for step in range(1, 9)]
    assert int(hooks.steps) == 8


def test_the_extra_loss_adds_to_the_logged_loss_and_a_constant_changes_no_weight(tmp_path, sentiment_csv, shrinking):
    train(config(tmp_path / "plain", sentiment_csv))
    train(config(tmp_path / "offset", sentiment_csv, "method.offset=5.0"))
    for plain, offset in zip(logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "offset"), strict=True):
        assert offset - plain == pytest.approx(5.0, abs=8 * torch.finfo(torch.float32).eps * (5.0 + plain))
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "offset" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hook_state_is_checkpointed_and_a_resumed_run_ends_as_a_straight_one(tmp_path, sentiment_csv,
                                                                             shrinking, monkeypatch):
    train(config(tmp_path / "straight", sentiment_csv))
    restore = interrupt_at_step(monkeypatch, 6)
    resumed_config = config(tmp_path / "resumed", sentiment_csv)
    assert train(resumed_config).interrupted
    restore()
    [saved] = sorted((tmp_path / "resumed" / "checkpoints").iterdir())[-1:]
    assert int(load_file(saved / "hooks.safetensors")["default/steps"]) == 5  # the last whole step
    train(resumed_config, resume=True)
    assert int(shrinking[-1].steps) == 8  # counted on from the checkpoint, not from 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    for key in a:
        assert_close_ulps(b[key], a[key])
