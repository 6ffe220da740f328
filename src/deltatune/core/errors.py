"""Errors for users: what went wrong, where, and how to fix it."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class DeltatuneError(Exception):
    """Base error. ``str()`` gives the problem and, when known, the fix on its own line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(DeltatuneError, ValueError):
    """A configuration value or key is invalid."""


class TargetError(ConfigError):
    """A ``target_modules`` entry matches nothing, or matches a module the method cannot adapt."""


class AdapterFileError(DeltatuneError):
    """An adapter file is missing, corrupted, or belongs to another base model."""


class MergeError(DeltatuneError):
    """A merge, unmerge or disable request that cannot be carried out."""


def warn_user(message: str) -> None:  # pragma: no mutate block (mutmut's trampoline would be its caller)
    """A UserWarning shown at the first caller outside deltatune: the line the user can change
    (a fixed stacklevel would point inside deltatune for the entry points that call deeper)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
