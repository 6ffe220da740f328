"""A whole fine-tuning run: `deltatune train` against transformers.Trainer + peft doing the same work.

Both sides train the bundled LoRA example (examples/rotten_tomatoes_lora.yaml: MiniLM-L6, LoRA r=8,
alpha 16, dropout 0.1 on query/value, pooler and classifier trained in full) for its epochs, batch,
learning rate, warm-up and linear decay with AdamW, evaluate on validation every epoch keeping the
best, then measure test accuracy and write the adapter. Both see the same rows: the Trainer side
takes its splits from deltatune's own loader (``load_splits``) and the model from the same folder.

The Trainer side follows its documentation: TrainingArguments (eval and save every epoch,
load_best_model_at_end on accuracy, length-grouped batches, everything else default),
DataCollatorWithPadding, the tokenizer as in transformers' run_glue example. transformers 5 spells
``group_by_length=True`` as ``train_sampling_strategy="group_by_length"``.

Each run is a fresh process, timed from its start to its exit (the adapter is on disk by then);
the sides alternate (A B B A ...) so a shared machine's changing load hits both alike.

    python bench/whole_run.py --repeats 1     # one run each: a check
    python bench/whole_run.py                 # three runs each; medians

deltatune runs as ``deltatune train`` does (``training.precision: auto``: bf16 on a CPU with bf16
units); the Trainer runs twice, with its defaults (fp32 on CPUs) and with ``bf16=True``.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "rotten_tomatoes_lora.yaml"
SIDES = ("deltatune", "trainer", "trainer-bf16")
#: how the report names each side
NAMES = {"deltatune": "deltatune", "trainer": "Trainer+peft", "trainer-bf16": "bf16=True"}
PHASES = ("setup", "data", "train", "evaluate", "save")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs both sides once")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads on both sides")
    parser.add_argument("--config", type=Path, default=CONFIG, help="a deltatune classification config")
    parser.add_argument("--results", type=Path, help="append each finished run to this JSON-lines file, and skip "
                        "the runs it already holds: a killed benchmark continues where it stopped")
    parser.add_argument("--worker", choices=SIDES[1:], help=argparse.SUPPRESS)  # internal: one Trainer run
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)  # time.time() at launch
    return parser.parse_args(argv)


# --- the Trainer + peft side, in its own process ----------------------------------------------

def trainer_run(config_path: Path, folder: Path, threads: int, launched: float, bf16: bool) -> None:
    """Train as the config says with transformers.Trainer + peft; write ``result.json`` and the adapter."""
    import torch
    from transformers import AutoTokenizer

    from deltatune.assets import model_path
    from deltatune.train.config import load_config

    imported = time.time()
    torch.set_num_threads(threads)
    config = load_config(config_path)
    started = time.perf_counter()
    path = str(model_path(config.model.name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer_seconds = time.perf_counter() - started
    started = time.perf_counter()
    data, labels = tokenised(config, tokenizer)
    data_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer, saves = build_trainer(config, path, tokenizer, data, labels, folder, bf16)
    setup_seconds = tokenizer_seconds + time.perf_counter() - started

    started = time.perf_counter()
    output = trainer.train()
    train_call = time.perf_counter() - started
    started = time.perf_counter()
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    test_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer.model.save_pretrained(folder / "adapter")
    final_save = time.perf_counter() - started

    evals = [e["eval_runtime"] for e in trainer.state.log_history if "eval_runtime" in e]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    result = {
        "import_seconds": imported - launched, "test_accuracy": test["test_accuracy"],
        "train_runtime": output.metrics["train_runtime"], "train_call": train_call,
        "eval_runtimes": evals, "test_runtime": test["test_runtime"], "checkpoint_saves": saves.seconds,
        "steps": trainer.state.global_step, "best": trainer.state.best_model_checkpoint,
        "threads": torch.get_num_threads(),
        "optimizer": f"{type(optimizer).__name__} (fused={optimizer.defaults.get('fused')})",
        # deltatune's phases. train: the optimizer steps, i.e. train() less its evaluations and
        # checkpoints (the best model's reload stays in it).
        "seconds": {"setup": setup_seconds, "data": data_seconds,
                    "train": train_call - sum(evals) - sum(saves.seconds),
                    "evaluate": sum(evals) + test_seconds, "save": sum(saves.seconds) + final_save}}
    result["written_seconds"] = time.time() - launched
    (folder / "result.json").write_text(json.dumps(result, indent=2))


def tokenised(config, tokenizer):
    """deltatune's own splits, tokenised as transformers' run_glue example does; and the labels."""
    from deltatune.data.loading import load_splits

    data = config.data
    splits = load_splits(data)
    labels = sorted({str(v) for v in splits["train"][data.label_column]})  # as deltatune orders names
    index = {label: i for i, label in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(batch[data.text_column], truncation=True, max_length=config.model.max_length)
        out["labels"] = [index[str(v)] for v in batch[data.label_column]]
        return out

    return splits.map(encode, batched=True, remove_columns=splits["train"].column_names), labels


def build_trainer(config, path: str, tokenizer, data, labels: list[str], folder: Path, bf16: bool):
    """The peft model and a Trainer set up as the config says; and the callback timing its saves."""
    import numpy as np
    from peft import LoraConfig, TaskType, get_peft_model
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    method, training = config.method, config.training
    set_seed(training.seed)  # before the head is initialised, as the examples do
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    # deltatune trains the task's head in full: the classifier and the pooler it reads
    # (tasks/classification.py: head_modules); peft adds "classifier" for SEQ_CLS by itself.
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=method.r, lora_alpha=method.lora_alpha,
                      lora_dropout=method.lora_dropout, target_modules=list(method.target_modules),
                      modules_to_save=["bert.pooler", "classifier"])
    args = TrainingArguments(
        output_dir=str(folder / "checkpoints"), num_train_epochs=training.epochs,
        per_device_train_batch_size=training.batch_size, per_device_eval_batch_size=training.eval_batch_size,
        learning_rate=training.learning_rate, weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps, lr_scheduler_type=training.lr_scheduler,
        max_grad_norm=training.max_grad_norm, seed=training.seed, logging_steps=training.logging_steps,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="accuracy", train_sampling_strategy="group_by_length",
        report_to=[], use_cpu=True, bf16=bf16)

    def metrics(prediction) -> dict[str, float]:  # what deltatune's classification task reports
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {"accuracy": float(accuracy_score(prediction.label_ids, predicted)),
                "f1": float(f1_score(prediction.label_ids, predicted, average="macro"))}

    class SaveTimes(TrainerCallback):
        """Seconds of each checkpoint: Trainer writes it between on_evaluate and on_save."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.evaluated = 0.0

        def on_evaluate(self, args, state, control, **kwargs) -> None:
            self.evaluated = time.perf_counter()

        def on_save(self, args, state, control, **kwargs) -> None:
            self.seconds.append(time.perf_counter() - self.evaluated)

    saves = SaveTimes()
    trainer = Trainer(model=get_peft_model(model, lora), args=args, train_dataset=data["train"],
                      eval_dataset=data["validation"], processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics, callbacks=[saves])
    return trainer, saves


