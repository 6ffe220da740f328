"""One batch, many LoRA adapters: deltatune's per-row batch against peft's, and against one batch per adapter.

8 LoRA adapters (query/value, r=8, random non-zero B) on the bundled MiniLM encoder, 4 rows each:
a 32-row batch where every row names its adapter. Configurations, timed interleaved in one
process (a shared machine's load hits them all alike), no_grad forwards, medians:

- deltatune-mixed: ``model(**batch, adapter_names=names)``, one forward;
- peft-mixed: peft's ``model(**batch, adapter_names=names)``, one forward;
- deltatune-apart: one forward of 4 rows per adapter (set_adapter in between), 8 forwards;
- base: the bare encoder on the 32 rows (the floor: no adapter at all).

Outputs are checked first: deltatune's mixed batch against peft's and against the separate runs.

    python bench/mixed_batch.py                 # 8 adapters x 4 rows, length 64, 2 threads
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import peft
import torch
import transformers
from transformers import AutoModel

import deltatune as dt

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
OPTIONS = dict(r=8, lora_alpha=16, target_modules=["query", "value"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="rows per adapter")
    parser.add_argument("--length", type=int, default=64, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def random_b(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking LoRA B matrices, different for each adapter (a fresh B is zero: every
    adapter would equal the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def build(names: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(bare encoder, deltatune with every adapter, peft with the same adapters' weights)."""
    path = dt.assets.model_path()
    base = AutoModel.from_pretrained(path).eval()
    ours = AutoModel.from_pretrained(path).eval()
    torch.manual_seed(0)
    for name in names:
        dt.apply(ours, dt.LoraConfig(**OPTIONS), adapter_name=name)
    random_b(ours, seed=0)
    theirs = peft.PeftModel(AutoModel.from_pretrained(path), peft.LoraConfig(**OPTIONS), adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**OPTIONS))
    copy_weights(ours, theirs, names)
    return base, ours, theirs.eval()


def copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, names: list[str]) -> None:
    """peft's lora_A/lora_B of each adapter set to deltatune's."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for key, param in theirs.named_parameters():
            if ".lora_" in key:
                module, kind_adapter = key.split(".lora_")
                kind, adapter, _ = kind_adapter.split(".")
                path = module.removeprefix("base_model.model.")
                param.copy_(mine[f"{path}.deltas.{adapter}.lora_{kind}.weight"])


def forwards(base, ours, theirs, batch: dict, names: list[str], rows: int) -> dict:
    """Each configuration as a function that runs it once and returns the hidden states."""
    adapters = list(dict.fromkeys(names))

    def apart():
        parts = []
        for i, name in enumerate(adapters):
            dt.set_adapter(ours, name)
            parts.append(ours(**{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}).last_hidden_state)
        return torch.cat(parts)

    return {"deltatune-mixed": lambda: ours(**batch, adapter_names=names).last_hidden_state,
            "peft-mixed": lambda: theirs(**batch, adapter_names=names).last_hidden_state,
            "deltatune-apart": apart,
            "base": lambda: base(**batch).last_hidden_state}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    names = [f"adapter{i}" for i in range(args.adapters) for _ in range(args.rows)]
    adapters = list(dict.fromkeys(names))
    base, ours, theirs = build(adapters)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (len(names), args.length), generator=g),
             "attention_mask": torch.ones(len(names), args.length, dtype=torch.long)}
    runs = forwards(base, ours, theirs, batch, names, args.rows)
    with torch.no_grad():
        outputs = {name: run() for name, run in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 else list(reversed(runs))
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    print(f"{args.adapters} LoRA adapters (r=8, query/value) x {args.rows} rows, length {args.length}, "
          f"MiniLM-L6, {args.threads} threads, {args.repeats} repeats, torch {torch.__version__}, peft {peft.__version__}")
    for other in ("peft-mixed", "deltatune-apart", "base"):
        diff = (outputs["deltatune-mixed"] - outputs[other]).abs().max().item()
        print(f"max |deltatune-mixed - {other}| = {diff:.2e}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, value in median.items():
        print(f"{name:16s} {value * 1000:8.1f} ms  ({value / median['deltatune-mixed']:.2f}x deltatune-mixed)")
    print(f"deltatune-mixed / peft-mixed = {median['deltatune-mixed'] / median['peft-mixed']:.2f}")
    print(f"deltatune-mixed / deltatune-apart = {median['deltatune-mixed'] / median['deltatune-apart']:.2f}")


if __name__ == "__main__":
    main()
