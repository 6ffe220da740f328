"""Data layouts that are not one row per line: CoNLL token files and SQuAD JSON.

Both are read into plain rows, the same columns the flat JSON/JSONL layouts use:
``{"tokens": [...], "tags": [...]}`` and ``{"id", "question", "context", "answers":
{"text": [...], "answer_start": [...]}}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

#: extensions read as CoNLL: one token per line, its tag in the last column.
CONLL_SUFFIXES = (".conll", ".bio", ".iob", ".iob2")
_SQUAD_START = re.compile(r'^\s*\{\s*"(data|version)"\s*:')


def read_conll(path: str | Path) -> list[dict[str, Any]]:
    """Sentences of a CoNLL-style file: ``token<TAB>tag`` lines, a blank line between sentences.

    Columns are split on tabs (on spaces where a line has no tab); the token is the first
    column and the tag the last, so CoNLL-2003's ``token POS chunk tag`` reads too.
    ``-DOCSTART-`` lines end a sentence and are skipped.

    Args:
        path: the file (UTF-8).

    Returns:
        One ``{"tokens": [...], "tags": [...]}`` row per sentence.

    Raises:
        ConfigError: a non-blank line with a single column.
    """
    rows: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines + [""], start=1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise ConfigError(f"'{path}' line {number} has no tag: {line!r}.",
                              "write one 'token<TAB>tag' per line and a blank line between sentences.")
        tokens.append(parts[0])
        tags.append(parts[-1].strip())
    return rows


def is_squad(path: str | Path) -> bool:
    """Whether a .json file has the SQuAD layout (an object with ``data`` or ``version`` first)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return bool(_SQUAD_START.match(f.read(256)))


def read_squad(path: str | Path) -> list[dict[str, Any]]:
    """Questions of a SQuAD file: ``data[].paragraphs[].qas[].answers[]``, one row per question.

    Args:
        path: a SQuAD 1.1 or 2.0 JSON file (unanswerable questions get empty answer lists).

    Returns:
        Rows with ``id``, ``question``, ``context`` and ``answers`` ``{text: [...], answer_start: [...]}``.

    Raises:
        ConfigError: the file is not JSON, or an entry lacks a SQuAD key.
    """
    try:
        articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        return [_squad_row(paragraph["context"], qa)
                for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"'{path}' is not a SQuAD file: {error!r}.",
                          "use the layout data[].paragraphs[].{context, qas[].{id, question, answers[]}}, "
                          "or flat JSONL rows with question, context, answers.") from error


def _squad_row(context: str, qa: dict[str, Any]) -> dict[str, Any]:
    answers = qa.get("answers") or []
    return {"id": str(qa.get("id", "")), "question": qa["question"], "context": context,
            "answers": {"text": [a["text"] for a in answers],
                        "answer_start": [int(a["answer_start"]) for a in answers]}}
