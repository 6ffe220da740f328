"""What each method costs on a BERT-base-shaped classifier: parameters, step time, memory, latency.

Per registered method (its default config, the classifier saved): trainable and stored
parameters, training step time (forward + backward + AdamW step; medians, methods interleaved
step by step so a shared machine's load hits them alike), peak memory beyond the built model
(each method in its own fresh process), and inference latency relative to the base model,
unmerged and, where the method merges, merged.

    python bench/method_overhead.py --small     # 4 layers, hidden 256: a quick check
    python bench/method_overhead.py             # BERT-base shape, batch 8 x 128, 2 threads
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers
from lora_overhead import fake_batch, peak_rss_bytes, rss_bytes, sync
from transformers import BertConfig, BertForSequenceClassification

import deltatune as dt

transformers.logging.set_verbosity_error()
METHODS = ["full", "lora", "ia3", "adapter", "prompt", "prefix", "bitfit", "layer"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per method")
    parser.add_argument("--repeats", type=int, default=6, help="timed inference forwards per model")
    parser.add_argument("--small", action="store_true", help="4 layers, hidden 256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(args, method: str | None):
    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, **(small if args.small else {})))
    if method is not None:
        extra = {} if method == "full" else {"modules_to_save": ["classifier"]}
        dt.apply(model, dt.config_from_dict({"method": method, **extra}))
    return model.to(args.device)


def trainer(args, method: str):
    model = build(args, method).train()
    batch = fake_batch(args, model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def worker(args) -> dict:
    """Peak memory of one method's training in this fresh process, beyond the built model."""
    torch.set_num_threads(args.threads)
    model, step = trainer(args, args.worker)
    start = rss_bytes()
    for _ in range(2):
        step()
    report = dt.parameter_report(model) if args.worker != "full" else None
    return {"peak_mb": max(peak_rss_bytes() - start, 0) / 2**20,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "stored": report.stored if report else sum(p.numel() for p in model.parameters())}


def memory(args, method: str) -> dict:
    flags = [f"--threads={args.threads}", f"--batch={args.batch}", f"--length={args.length}",
             f"--device={args.device}", f"--worker={method}"] + (["--small"] if args.small else [])
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(fns: dict, n: int, device: str) -> dict[str, float]:
    """Median seconds per call, calls interleaved (alternating order) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(n):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def latencies(args, methods: list[str]) -> dict[str, float]:
    batch = {k: v for k, v in fake_batch(args, 30522).items() if k != "labels"}
    models = {"base": build(args, None).eval()}
    for method in methods:
        models[method] = build(args, method).eval()
        if dt.registered()[method].mergeable:
            with torch.no_grad():  # non-zero deltas, so merging really changes the weights
                for name, p in models[method].named_parameters():
                    if p.requires_grad and "classifier" not in name:
                        p.add_(torch.randn_like(p) * 1e-3)
            models[f"{method} merged"] = dt.merge_and_unload(copy.deepcopy(models[method]))
    fns = {k: torch.no_grad()(lambda m=m: m(**batch)) for k, m in models.items()}
    return interleaved(fns, args.repeats, args.device)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    print("peak memory, one fresh process per method ...", flush=True)
    mem = {m: memory(args, m) for m in methods}
    print("training steps, methods interleaved ...", flush=True)
    steps = interleaved({m: trainer(args, m)[1] for m in methods}, args.steps, args.device)
    print("inference, models interleaved ...", flush=True)
    lat = latencies(args, [m for m in methods if m != "full"])
    shape = "4 layers, hidden 256" if args.small else "BERT-base (12 layers, hidden 768)"
    print(f"\n{shape}, batch {args.batch} x {args.length}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'method':9} {'trainable':>12} {'stored':>12} {'s/step':>8} {'x full':>7} {'peak MB':>8} "
          f"{'latency x':>10} {'merged x':>9}")
    for m in methods:
        merged = lat.get(f"{m} merged")
        print(f"{m:9} {mem[m]['trainable']:12,} {mem[m]['stored']:12,} {steps[m]:8.3f} "
              f"{steps[m] / steps.get('full', steps[m]):7.2f} {mem[m]['peak_mb']:8.0f} "
              f"{lat.get(m, lat['base']) / lat['base']:10.2f} "
              f"{(merged / lat['base']) if merged else float('nan'):9.2f}")


if __name__ == "__main__":
    main()
