"""What went wrong, told the way the user needs it: bad input, out of memory, or a bug.

* **Bad input** (:class:`InputError`, a missing file or folder, an unwritable output folder): one line naming the
  file and the cause, exit code :data:`EXIT_BAD_INPUT` (2). The user can fix it.
* **Out of memory** (``torch.cuda.OutOfMemoryError``, ``MemoryError`` including numpy's ``_ArrayMemoryError``,
  a ``RuntimeError`` whose message says the allocator ran out): its own message with what to try, exit code
  :data:`EXIT_OUT_OF_MEMORY` (3). The input is fine; the machine or the settings are not.
* **Anything else is a bug** and keeps its traceback (Python's exit code 1).

Folder inputs are worked through case by case (:func:`run_cases`): a bad or too large case is recorded and the
others go on; at the end :class:`CaseFailures` lists what failed, and its exit code is that of the worst failure.
Pure Python: shared by every layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TextIO, TypeVar

EXIT_OK = 0
EXIT_BUG = 1  # Python's own exit code for an uncaught exception (the traceback is printed)
EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3

#: What to try after running out of memory, in the order most likely to help.
OUT_OF_MEMORY_ADVICE = (
    "try --tile_batch 1, then -device cpu (host RAM is usually larger than GPU memory), fewer worker processes "
    "(nnUNet_def_n_proc=1), or fewer cases running at the same time"
)


class InputError(ValueError):
    """A bad input file or folder, or an invalid value given by the user. The message is one line:
    ``<file>: <cause>`` (or just the cause when no file is involved)."""

    def __init__(self, path: str | os.PathLike | None, cause: str):
        self.path = None if path is None else str(path)
        self.cause = " ".join(str(cause).split())  # one line, whatever the cause text looked like
        super().__init__(self.cause if self.path is None else f"{self.path}: {self.cause}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return type(self), (self.path, self.cause)


class CaseFailures(Exception):
    """Some cases of a folder failed (bad input or out of memory); the others were done.

    ``failures`` maps each failed case to its error, ``done`` lists what was finished, ``total`` is the number of
    cases attempted. :attr:`exit_code` is the worst failure's: out of memory (3) over bad input (2).
    """

    def __init__(self, failures: dict[str, BaseException], total: int, done: list | None = None):
        self.failures = dict(failures)
        self.total = total
        self.done = list(done or [])
        names = ", ".join(self.failures)
        super().__init__(f"{len(self.failures)} of {total} case(s) failed: {names}")

    @property
    def exit_code(self) -> int:
        return max(exit_code_for(e) or EXIT_BUG for e in self.failures.values())

    def lines(self) -> list[str]:
        """One line per failed case, then the count."""
        return [f"{case}: {one_line(error)}" for case, error in self.failures.items()] + [str(self)]

    def __reduce__(self):
        return type(self), (self.failures, self.total, self.done)


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


_OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways torch, numpy and Python say that an allocation failed (also when re-raised)."""
    for e in _chain(error):
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and any(p in str(e).lower() for p in _OOM_PHRASES):
            return True
    return False


def is_bad_input(error: BaseException) -> bool:
    """Our own :class:`InputError`, and missing or unwritable files and folders."""
    return isinstance(error, (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def exit_code_for(error: BaseException) -> int | None:
    """:data:`EXIT_BAD_INPUT`, :data:`EXIT_OUT_OF_MEMORY`, or None for a bug (let it raise)."""
    if isinstance(error, CaseFailures):
        return error.exit_code
    if is_out_of_memory(error):
        return EXIT_OUT_OF_MEMORY
    if is_bad_input(error):
        return EXIT_BAD_INPUT
    return None


def one_line(error: BaseException) -> str:
    """The message a user sees for a bad-input or out-of-memory error (one line)."""
    if is_out_of_memory(error) and not isinstance(error, CaseFailures):
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        return f"out of memory ({first}); {OUT_OF_MEMORY_ADVICE}"
    if isinstance(error, OSError) and error.filename is not None and not isinstance(error, InputError):
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


T = TypeVar("T")
R = TypeVar("R")


def run_cases(
    items: Iterable[T],
    work: Callable[[T], R],
    name: Callable[[T], str],
    *,
    fail_fast: bool = False,
    on_failure: Callable[[str, BaseException], None] | None = None,
) -> list[R]:
    """``work(item)`` for every item; bad input and out-of-memory failures are recorded and the next item goes
    on (unless ``fail_fast``: then the first one is raised as it is). Bugs always raise at once. Raises
    :class:`CaseFailures` at the end if anything failed; returns the results otherwise."""
    results: list[R] = []
    failures: dict[str, BaseException] = {}
    total = 0
    for item in items:
        total += 1
        try:
            results.append(work(item))
        except Exception as error:
            if fail_fast or exit_code_for(error) is None:
                raise
            failures[name(item)] = error
            if on_failure is not None:
                on_failure(name(item), error)
    if failures:
        raise CaseFailures(failures, total, results)
    return results


def report(error: BaseException, prog: str, stream: TextIO | None = None) -> int | None:
    """Print a bad-input or out-of-memory error for the user (``prog: error: ...``, one line per failed case)
    and return its exit code; return None for a bug, which the caller re-raises with its traceback."""
    import sys

    code = exit_code_for(error)
    if code is None:
        return None
    stream = sys.stderr if stream is None else stream
    lines = error.lines() if isinstance(error, CaseFailures) else [one_line(error)]
    for line in lines:
        print(f"{prog}: error: {line}", file=stream)
    return code
