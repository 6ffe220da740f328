"""Every method on identical work, side by side: quality, parameters, storage, time, memory,
latency and forgetting."""

from .runner import compare

__all__ = ["compare"]
