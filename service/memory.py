"""Give freed memory back to the operating system.

glibc's malloc keeps freed blocks in per-thread arenas, and raises its mmap threshold after every
large free, so the memory of decoded photos (tens to hundreds of MB each, freed on worker threads)
stayed with the process for good: six large PNGs took a server from 1.6 to 3.5 GB. A fixed mmap
threshold makes every allocation of `MMAP_THRESHOLD` bytes or more a mapping of its own, returned
when freed (measured: 16 concurrent 7000² PNG searches left 9 MiB instead of 2.3 GB behind,
`benchmarks/service_memory.py`). The cost, an mmap per large allocation, is small next to decoding.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("netvlad.service")

M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` (no-op elsewhere); whether it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        done = bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    if not done:
        log.warning("could not fix malloc's mmap threshold: memory of large decodes may stay with the process")
    return done
