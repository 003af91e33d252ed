"""Host memory of the cascade: large buffers go back to the operating system when they are freed.

glibc's ``malloc`` serves a request above its mmap threshold with a fresh mapping that is unmapped when freed,
and anything smaller from the heap, which only shrinks from its top. The threshold starts at 128 kB but rises
after every free of a mapped block (up to 32 MB), so once the models are loaded, the cascade's buffers of a few
to tens of megabytes (network activations, preprocessing slabs, label maps) come from the heap and stay there,
fragmented. On the 512×512×215 CT of ``benchmarks/bench_cascade.py`` that added 230 MB to the peak
(``BENCHMARKS.md``). Pinning the threshold at 1 MB keeps such buffers mapped; the cost, a page fault per fresh
page, did not show in the timings.

Linux with glibc only; elsewhere nothing changes. The setting is process-wide, like ``MALLOC_MMAP_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: ``M_MMAP_THRESHOLD`` of glibc's ``mallopt``.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers_to_the_system(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes (which also stops it from rising); True if it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
