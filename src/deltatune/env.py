"""The process set-up every command shares: the Hugging Face libraries offline and quiet.

deltatune never downloads (models and data come from local folders or the bundled assets) and
prints its own progress, so the libraries are kept off the hub and limited to errors, without
progress bars. This is done with environment variables, which the libraries read when they are
imported: the call imports nothing (``deltatune --help`` stays fast), and worker processes
(torchrun, data loader workers) inherit it. A variable already set by the user wins.
"""

from __future__ import annotations

import logging
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
#: loggers that report, when bitsandbytes is imported, its failed download of an optional CPU
#: kernel from the hub (it falls back to its own kernels): a warning of many lines, every time
NOISY_LOGGERS = ("bitsandbytes", "kernels")


def quiet_loggers() -> None:
    """Limit the noisy loggers to errors, unless the user set their level."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def offline_and_quiet() -> None:
    """Keep the Hugging Face libraries offline and quiet (errors only, no progress bars)."""
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
    quiet_loggers()
    # Libraries imported before this call (by a test or a Python caller) read their settings already.
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
