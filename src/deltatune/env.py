"""The process set-up every command shares: the Hugging Face libraries offline and quiet.

deltatune never downloads (models and data come from local folders or the bundled assets) and
prints its own progress, so the libraries are kept off the hub and limited to errors, without
progress bars. This is done with environment variables, which the libraries read when they are
imported: the call imports nothing (``deltatune --help`` stays fast), and worker processes
(torchrun, data loader workers) inherit it. A variable already set by the user wins.
"""

from __future__ import annotations

import os
import sys

SETTINGS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow the hub's
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def offline_and_quiet() -> None:
    """Keep the Hugging Face libraries offline and quiet (errors only, no progress bars)."""
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
    # Libraries imported before this call (by a test or a Python caller) read their settings already.
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
