"""Reading ahead and writing behind (``-npp``/``-nps``): every item read once and in order, at most ``depth``
ahead; write failures land on the case that failed; bugs still raise."""

from __future__ import annotations

import threading
import time

import pytest

from nnunet_samflare.errors import InputError
from nnunet_samflare.inference.pipeline import ReadAhead, WriteBehind


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_read_ahead_reads_each_item_once_and_never_too_far_ahead(depth):
    items = list(range(7))
    started: list[int] = []
    taken: list[int] = []
    lock = threading.Lock()

    def read(item):
        with lock:
            started.append(item)
            # never more than `depth` reads beyond the item being worked on
            assert item <= (taken[-1] if taken else 0) + depth + 1
        time.sleep(0.01)
        return item * 10

    reads = ReadAhead(items, read, depth, key=lambda item: item)
    try:
        for item in items:
            assert reads.take(item) == item * 10
            taken.append(item)
    finally:
        reads.close()
    assert sorted(started) == items


def test_read_ahead_hands_a_read_error_to_its_own_item():
    def read(item):
        if item == 2:
            raise InputError(f"case{item}.nii.gz", "truncated file")
        return item

    reads = ReadAhead([0, 1, 2, 3], read, 2, key=lambda item: item)
    try:
        assert reads.take(0) == 0
        assert reads.take(1) == 1
        with pytest.raises(InputError, match="case2"):
            reads.take(2)
        assert reads.take(3) == 3
    finally:
        reads.close()


def test_write_behind_records_bad_input_per_case_and_raises_bugs():
    done: list[str] = []

    def ok(name):
        return lambda: done.append(name)

    def bad():
        raise InputError("out/b.nii.gz", "disk full")

    writes = WriteBehind(1)
    writes.submit("a", ok("a"))
    writes.submit("b", bad)
    writes.submit("c", ok("c"))
    failures = writes.close()
    assert sorted(done) == ["a", "c"]
    assert list(failures) == ["b"] and "disk full" in str(failures["b"])

    writes = WriteBehind(1)
    with pytest.raises(ZeroDivisionError):  # at the next submit, or at the latest when closing
        writes.submit("x", lambda: 1 / 0)
        writes.submit("y", ok("y"))
        writes.close()
    writes.close()


def test_write_behind_at_depth_zero_writes_at_once():
    done = []
    writes = WriteBehind(0)
    writes.submit("a", lambda: done.append("a"))
    assert done == ["a"]
    assert writes.close() == {}
