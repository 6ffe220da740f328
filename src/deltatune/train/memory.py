"""Peak memory of one run, also when several runs share a process (``deltatune compare``).

On CUDA: peak allocated memory since the run began. On Linux CPUs: the process's peak resident
set size since the run began: the kernel's high-water mark is reset at the start (writing 5 to
``/proc/self/clear_refs``), after handing freed memory back, so an earlier run's peak does not
count. Elsewhere: the process's peak since it started.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Start measuring a new peak (call before the run builds anything)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel, so it is not resident
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not glibc/Linux: the peak is then the process's since it started


def peak_memory_mb(device: torch.device) -> float:
    """The peak since ``reset_peak``, in MiB: allocated on CUDA, resident on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
