"""Memory per process of two CPU processes training the bundled causal-LM example
(examples/causal_lm.yaml: SmolLM2-135M-Instruct, LoRA r=16 on every linear layer) under DDP (each
process holds the whole model) and under FSDP (each holds half of every weight). Each leg is one
torchrun launch of ``deltatune train`` in fresh processes; the figures are the first process's,
read from its report.json.

    python bench/sharded_memory.py                    # 8 steps a leg (~6 min on 2 cores)
    python bench/sharded_memory.py --max-steps 2      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = ("ddp", "fsdp")


def run(strategy: str, folder: Path, extra: list[str]) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    sets = [f"--set={item}" for item in [f"training.distributed={strategy}", f"training.output_dir={folder}",
                                         "training.progress=false", *extra]]
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "deltatune.cli", "train", "examples/causal_lm.yaml",
                    *sets], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((folder / "report.json").read_text())
    return {"distributed": strategy, "precision": report["precision"], "steps": report["steps"],
            "s/step": report["step_seconds"], "peak MB": report["peak_memory_mb"],
            "training peak MB": report["train_peak_memory_mb"],
            "frozen MiB": report["parameters"]["frozen_bytes"] / 2**20, "test perplexity": report["test_perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=8, help="optimizer steps of each leg (2 processes x 16 rows)")
    parser.add_argument("--precision", default="auto", help="training.precision of both legs (auto, fp32, bf16)")
    args = parser.parse_args()
    extra = [f"training.max_steps={args.max_steps}", f"training.precision={args.precision}"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(strategy, Path(tmp) / strategy, extra) for strategy in STRATEGIES]
    print("| distributed | precision | steps | s/step | peak memory, whole run (MB) | peak memory, training (MB) "
          "| frozen weights held (MiB) | test perplexity |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['distributed']} | {row['precision']} | {row['steps']} | {row['s/step']:.2f} | "
              f"{row['peak MB']:,.0f} | {row['training peak MB']:,.0f} | {row['frozen MiB']:.1f} | "
              f"{row['test perplexity']:.2f} |")


if __name__ == "__main__":
    main()