# --- the parent: launch, time, alternate, summarise -------------------------------------------

def launch(side: str, args: argparse.Namespace, folder: Path) -> dict:
    """One fresh process for ``side``; its wall time, mean load average and results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if side == "deltatune":
        command = [str(Path(sys.executable).parent / "deltatune"), "train", str(args.config),
                   "--set", f"training.output_dir={folder}"]
    else:
        command = [sys.executable, __file__, "--worker", side, "--config", str(args.config),
                   "--threads", str(args.threads), "--output-dir", str(folder)]
    loads, done = [], threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(loads, done), daemon=True)
    log = folder.parent / f"{folder.name}.log"
    sampler.start()
    started = time.perf_counter()
    with open(log, "w") as out:
        launched = time.time()
        code = subprocess.call(command + (["--launched", str(launched)] if side != "deltatune" else []),
                               stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if code != 0:
        sys.exit(f"{side} failed (exit {code}); the end of its log:\n" + log.read_text()[-4000:])
    if side == "deltatune":
        result = _deltatune_result(folder, launched)
    else:
        result = json.loads((folder / "result.json").read_text())
    if not (folder / "adapter" / "adapter_model.safetensors").is_file():
        sys.exit(f"{side} wrote no adapter in {folder / 'adapter'}")
    return {"wall": wall, "load": statistics.fmean(loads), **result}


def _sample_load(loads: list[float], done: threading.Event) -> None:
    """The 1-minute load average every 5 s until ``done``."""
    while True:
        loads.append(os.getloadavg()[0])
        if done.wait(5):
            return


def _deltatune_result(folder: Path, launched: float) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return {"test_accuracy": report["test_accuracy"], "seconds": report["seconds"], "steps": report["steps"],
            "best": f"step {report['best_step']}",
            "written_seconds": (folder / "report.json").stat().st_mtime - launched}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return f"{os.cpu_count()} CPUs ({cpu})"


def versions() -> str:
    import importlib.metadata as metadata

    return ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "peft", "deltatune"))


def report(runs: dict[str, list[dict]], args: argparse.Namespace, loads: tuple[float, float]) -> None:
    def row(label: str, values, spec: str) -> None:
        print(f"{label:24} " + " ".join(f"{value:{spec}}" for value in values))

    median = {side: statistics.median(r["wall"] for r in runs[side]) for side in SIDES}
    print(f"\nmachine: {machine()}; {versions()}; {args.threads} torch threads each side")
    print(f"load average (1 min): {loads[0]:.2f} before, {loads[1]:.2f} after; during the runs, "
          + ", ".join(f"{NAMES[side]} {statistics.fmean(r['load'] for r in runs[side]):.2f}" for side in SIDES))
    print(f"{args.repeats} round(s), alternating; wall = process start to exit (adapter on disk)\n")
    row("", [NAMES[side] for side in SIDES], ">13")
    row("wall s (median)", [median[side] for side in SIDES], "13.1f")
    for i in range(args.repeats):
        row(f"  run {i + 1}", [runs[side][i]["wall"] for side in SIDES], "13.1f")
    row("test accuracy (median)", [statistics.median(r["test_accuracy"] for r in runs[side]) for side in SIDES], "13.4f")
    row("  each run", ["/".join(f"{r['test_accuracy']:.4f}" for r in runs[side]) for side in SIDES], ">13")
    for peer in SIDES[1:]:
        print(f"ratio deltatune / {NAMES[peer]} (median wall): {median['deltatune'] / median[peer]:.3f}")
    print("\nphases, median s (train = optimizer steps; evaluate = validation each epoch + test; "
          "save = adapter + checkpoints;\n  other = wall - phases: interpreter, imports, reports)")
    row("", [NAMES[side] for side in SIDES], ">13")
    for phase in (*PHASES, "other"):
        row(phase, [statistics.median(_phase(r, phase) for r in runs[side]) for side in SIDES], "13.2f")
    for peer in SIDES[1:]:
        trainer = runs[peer]
        print(f"\n{NAMES[peer]}: Trainer's own metrics, median s: "
              f"train_runtime {statistics.median(r['train_runtime'] for r in trainer):.2f}, "
              f"eval_runtime per epoch {'/'.join(f'{statistics.median(e):.2f}' for e in zip(*(r['eval_runtimes'] for r in trainer)))}, "
              f"test_runtime {statistics.median(r['test_runtime'] for r in trainer):.2f}, "
              f"imports {statistics.median(r['import_seconds'] for r in trainer):.2f}; steps {trainer[0]['steps']}, "
              f"best {trainer[0]['best'].rsplit('/', 1)[-1]}, optimizer {trainer[0]['optimizer']}, threads {trainer[0]['threads']}")
    print(f"deltatune: steps {runs['deltatune'][0]['steps']}, best {runs['deltatune'][0]['best']}")
    print("after the results were written (deltatune: report.json, then curves; Trainer: result.json), "
          "median s: " + ", ".join(f"{NAMES[s]} {statistics.median(r['wall'] - r['written_seconds'] for r in runs[s]):.2f}"
                                   for s in SIDES))


def _phase(run: dict, phase: str) -> float:
    if phase == "other":
        return run["wall"] - sum(run["seconds"][p] for p in PHASES)
    return run["seconds"][phase]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        trainer_run(args.config, args.output_dir, args.threads, args.launched, args.worker == "trainer-bf16")
        return
    schedule = [(i, side) for i in range(args.repeats) for side in (SIDES if i % 2 == 0 else SIDES[::-1])]
    done = _recorded(args.results)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="whole_run-") as scratch:
        for i, side in schedule:
            run = done.get((i, side)) or launch(side, args, Path(scratch) / f"{side}-{i}")
            runs[side].append(run)
            print(f"round {i + 1} {side:9}: {run['wall']:6.1f} s, test accuracy {run['test_accuracy']:.4f}, "
                  f"load {run['load']:.2f}, train phase {run['seconds']['train']:.1f} s"
                  f"{' (recorded earlier)' if (i, side) in done else ''}", flush=True)
            if args.results and (i, side) not in done:
                with open(args.results, "a") as out:
                    out.write(json.dumps({"round": i, "side": side, **run}) + "\n")
    report(runs, args, (before, os.getloadavg()[0]))


def _recorded(path: Path | None) -> dict[tuple[int, str], dict]:
    """The runs a --results file holds, by (round, side)."""
    if path is None or not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(line.pop("round"), line.pop("side")): line for line in lines}


if __name__ == "__main__":
    main()
