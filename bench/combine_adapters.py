"""Combining LoRA adapters, measured on bundled data (docs/combining.md).

1. A soup: two LoRA adapters of the bundled MiniLM trained on the two halves of 1,600 Rotten
   Tomatoes snippets (same seed, so the same start), combined 0.5 / 0.5 in each of the 11 ways,
   against each half alone and against one adapter trained on all 1,600; tested on 400 snippets.
2. Two tasks: the all-data Rotten Tomatoes adapter and one trained on 1,600 SMS messages (spam or
   ham) combined 1.0 / 1.0 (task arithmetic's addition); each task scored with its own head on
   its own 400 test rows, against its adapter alone.

Every run: LoRA r=8 on query/value, one epoch in batches of 16, learning rate 3e-3, 10 warm-up
steps, the task head and BERT's pooler trained in full; the combinations are made and scored with
``deltatune combine`` and ``deltatune evaluate``'s code (io.combine, train.inference).

    python bench/combine_adapters.py                  # about 10 minutes on 2 cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from deltatune.core.combine import COMBINATIONS
from deltatune.data.config import DataConfig
from deltatune.data.loading import load_splits
from deltatune.io.combine import combine_folders
from deltatune.train.config import load_config
from deltatune.train.inference import evaluate_run
from deltatune.train.loop import train

SIZES = {"max_train_samples": 1600, "max_eval_samples": 128, "max_test_samples": 400}
TRAINING = ["model.name_or_path=minilm-l6", "model.max_length=64", "training.epochs=1", "training.batch_size=16",
            "training.warmup_steps=10", "training.learning_rate=3e-3", "method.r=8", "training.progress=false"]
DENSITY = 0.5  # of the ways that prune (ties, dare_*, magnitude_prune)


def write_splits(source: str, folder: Path) -> dict[str, Path]:
    """The bundled set's splits as CSV files, the training rows also in two halves."""
    splits = load_splits(DataConfig(source=source, **SIZES))
    folder.mkdir(parents=True)
    files = {}
    for name, split in splits.items():
        split.to_csv(files.setdefault(name, folder / f"{name}.csv"), index=False)
    half = len(splits["train"]) // 2
    for i, rows in enumerate((range(half), range(half, len(splits["train"])))):
        splits["train"].select(rows).to_csv(files.setdefault(f"half{i + 1}", folder / f"half{i + 1}.csv"), index=False)
    return files


def trained(files: dict[str, Path], train_on: str, folder: Path) -> Path:
    train(load_config(None, [*TRAINING, f"data.train_file={files[train_on]}", f"data.validation_file={files['validation']}",
                             f"data.test_file={files['test']}", f"training.output_dir={folder}"]))
    return folder


def scores(run: Path) -> str:
    metrics = evaluate_run(run)
    return f"{metrics['test_accuracy']:.4f} | {metrics['test_f1']:.4f}"


def combined(runs: list[Path], weights: list[float], how: str, head: int, folder: Path) -> Path:
    density = DENSITY if how.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else None
    return combine_folders(runs, weights, folder, how=how, head=head, density=density)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rt, sms = write_splits("rotten-tomatoes", tmp / "rt-data"), write_splits("sms-spam", tmp / "sms-data")
        halves = [trained(rt, f"half{i}", tmp / f"rt-half{i}") for i in (1, 2)]
        rt_all, sms_all = trained(rt, "train", tmp / "rt-all"), trained(sms, "train", tmp / "sms-all")
        print("Soup of the two Rotten Tomatoes halves (0.5 / 0.5, the first half's head):\n")
        print("| adapter | test accuracy | test F1 |\n|---|---:|---:|")
        for name, run in (("half 1 alone", halves[0]), ("half 2 alone", halves[1]), ("all 1,600 rows", rt_all)):
            print(f"| {name} | {scores(run)} |")
        for how in COMBINATIONS:
            print(f"| {how} | {scores(combined(halves, [0.5, 0.5], how, 0, tmp / f'soup-{how}'))} |")
        print("\nRotten Tomatoes + SMS spam (1.0 / 1.0), each task with its own head:\n")
        print("| adapter | RT accuracy | RT F1 | SMS accuracy | SMS F1 |\n|---|---:|---:|---:|---:|")
        print(f"| each alone | {scores(rt_all)} | {scores(sms_all)} |")
        for how in COMBINATIONS:
            rt_score = scores(combined([rt_all, sms_all], [1.0, 1.0], how, 0, tmp / f"rt-{how}"))
            sms_score = scores(combined([rt_all, sms_all], [1.0, 1.0], how, 1, tmp / f"sms-{how}"))
            print(f"| {how} | {rt_score} | {sms_score} |")


if __name__ == "__main__":
    main()
