"""What LoRA costs and saves on a BERT-base-shaped classifier: deltatune against Hugging Face peft.

Training step (forward + backward + AdamW step) and peak memory for full fine-tuning, deltatune
LoRA and peft LoRA (query/value, r=8, classifier trained in full); inference latency (no_grad
forward) for the base model, deltatune unmerged and merged, and peft unmerged.

Times are medians after warm-up, taken in one process with the configurations interleaved step
by step (in alternating order), so a shared machine's changing load hits them all alike. Memory
is measured with each configuration in its own fresh process, so one run's allocations never
count against another: on CPU, peak memory is peak RSS (ru_maxrss) minus the RSS once the model
is built and adapted; on CUDA it is torch.cuda.max_memory_allocated minus the allocation then.

    python bench/lora_overhead.py --small            # 4 layers, hidden 256: a quick check
    python bench/lora_overhead.py                    # BERT-base shape, batch 8 x 128, 2 threads
    python bench/lora_overhead.py --minilm --batch 16 --precision bf16

``--precision bf16``: deltatune as ``training.precision: bf16`` runs (the frozen base held in bf16,
what trains in fp32, the forward under autocast); peft, full fine-tuning and the base model as
``Trainer(bf16=True)`` runs them (fp32 weights, the forward under the same autocast).

deltatune's sides (its LoRA and its full fine-tuning) train with ``training.fast_dropout`` as its
runs do on CPUs; ``--torch-dropout`` gives them torch's dropout, as peft has.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import peft
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

import deltatune as dt
from deltatune.train.fast_dropout import use_fast_dropout
from deltatune.train.precision import autocast_forward, hold_frozen

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations peft triggers
TRAIN = ["full", "deltatune", "peft"]
INFER = ["base", "deltatune-unmerged", "deltatune-merged", "peft-unmerged"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference forwards per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps / forwards first")
    parser.add_argument("--small", action="store_true", help="4 layers, hidden 256 (quick check)")
    parser.add_argument("--minilm", action="store_true", help="MiniLM-L6's shape: 6 layers, hidden 384")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: every side under bf16 autocast, deltatune's frozen base held in bf16")
    parser.add_argument("--torch-dropout", action="store_true",
                        help="deltatune's sides with torch's dropout, not training.fast_dropout's")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration
    return parser.parse_args(argv)


# --- one configuration, in its own process -----------------------------------------------

def build_model(args):
    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    minilm = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    shape = small if args.small else minilm if args.minilm else {}
    model = BertForSequenceClassification(BertConfig(num_labels=2, **shape))
    return model.to(args.device)


def adapt(model, kind: str, precision: str = "fp32", fast: bool = True):
    """Apply the LoRA of ``kind`` (query/value, r=8, alpha=16, dropout 0.1, classifier saved),
    computing in ``precision`` (and, for deltatune's sides, with ``fast`` dropout) as that side's
    own training would."""
    options = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                   modules_to_save=["classifier"])
    if kind.startswith("deltatune"):
        dt.apply(model, dt.LoraConfig(**options))
        if kind == "deltatune-merged":
            with torch.no_grad():  # a trained-looking B, so the merge really changes weights
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(std=0.01)
            dt.merge(model)
        if kind == "deltatune-merged":  # frozen as served: the merged base held lean
            model.requires_grad_(False)
        hold_frozen(model, precision)
    elif kind == "base":  # as deltatune serves it, so that merged / base is the same computation
        hold_frozen(model.requires_grad_(False), precision)
    elif kind.startswith("peft"):
        model = peft.get_peft_model(model, peft.LoraConfig(**options))
    # "full" and "base": the plain model, every parameter trainable
    device = next(model.parameters()).device
    if fast and (kind.startswith("deltatune") or kind == "full"):
        use_fast_dropout(model, device)
    return autocast_forward(model, precision, device)


def fake_batch(args, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    return {k: v.to(args.device) for k, v in batch.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def runner(args, phase: str, kind: str):
    """Build one configuration and return (model, a callable doing one step or forward)."""
    model = adapt(build_model(args), kind, args.precision, not args.torch_dropout)
    batch = fake_batch(args, model.config.vocab_size)
    if phase == "infer":
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model, torch.no_grad()(lambda: model(**inputs))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def run_memory_worker(args) -> dict:
    """One configuration in this fresh process: its peak memory beyond the built model."""
    torch.set_num_threads(args.threads)
    phase, kind = args.worker.split(":")
    cuda = args.device.startswith("cuda")
    model, fn = runner(args, phase, kind)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else rss_bytes()
    for _ in range(2):  # the second step holds activations, gradients and optimizer state at once
        fn()
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"peak_bytes": max(peak - start, 0),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure_memory(args, phase: str, kind: str) -> dict:
    """Run one configuration in a fresh interpreter and read its JSON result."""
    flags = [f"--device={args.device}", f"--threads={args.threads}", f"--batch={args.batch}",
             f"--length={args.length}", f"--precision={args.precision}", f"--worker={phase}:{kind}"] + (["--small"] if args.small else []) + (
                 ["--minilm"] if args.minilm else []) + (["--torch-dropout"] if args.torch_dropout else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{phase}:{kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  memory {phase:5} {kind:19} {result['peak_bytes'] / 2**20:8.0f} MiB", flush=True)
    return result


def measure_times(args, phase: str, kinds: list[str], n: int) -> dict[str, list[float]]:
    """Seconds per call of each configuration, interleaved call by call."""
    torch.set_num_threads(args.threads)
    fns = {kind: runner(args, phase, kind)[1] for kind in kinds}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(n):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            sync(args.device)
            start = time.perf_counter()
            fns[kind]()
            sync(args.device)
            times[kind].append(time.perf_counter() - start)
        print(f"  time {phase} round {i + 1}/{n}: " + ", ".join(
            f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items()), flush=True)
    return times


# --- the report --------------------------------------------------------------------------

def report(args, train: dict, infer: dict, loads: list[float]) -> None:
    shape = ("4 layers, hidden 256" if args.small else "MiniLM-L6 shape (6 layers, hidden 384)" if args.minilm
             else "BERT-base (12 layers, hidden 768)")
    print(f"\n{shape}, batch {args.batch} x {args.length}, device {args.device}, {args.precision}, {args.threads} "
          f"threads; medians of {args.steps} steps / {args.repeats} forwards after {args.warmup} warm-up")
    print("(min: the least-disturbed call; on a busy machine it is the steadier figure)")
    print(f"\n{'training':20} {'s/step':>9} {'min':>9} {'peak MiB':>10} {'trainable':>13}")
    for kind, r in train.items():
        print(f"{kind:20} {r['seconds']:9.3f} {r['min']:9.3f} {r['peak_bytes'] / 2**20:10.0f} {r['trainable']:13,}")
    print(f"\n{'inference':20} {'ms/batch':>9} {'min':>9} {'x base':>8}")
    for kind, r in infer.items():
        print(f"{kind:20} {r['seconds'] * 1000:9.1f} {r['min'] * 1000:9.1f} "
              f"{r['seconds'] / infer['base']['seconds']:8.3f}")
    ratios = [
        ("train time    deltatune / peft", train["deltatune"]["seconds"], train["peft"]["seconds"]),
        ("train time    deltatune / peft (min)", train["deltatune"]["min"], train["peft"]["min"]),
        ("train memory  deltatune / peft", train["deltatune"]["peak_bytes"], train["peft"]["peak_bytes"]),
        ("train time    deltatune / full", train["deltatune"]["seconds"], train["full"]["seconds"]),
        ("train memory  deltatune / full", train["deltatune"]["peak_bytes"], train["full"]["peak_bytes"]),
        ("inference     deltatune / peft (unmerged)", infer["deltatune-unmerged"]["seconds"],
         infer["peft-unmerged"]["seconds"]),
        ("inference     deltatune / peft (unmerged, min)", infer["deltatune-unmerged"]["min"],
         infer["peft-unmerged"]["min"]),
        ("inference     merged / base", infer["deltatune-merged"]["seconds"], infer["base"]["seconds"]),
        ("inference     merged / base (min)", infer["deltatune-merged"]["min"], infer["base"]["min"]),
        ("inference     unmerged / base", infer["deltatune-unmerged"]["seconds"], infer["base"]["seconds"]),
    ]
    print("\nratios")
    for label, a, b in ratios:
        print(f"  {label:48} {a / b if b else float('nan'):.3f}")
    print(f"\nload average (1 min) {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_memory_worker(args)))
        return
    loads = [os.getloadavg()[0]]
    print("peak memory, one fresh process per configuration:", flush=True)
    train = {kind: measure_memory(args, "train", kind) for kind in TRAIN}
    infer = {kind: measure_memory(args, "infer", kind) for kind in INFER}
    loads.append(os.getloadavg()[0])
    print("step times, configurations interleaved:", flush=True)
    for results, phase, kinds, n in ((train, "train", TRAIN, args.steps), (infer, "infer", INFER, args.repeats)):
        for kind, times in measure_times(args, phase, kinds, n).items():
            results[kind].update(seconds=statistics.median(times), min=min(times))
        loads.append(os.getloadavg()[0])
    report(args, train, infer, loads)


if __name__ == "__main__":
    main()
