"""glibc malloc settings for training loops on CPU.

A RaT-BPTT step allocates and frees the same tens-of-MB activation buffers hundreds of times.
With glibc's defaults each of those is a fresh mmap/munmap (page faults on every touch) and the
heap top is trimmed back to the OS between steps; on the project's VMs that costs up to 30 % of
a step (docs/benchmarks.md). Raising the mmap threshold and the trim threshold keeps the memory
in the heap for reuse. This is what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` /
`MALLOC_TOP_PAD_` do, applied from inside the process so that users get it without setting
environment variables. Settings given in the environment win; `PODD_MALLOC_TUNING=0` turns
this off.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

# mallopt takes a C int: the trim threshold tops out just under 2 GiB (the environment variable
# accepts more); 32 MiB is glibc's largest mmap threshold on 64-bit.
SETTINGS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 2**30}

_applied: bool | None = None


def tune_glibc_malloc() -> bool:
    """Apply the settings once per process; True when they are in force (from here or from the
    environment), False when not (not glibc, or turned off)."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("PODD_MALLOC_TUNING", "1") == "0":
        _applied = False
    elif any(knob in os.environ for knob in ENV_KNOBS):
        _applied = True  # the user's own settings are already in force
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = False
    else:
        libc = ctypes.CDLL("libc.so.6")
        _applied = all(libc.mallopt(option, value) == 1 for option, value in SETTINGS.items())
    return _applied
