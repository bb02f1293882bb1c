"""A readers-writer lock: many threads read at once (searches: the numba kernels release the GIL) or one
thread writes (add, remove, compact), and a waiting writer blocks new readers so that writers never starve.
Used by ``CtFIndex`` and by the service's gallery."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    ``with lock.read():`` / ``with lock.write():``. The read side is a plain context object, not a
    ``contextlib`` generator: it is taken on every search, where the generator cost ~2 us a call.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # the condition's lock: readers take it directly (no Condition wrapper)
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._read = _Read(self)

    def read(self) -> "_Read":
        return self._read

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def writing(lock: RWLock | None) -> contextlib.AbstractContextManager:
    """The write side of a caller's lock passed to a write (``lock=``), or nothing to hold for None."""
    return lock.write() if lock is not None else contextlib.nullcontext()


class _Read:
    """The read side of an ``RWLock`` (one per lock, shared by every reader: it keeps no state)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        with lock._mutex:
            while lock._writer or lock._waiting:
                lock._cond.wait()
            lock._readers += 1

    def __exit__(self, *exc) -> None:
        lock = self._lock
        with lock._mutex:
            lock._readers -= 1
            if not lock._readers and lock._waiting:  # only a waiting writer waits for the readers
                lock._cond.notify_all()
