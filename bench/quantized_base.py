"""LoRA on a quantised base against LoRA on the full-precision one: the bundled causal-LM example
(SmolLM2-135M-Instruct on ChatterBot, examples/causal_lm.yaml) trained as it is, on its base as
deltatune holds it (``training.precision`` auto: bf16 where the CPU has it), in 4-bit NF4 and in
8-bit. Each run is ``deltatune train`` in its own process, so its peak memory is its own (peak
resident set, the model's loading included); figures are read from the run's report.json.

    python bench/quantized_base.py                   # the whole example, three runs (~15 min on 2 cores)
    python bench/quantized_base.py --max-steps 4     # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BASES = {
    "full precision": [],
    "4-bit nf4": ["model.quantization.load_in_4bit=true", "model.quantization.bnb_4bit_quant_type=nf4"],
    "8-bit": ["model.quantization.load_in_8bit=true"],
}


def run(name: str, overrides: list[str], folder: Path, extra: list[str]) -> dict:
    sets = [f"--set={item}" for item in [*overrides, f"training.output_dir={folder}", "training.progress=false", *extra]]
    subprocess.run([str(Path(sys.executable).with_name("deltatune")), "train", "examples/causal_lm.yaml", *sets], check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((folder / "report.json").read_text())
    parameters = report["parameters"]
    return {"base": name, "precision": report["precision"], "steps": report["steps"],
            "s/step": report["step_seconds"], "peak MB": report["peak_memory_mb"],
            "frozen MiB": parameters["frozen_bytes"] / 2**20,
            "test perplexity": report["test_perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps")
    parser.add_argument("--precision", default="auto", help="training.precision of every run (auto, fp32, bf16)")
    args = parser.parse_args()
    extra = [f"training.precision={args.precision}"] + ([f"training.max_steps={args.max_steps}"] if args.max_steps else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, overrides, Path(tmp) / str(i), extra) for i, (name, overrides) in enumerate(BASES.items())]
    print("| base | precision | steps | s/step | peak memory (MB) | frozen weights (MiB) | test perplexity |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['base']} | {row['precision']} | {row['steps']} | {row['s/step']:.2f} | {row['peak MB']:,.0f} | "
              f"{row['frozen MiB']:.1f} | {row['test perplexity']:.2f} |")


if __name__ == "__main__":
    main()
