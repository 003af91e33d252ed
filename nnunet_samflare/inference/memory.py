"""Host memory of the cascade: freed buffers go back to the operating system between stages.

glibc's ``malloc`` serves requests below its mmap threshold (dynamic, up to 32 MB) from the heap, which only
shrinks from its top. The cascade's buffers of a few to tens of megabytes (preprocessing slabs, the ROI, label
maps, network activations) therefore stay in the heap after they are freed, fragmented: on the 512×512×215 CT of
``benchmarks/bench_cascade.py`` that added about 230 MB to the peak (``BENCHMARKS.md``).

An earlier fix pinned the mmap threshold at 1 MB so that such buffers were unmapped when freed. That also fixes
glibc's trim threshold and makes every fresh activation page fault: the segmenter's sliding window became ~40 %
slower on the 2-core CPU (one 96³ forward 4.0–4.5 s unpinned, 5.8–6.7 s pinned; ``BENCHMARKS.md``).
Instead, :func:`release_free_memory` hands the free heap pages back (``malloc_trim``) once per stage, where the
freed buffers of the stage are known to be garbage, and malloc keeps its fast dynamic behaviour inside a stage.

Linux with glibc only; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - absent outside glibc (e.g. musl)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Return the free pages of malloc's heaps to the operating system; True if glibc did (or could) trim."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
