"""Adapter files: deltatune's own and peft's, read and written atomically, and merged exports.

A file names its method (``"method": "lora"``): importing this package registers every method.
"""

from .. import methods  # noqa: F401  (its files register themselves)
