"""glibc malloc settings for a process that moves large messages.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and returns it
with ``munmap`` when freed, and gives the free top of its heaps back to the kernel above
``M_TRIM_THRESHOLD``. A server that receives, runs and answers megabyte tensors then pays,
for every buffer of every request, the page faults and the zeroing of new pages: measured
on the 1 MiB KServe v2 gRPC cell of ``bench/serve_compare.py``, about half of the server's
CPU. :func:`tune` raises both thresholds once, at start-up, so those buffers are reused from
the heap (glibc's own adaptive threshold gets there too, but only for sizes it has seen
freed, and it trims what it keeps).

The cost is memory: up to ``trim_threshold`` of freed memory per heap stays in the process
instead of going back to the kernel. Settings that the user gave glibc (``GLIBC_TUNABLES``
with ``glibc.malloc.*``, or ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``) win: then
nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune"]

log = logging.getLogger("mip.net.allocator")

#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; whether they were set.

    Does nothing (and returns False) where the C library is not glibc, or where the user
    configured glibc's allocator through the environment.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            name in os.environ for name in _USER_SETTINGS):
        log.debug("malloc thresholds left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))) and ok
    if not ok:
        log.debug("mallopt refused mmap threshold %d / trim threshold %d",
                  mmap_threshold, trim_threshold)
    return ok
