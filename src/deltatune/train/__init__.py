"""Training: run configs, the loop, checkpoints and logs.

A run config names its method (``method: lora``): importing this package registers every method.
"""

from .. import methods  # noqa: F401  (its files register themselves)
