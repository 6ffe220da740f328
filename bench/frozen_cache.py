"""Layer tuning with and without training.cache_frozen: the same run, side by side.

The bundled Rotten Tomatoes example's data and model (MiniLM-L6, 6 blocks), layer tuning of the
top 2 blocks (and the classifier) for 3 epochs, batch 32, once with ``training.cache_frozen: true``
(epochs 2 and 3 start at block 4 from the kept inputs) and once without. The two runs differ only
in dropout below block 4 (off with the cache): their accuracies are both printed.

Each run is a fresh process; the sides alternate (A B B A ...) so a shared machine's changing load
hits both alike. Prints each run's training-phase seconds (batches, forward, backward, optimizer:
``report.json``'s ``seconds.train``), test accuracy, peak memory and the kept inputs' size, then
the ratio of the medians.

    python bench/frozen_cache.py --repeats 1 --train-samples 1000    # a quick check
    python bench/frozen_cache.py                                       # 2 runs each, 4,000 examples
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "rotten_tomatoes_lora.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per side")
    parser.add_argument("--train-samples", type=int, default=4000, help="training examples (of 6,824)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=2, help="blocks trained, from the top")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def one_run(args: argparse.Namespace, cache: bool, folder: Path) -> dict:
    overrides = ["method=layer", f"method.top_k={args.top_k}", "method.modules_to_save=[]",
                 f"training.epochs={args.epochs}", "training.learning_rate=5e-5", "training.warmup_steps=0",
                 f"data.max_train_samples={args.train_samples}", f"training.output_dir={folder}",
                 f"training.cache_frozen={str(cache).lower()}", "training.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sets = [arg for override in overrides for arg in ("--set", override)]
    subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(CONFIG), *sets], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    report = json.loads((folder / "report.json").read_text())
    return {"train_s": report["seconds"]["train"], "accuracy": report["test_accuracy"],
            "peak_mib": report["peak_memory_mb"], "cache": report.get("frozen_cache")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for cache in ((False, True) if round_ % 2 == 0 else (True, False)):
                result = one_run(args, cache, Path(tmp) / f"{round_}-{cache}")
                runs[cache].append(result)
                print(f"round {round_ + 1}: cache_frozen={cache!s:5}  train {result['train_s']:7.1f} s  "
                      f"test accuracy {result['accuracy']:.4f}  peak {result['peak_mib']:.0f} MiB  "
                      f"kept {result['cache']}", flush=True)
    median = {cache: statistics.median(r["train_s"] for r in results) for cache, results in runs.items()}
    print(f"\nlayer tuning top-{args.top_k}, MiniLM-L6, {args.train_samples} examples x {args.epochs} epochs, "
          f"batch 32, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"train phase, median: without cache {median[False]:.1f} s, with cache {median[True]:.1f} s, "
          f"ratio {median[True] / median[False]:.3f}")


if __name__ == "__main__":
    main()
