"""The package version, importable from every layer (a test keeps pyproject.toml's equal)."""

__version__ = "0.1.0"
