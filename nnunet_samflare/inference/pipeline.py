"""Reading ahead and writing behind for the cases of a folder: ``-npp`` and ``-nps``, nnU-Net's flag names.

``nnUNetv2_predict`` overlaps its preprocessing workers (``-npp``), the network and its export workers (``-nps``)
across the cases of a folder. ``samflare predict`` does the same: :class:`ReadAhead` reads (and checks) the next
``num_processes_preprocessing`` cases while the models work on the current one, and :class:`WriteBehind` writes
up to ``num_processes_segmentation_export`` finished cases in the background. The workers are threads, not
processes: SimpleITK's reading and writing, zlib and torch release the GIL, and a thread needs neither a fresh
interpreter with its imports (seconds per worker, ``docs/nnunet.md §5``) nor a pickled copy of the scan. ``0``
does the step in the calling thread, in turn, as ``-npp 0 -nps 0`` does for nnU-Net.

Each read ahead holds one more scan in memory, each write behind one more label map (and the scan, when stats or
a preview are written).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from nnunet_samflare.errors import exit_code_for


class ReadAhead:
    """``read(item)`` for ``items`` in order, up to ``depth`` items ahead of the one asked for by :meth:`take`."""

    def __init__(self, items: Sequence[Any], read: Callable[[Any], Any], depth: int, key: Callable = id):
        self.items, self.read, self.depth, self.key = list(items), read, max(0, int(depth)), key
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="samflare-read") if self.depth else None
        self.pending: dict[Hashable, Future] = {}
        self.next_index = 0

    def take(self, item: Any) -> Any:
        """The result of ``read(item)`` (its error, if it failed); queues the reads of the next items."""
        if self.pool is None:
            return self.read(item)
        while self.next_index < len(self.items) and len(self.pending) < self.depth + 1:
            upcoming = self.items[self.next_index]
            self.pending[self.key(upcoming)] = self.pool.submit(self.read, upcoming)
            self.next_index += 1
        future = self.pending.pop(self.key(item), None)
        return self.read(item) if future is None else future.result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


class WriteBehind:
    """Runs ``write()`` jobs with at most ``depth`` in the background (0: at once). A job that fails with bad input
    or out of memory is recorded under its case's name (:attr:`failures`); any other error is raised by the next
    :meth:`submit` or by :meth:`close`, with its traceback, as a bug should be."""

    def __init__(self, depth: int, fail_fast: bool = False):
        self.depth, self.fail_fast = max(0, int(depth)), fail_fast
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="samflare-write") if self.depth else None
        self.running: list[tuple[str, Future]] = []
        self.failures: dict[str, BaseException] = {}

    def submit(self, name: str, write: Callable[[], Any]) -> None:
        if self.pool is None:
            write()
            return
        while len(self.running) >= self.depth:
            self._finish(*self.running.pop(0))
        self.running.append((name, self.pool.submit(write)))
        done = [job for job in self.running if job[1].done()]
        for job in done:
            self.running.remove(job)
            self._finish(*job)

    def close(self) -> dict[str, BaseException]:
        """Wait for every job; returns the recorded failures."""
        try:
            while self.running:
                self._finish(*self.running.pop(0))
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        return self.failures

    def _finish(self, name: str, future: Future) -> None:
        error = future.exception()
        if error is None:
            return
        if self.fail_fast or exit_code_for(error) is None:
            raise error
        self.failures[name] = error
