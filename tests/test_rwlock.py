"""The readers-writer lock of the index and the service: readers share it, a writer excludes everyone, and
a waiting writer holds back new readers and gets the lock as soon as the last reader leaves. Each wait is
bounded (the test fails instead of hanging)."""

import threading
import time

from ctfreid._rwlock import RWLock

WAIT = 5.0  # seconds: far beyond any scheduling delay, still a bounded test


def holder(lock: RWLock, side: str, entered: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread that takes ``side`` of the lock, signals ``entered``, and leaves on ``release``."""

    def run() -> None:
        with getattr(lock, side)():
            entered.set()
            assert release.wait(WAIT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_readers_share_and_a_writer_waits_for_the_last_one():
    lock = RWLock()
    e1, e2, r1, r2 = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    a, b = holder(lock, "read", e1, r1), holder(lock, "read", e2, r2)
    assert e1.wait(WAIT) and e2.wait(WAIT)  # two readers at once
    ew, rw = threading.Event(), threading.Event()
    w = holder(lock, "write", ew, rw)
    time.sleep(0.1)
    assert not ew.is_set()  # the writer waits for both readers
    r1.set()
    a.join(WAIT)
    time.sleep(0.1)
    assert not ew.is_set()  # one reader still holds it
    r2.set()
    b.join(WAIT)
    assert ew.wait(WAIT)  # the last reader out lets the writer in
    rw.set()
    w.join(WAIT)
    assert not w.is_alive()


def test_a_waiting_writer_holds_back_new_readers():
    lock = RWLock()
    e1, r1 = threading.Event(), threading.Event()
    a = holder(lock, "read", e1, r1)
    assert e1.wait(WAIT)
    ew, rw = threading.Event(), threading.Event()
    w = holder(lock, "write", ew, rw)
    time.sleep(0.1)
    e3, r3 = threading.Event(), threading.Event()
    c = holder(lock, "read", e3, r3)
    time.sleep(0.1)
    assert not e3.is_set() and not ew.is_set()  # the new reader queues behind the waiting writer
    r1.set()
    assert ew.wait(WAIT)
    assert not e3.is_set()  # the writer runs alone
    rw.set()
    assert e3.wait(WAIT)  # then the queued reader
    r3.set()
    for t in (a, w, c):
        t.join(WAIT)
        assert not t.is_alive()


def test_the_lock_is_reusable_after_an_exception():
    lock = RWLock()
    for side in ("read", "write"):
        try:
            with getattr(lock, side)():
                raise KeyError("boom")
        except KeyError:
            pass
    done = threading.Event()
    holder(lock, "write", done, done)
    assert done.wait(WAIT)
