"""Host memory of a process tree: RSS and PSS per process, and the peaks over the samples.

PSS (proportional set size) counts a page shared by n processes 1/n in each, so summed over a tree shared pages
count once; summed RSS would count the copy-on-write pages of forked workers again, and nnU-Net forks.
"""

from __future__ import annotations

from collections.abc import Sequence

MIB = 1024 * 1024


def process_memory_mb(pid: int) -> tuple[float, float | None] | None:
    """(RSS, PSS) of one process in MiB; PSS is None where it cannot be read; None if the process is gone or has
    no memory left (a zombie, or a process on its way out).

    Both come from ``/proc/<pid>/smaps_rollup`` (one read); without it RSS comes from psutil.
    """
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) / 1024  # kB
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) / 1024
    except ProcessLookupError:
        # ESRCH: the process has released its memory (it exited and awaits its parent's wait). psutil would give
        # it an RSS of 0, counted as a process whose PSS was unreadable.
        return None
    except (OSError, ValueError, IndexError):
        pass
    if rss is not None and pss is not None:
        return rss, pss
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MIB, None
    except psutil.Error:  # exited between listing and reading
        return None


def process_tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class HostMemoryPeaks:
    """Peaks of the process tree's host memory over the samples."""

    def __init__(self):
        self.ram = self.rss_sum = self.rss_process = None
        self.pss_reads = self.rss_fallbacks = 0

    def sample(self, pids: Sequence[int]) -> float:
        """Sample the processes; returns the tree's RAM (summed PSS, RSS where PSS is unreadable) in MiB."""
        ram = rss_sum = rss_max = 0.0
        for pid in pids:
            memory = process_memory_mb(pid)
            if memory is None:
                continue
            rss, pss = memory
            if pss is None:
                self.rss_fallbacks += 1
            else:
                self.pss_reads += 1
            ram += rss if pss is None else pss
            rss_sum += rss
            rss_max = max(rss_max, rss)
        self.ram = _max(self.ram, ram)
        self.rss_sum = _max(self.rss_sum, rss_sum)
        self.rss_process = _max(self.rss_process, rss_max)
        return ram

    def measure(self) -> str | None:
        if not self.rss_fallbacks:
            return "PSS" if self.pss_reads else None
        return "RSS" if not self.pss_reads else "PSS, RSS where PSS was unreadable"


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)
