"""A two-minute tour of the core: LoRA on the bundled pre-trained model, end to end."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from . import assets
from .core.accounting import parameter_report
from .core.verbs import apply, merge, unmerge
from .io.adapter_files import WEIGHTS_NAME, load_adapter, save_adapter
from .methods.lora import LoraConfig

SENTENCES = ["A warm, funny and beautifully acted film.", "Two hours I will never get back.",
             "The plot holds together and the ending lands.", "Dull, noisy and far too long."]
LABELS = torch.tensor([1, 0, 1, 0])


def run_demo() -> None:
    path = assets.model_path()
    print(f"base model: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    apply(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                            modules_to_save=["classifier"]))
    print(parameter_report(model))
    _train_a_few_steps(model, batch)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        merge(model)
        merged = model(**batch).logits
        unmerge(model)
    print(f"max |merged - unmerged| = {(merged - adapted).abs().max().item():.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        size = (Path(tmp) / "adapter" / WEIGHTS_NAME).stat().st_size
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        load_adapter(fresh, Path(tmp) / "adapter")
        with torch.no_grad():
            reloaded = fresh.eval()(**batch).logits
    print(f"adapter file: {size:,} bytes; max |reloaded - adapted| = {(reloaded - adapted).abs().max().item():.2e}")


def _train_a_few_steps(model: torch.nn.Module, batch: dict, steps: int = 10) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, steps - 1):
            print(f"step {step + 1:>2}: loss {loss.item():.4f}")
