"""Threads for batches of queries: the kernels release the GIL, so a batch split into contiguous chunks of
queries runs on several cores with answers identical to one thread (each query is searched on its own).

``set_num_threads(n)`` sets the default (like ``faiss.omp_set_num_threads``; initially every core this
process may use); a call's ``threads=`` overrides it.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ctfreid.errors import CtfreidError

MIN_QUERIES_PER_THREAD = 2  # below this a thread costs more than it saves
# query x gallery-item pairs a thread needs before it pays for handing it a chunk: below it one thread is
# faster (bench_batch.py, 2 threads against 1, batch of 8: 44 vs 34 us per query at 1e5 items, 23 vs 7 at
# 1e4; from 5e6 pairs on, 2 threads win: 1e4 x 512, 1e5 x 64, 1e6 x 8)
MIN_WORK_PER_THREAD = 2_000_000

_default: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: object, name: str = "threads") -> int:
    if type(threads) is int and threads >= 1:  # the common case, without the ABC check below (~1 us)
        return threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:  # numpy ints too
        raise CtfreidError(f"{name} must be a positive integer, got {threads!r}")
    return int(threads)


def set_num_threads(n: int) -> None:
    """Default number of threads for searches of several queries (``threads=`` of a call overrides it)."""
    global _default
    _default = check_threads(n, "n")


def get_num_threads() -> int:
    """The default number of search threads: ``set_num_threads``, else every core this process may use."""
    return _default if _default is not None else _cores()


def run_chunks(fn: Callable[[int, int], object], nq: int, threads: int | None, work_per_query: int = 0) -> list:
    """``[fn(start, stop) for each chunk]`` over ``nq`` queries in at most ``threads`` contiguous chunks,
    in order; the first chunk runs in the calling thread, the others in a shared pool. With
    ``work_per_query`` (e.g. the gallery size), each chunk gets at least ``MIN_WORK_PER_THREAD`` of it."""
    t = check_threads(threads) if threads is not None else None
    if nq < 2 * MIN_QUERIES_PER_THREAD:  # one thread whatever the setting (and no affinity query: ~1 us)
        return [fn(0, nq)]
    t = max(1, min(get_num_threads() if t is None else t, nq // MIN_QUERIES_PER_THREAD))
    if work_per_query > 0 and MIN_WORK_PER_THREAD > 0:
        t = max(1, min(t, nq * work_per_query // MIN_WORK_PER_THREAD))
    if t == 1:
        return [fn(0, nq)]
    bounds = [nq * i // t for i in range(t + 1)]
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < t - 1:
            _pool_size = max(t - 1, _cores())
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="ctfreid-search")
        pool = _pool
    futures = [pool.submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    first = fn(bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]
