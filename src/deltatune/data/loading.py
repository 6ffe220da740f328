"""Tables in, checked splits out: local files or bundled sets, loaded with ``datasets``."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from ..core.errors import ConfigError
from .bundled import read_bundled
from .config import DataConfig
from .formats import CONLL_SUFFIXES, is_squad, read_conll, read_squad

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_file(path: str) -> Dataset:
    """One local data file as a Dataset: CSV, TSV, JSON, JSONL, Parquet, CoNLL or SQuAD JSON.

    Raises:
        ConfigError: missing file, unknown extension, or a file that does not parse.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data file '{path}' does not exist.", "check data.train_file / validation_file / test_file.")
    suffix = file.suffix.lower()
    if suffix in CONLL_SUFFIXES or (suffix == ".json" and is_squad(file)):
        rows = read_conll(file) if suffix in CONLL_SUFFIXES else read_squad(file)
        if not rows:
            raise ConfigError(f"data file '{path}' has no data rows.", "check the file's layout.")
        return Dataset.from_list(rows)
    kind = FORMATS.get(suffix)
    if kind is None:
        raise ConfigError(f"data file '{path}' has an unknown extension '{file.suffix}'.",
                          f"use one of: {', '.join([*FORMATS, *CONLL_SUFFIXES])}.")
    options = {"delimiter": "\t"} if file.suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(kind, data_files=str(file), split="train", **options)
    except Exception as error:  # datasets raises many types for malformed files
        text = "" if kind == "parquet" else file.read_text(errors="replace")
        if kind != "parquet" and sum(bool(line.strip()) for line in text.splitlines()) <= 1:
            raise ConfigError(f"data file '{path}' has no data rows.", "add rows below the header.") from error
        raise ConfigError(f"could not read '{path}' as {kind}: {error}",
                          "check that the file is well-formed and matches its extension.") from error


def load_splits(data: DataConfig) -> DatasetDict:
    """train / validation / test splits from the data config, carved with ``data.seed`` where missing."""
    train = read_file(data.train_file) if data.train_file else Dataset.from_list(read_bundled(data.source))
    splits = {"train": train.shuffle(seed=data.seed)}
    for name, file, size in (("test", data.test_file, data.test_size),
                             ("validation", data.validation_file, data.validation_size)):
        if file:
            splits[name] = read_file(file)
        else:
            carved = splits["train"].train_test_split(test_size=size, seed=data.seed, shuffle=False)
            splits["train"], splits[name] = carved["train"], carved["test"]
    _limit(splits, "train", data.max_train_samples)
    _limit(splits, "validation", data.max_eval_samples)
    _limit(splits, "test", data.max_test_samples if data.max_test_samples is not None else data.max_eval_samples)
    for name, split in splits.items():
        if len(split) == 0:
            raise ConfigError(f"the {name} split is empty.", "give more rows, or smaller validation/test sizes.")
    return DatasetDict(splits)


def _limit(splits: dict, name: str, limit: int | None) -> None:
    if limit is not None and len(splits[name]) > limit:
        splits[name] = splits[name].select(range(limit))


def require_columns(splits: DatasetDict, columns: dict[str, str]) -> None:
    """Check that every split has the columns a task reads.

    Args:
        splits: the data splits.
        columns: the config key that names each column -> the column's name,
            e.g. ``{"data.text_column": "text"}``; the error points at the key to change.

    Raises:
        ConfigError: a split lacks a column.
    """
    for name, split in splits.items():
        for key, column in columns.items():
            if column not in split.column_names:
                raise ConfigError(f"the {name} data has no column '{column}' ({key}).",
                                  f"its columns are: {', '.join(split.column_names)}; set {key} to the "
                                  "one that holds it.")
