"""What merging a LoRA into a quantised base costs: the merge dequantises each adapted layer,
adds the update in float32 and quantises the result again, so the merged model differs from the
unmerged one by that second rounding. Given a run folder trained with ``model.quantization``
(bench/quantized_base.py's runs, or any ``deltatune train`` run), prints the test metrics
unmerged and merged and how far the merged weights moved from W0 + update, relative to the
update itself.

    python bench/quantized_merge.py RUN [RUN...]
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from datasets import DatasetDict
from torch.utils.data import DataLoader

import deltatune as dt
from deltatune.core.method import deltas_of
from deltatune.core.quantized import weight_values
from deltatune.data.loading import load_splits
from deltatune.train.inference import load_run
from deltatune.train.loop import evaluate


def measure(folder: str) -> None:
    config, task, tokenizer, model = load_run(folder)
    splits = task.prepare(DatasetDict({"test": load_splits(config.data)["test"]}), tokenizer, config)
    loader = DataLoader(splits["test"], batch_size=config.training.eval_batch_size, collate_fn=task.collator(tokenizer))
    unmerged = evaluate(model, loader, task, Accelerator(cpu=True), "test")
    with torch.no_grad():
        exact = {name: (weight_values(layer.base_layer).float() + delta.delta_weight()).clone()
                 for name, layer, delta in deltas_of(model, "default") if hasattr(delta, "delta_weight")}
        updates = {name: delta.delta_weight().norm().item() for name, _, delta in deltas_of(model, "default")
                   if hasattr(delta, "delta_weight")}
    dt.merge(model)
    moved = [(weight_values(model.get_submodule(name).base_layer).float() - w).norm().item() / updates[name]
             for name, w in exact.items()]
    merged = evaluate(model, loader, task, Accelerator(cpu=True), "test")
    print(f"{folder}: {config.model.quantization.describe()}")
    for key in unmerged:
        print(f"  {key:<18} unmerged {unmerged[key]:.4f}  merged {merged[key]:.4f}")
    print(f"  re-quantising moved the merged weights by {sorted(moved)[len(moved) // 2]:.2f}x the update's norm "
          f"(median over {len(moved)} layers; max {max(moved):.2f}x)")


if __name__ == "__main__":
    for run in sys.argv[1:]:
        measure(run)
