"""The data section of a run config: where the rows come from and how they are split."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.fields import SEEDS, help_field
from .bundled import BUNDLED


@dataclass
class DataConfig:
    source: str | None = help_field("rotten-tomatoes", f"A bundled data set ({', '.join(BUNDLED)}); "
                                    "ignored when train_file is set.")
    train_file: str | None = help_field(None, "Local CSV, TSV, JSON, JSONL or Parquet file.")
    validation_file: str | None = help_field(None, "Held-out file; carved from train when absent.")
    test_file: str | None = help_field(None, "Test file; carved from train when absent.")
    text_column: str = help_field("text", "Column with the text (classification; other tasks name "
                                  "their columns under task:).")
    text_pair_column: str | None = help_field(None, "Second text column for sentence pairs.")
    label_column: str = help_field("label", "Column with the label (a name or an integer).")
    labels: list[str] | None = help_field(None, "The label (or tag) set, in order; default: the labels "
                                          "seen in train, sorted.")
    validation_size: float = help_field(0.1, "Fraction of train carved as validation when no file is given.",
                                        range="(0, 1)")
    test_size: float = help_field(0.1, "Fraction of train carved as test when no file is given.", range="(0, 1)")
    max_train_samples: int | None = help_field(None, "Keep at most this many training rows.",
                                               range="[1, inf)", typical=1000)
    max_eval_samples: int | None = help_field(None, "Keep at most this many validation and test rows.",
                                              range="[1, inf)", typical=500)
    max_test_samples: int | None = help_field(None, "Keep at most this many test rows; default: max_eval_samples.",
                                              range="[1, inf)", typical=500)
    seed: int = help_field(42, "Seed for shuffling and carving splits.", range=SEEDS)
