"""The in-process glibc malloc tuning: applied on glibc Linux, off on request, never over the
user's own MALLOC_* settings. Each case runs in a fresh interpreter (malloc state is global)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import ctypes
from podd_engine.allocator import tune_glibc_malloc
print(tune_glibc_malloc())
class Info(ctypes.Structure):  # struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
import numpy as np
before = libc.mallinfo2().hblks  # (importing torch maps some blocks of its own)
buffers = [np.ones(4 * 2**20 // 8) for _ in range(8)]  # 8 x 4 MiB, like activation buffers
print(libc.mallinfo2().hblks - before)  # how many of them went to mmap
"""


def probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "PODD_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuning_keeps_buffers_in_the_heap():
    applied, mmapped = probe()
    assert applied and mmapped == 0  # 4 MiB buffers stay under the raised mmap threshold
    off, mmapped_off = probe(PODD_MALLOC_TUNING="0")
    assert not off and mmapped_off == 8  # glibc's default: each big buffer is its own mmap


def test_the_users_settings_win():
    applied, mmapped = probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert applied and mmapped == 8  # their threshold (128 KiB) stays in force
