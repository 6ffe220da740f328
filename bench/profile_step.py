"""Where a training step spends its time: LoRA and full fine-tuning on the bundled MiniLM-L6.

One step = forward + backward + AdamW step on a 16 x 128 batch of sequence classification.
torch.profiler's self time of every operator, summed by kind:

- frozen matmuls: the model's own linear layers (forward, and backward for their inputs);
- adapter matmuls: matmuls with an operand of LoRA's rank r (A and B, forward and backward);
- attention: scaled-dot-product attention and softmax, forward and backward;
- norms: layer norms, forward and backward;
- elementwise and other: GELU, dropout, additions, copies, embedding lookups, the loss;
- optimizer: AdamW's step (timed on its own);
- data: tokenising and padding the step's 16 texts (timed on its own, with the bundled tokenizer);
- Python and framework: the step's wall time less everything above (hooks, autograd bookkeeping).

    python bench/profile_step.py                # 2 threads, 3 profiled steps after 2 warm-up
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
KINDS = ["frozen matmuls", "adapter matmuls", "attention", "norms", "elementwise and other", "optimizer", "data",
         "Python and framework"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    return parser.parse_args()


def build(kind: str, r: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(dt.assets.model_path(), num_labels=2)
    if kind == "lora":
        dt.apply(model, dt.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    return model.train()


def kind_of(name: str, shapes: list, r: int) -> str:
    """The kind of one operator call, from its name and its operands' shapes."""
    if name in MATMULS or name.endswith("_backward") and "mm" in name:
        return "adapter matmuls" if any(r in shape for shape in shapes if shape) else "frozen matmuls"
    if "attention" in name or "softmax" in name:
        return "attention"
    if "norm" in name:
        return "norms"
    return "elementwise and other"


def profile_steps(model: torch.nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per step by kind (optimizer, data and Python apart)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(args.warmup):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    walls, optimizer_seconds = [], []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(args.steps):
            start = time.perf_counter()
            model(**batch).loss.backward()
            middle = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            walls.append(time.perf_counter() - start)
            optimizer_seconds.append(time.perf_counter() - middle)
    per_kind = dict.fromkeys(KINDS, 0.0)
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::") and not _in_optimizer(event):
            per_kind[kind_of(event.key, event.input_shapes, args.r)] += event.self_cpu_time_total / 1000 / args.steps
    wall = statistics.mean(walls) * 1000
    per_kind["optimizer"] = statistics.mean(optimizer_seconds) * 1000
    measured = sum(v for k, v in per_kind.items() if k != "optimizer")
    per_kind["Python and framework"] = max(wall - per_kind["optimizer"] - measured, 0.0)
    per_kind["total step"] = wall
    return per_kind


def _in_optimizer(event) -> bool:
    """AdamW's own operators (foreach adds and multiplies on parameter lists), timed apart."""
    return event.key.startswith("aten::_foreach") or event.key in ("aten::_fused_adamw_", "aten::lerp_")


def data_ms(batch_size: int, length: int) -> float:
    """Tokenising and padding one batch of texts, as the collator does."""
    tokenizer = AutoTokenizer.from_pretrained(dt.assets.model_path())
    texts = ["a rather long and winding review of a film that nobody asked for " * 4] * batch_size
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch, args.length), generator=g),
             "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    results = {kind: profile_steps(build(kind, args.r), batch, args) for kind in ("lora", "full")}
    data = data_ms(args.batch, args.length)
    print(f"MiniLM-L6 sequence classification, batch {args.batch} x {args.length}, {args.threads} threads, "
          f"mean of {args.steps} profiled steps, torch {torch.__version__}; LoRA r={args.r} on query/value")
    print(f"\n| {'kind':24} | {'LoRA ms':>8} | {'LoRA %':>6} | {'full ms':>8} | {'full %':>6} |")
    print(f"|{'-' * 26}|{'-' * 10}:|{'-' * 8}:|{'-' * 10}:|{'-' * 8}:|")
    for kind in KINDS:
        lora, full = (data, data) if kind == "data" else (results["lora"][kind], results["full"][kind])
        total_lora, total_full = results["lora"]["total step"] + data, results["full"]["total step"] + data
        print(f"| {kind:24} | {lora:8.1f} | {100 * lora / total_lora:6.1f} | {full:8.1f} | {100 * full / total_full:6.1f} |")
    print(f"| {'step (with data)':24} | {total_lora:8.1f} | {100.0:6.1f} | {total_full:8.1f} | {100.0:6.1f} |")


if __name__ == "__main__":
    main()
