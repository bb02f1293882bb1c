"""Concurrent searches of ``ctfreid serve``, searched together as batches.

At most ``lanes`` searches run at once, one per core by default. A search that finds a lane free runs at once, on
its own thread, alone. Searches that arrive while every lane is busy wait in a queue; the next lane to finish hands
itself to the first of them, which takes the whole queue as one batch: natural batching, with no timer, so a
request waits for nothing while a lane is free. Milvus merges queued search tasks the same way. Each batch is one
multi-query ``Gallery.search``, so the index's tile scan reads the gallery once for all its queries
(``CtFIndex.search``, issue 15). A lane searches on one thread while others are busy, and on every core when it is
the only one. Capping the searches at the cores also keeps dozens of request threads from searching at once.

Only searches that agree on thresholds, filter and the form of their query weights go into one call; the batch's
k is the largest asked. Each request still gets exactly its own answer: a top-k is the first k of the top-K for
K > k (the ranking is a total order, ties by insertion), and the per-stage counts do not depend on k.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ctfreid.search.parallel import get_num_threads


@dataclass
class BatchAnswer:
    """One request's part of a batch: its hits and per-stage counts (one entry per query), the shards that did
    not answer, and the batch's search time and number of queries (the time a query is their ratio)."""

    hits: list
    candidates: list
    partial: tuple
    seconds: float
    queries: int


@dataclass(eq=False)
class _Job:
    codes: dict[int, np.ndarray]
    k: int
    thresholds: Mapping[int, int] | None
    flt: object
    weights: np.ndarray | Mapping[int, np.ndarray] | None
    nq: int
    key: tuple
    wake: threading.Event = field(default_factory=threading.Event)
    answer: BatchAnswer | None = None
    error: BaseException | None = None
    handed: bool = False  # a lane was handed to this job, and it has not led with it yet


def _key(thresholds, flt, weights) -> tuple:
    """What searches must share to go into one call."""
    thr = None if thresholds is None else tuple(sorted((int(L), int(t)) for L, t in thresholds.items()))
    form = None if weights is None else tuple(sorted(weights)) if isinstance(weights, Mapping) else "first"
    return thr, flt, form


def _stack(parts: list):
    """Query weights of several jobs as one: arrays (stage 1) stacked, or mappings stacked per length."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], Mapping):
        return {L: np.concatenate([np.atleast_2d(p[L]) for p in parts]) for L in parts[0]}
    return np.concatenate([np.atleast_2d(p) for p in parts])


class SearchBatcher:
    """Searches through ``search(codes, k, thresholds, flt, query_weights=, threads=) -> (hits, counts, partial)``
    (``Gallery.search``), at most ``lanes`` at once (default: ``ctfreid.search.parallel.get_num_threads()``),
    queued ones together, up to ``max_queries`` queries a batch (1: each alone). ``batches`` and ``queries``
    count the calls made and the queries they searched."""

    def __init__(self, search: Callable, max_queries: int = 64, lanes: int | None = None) -> None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be at least 1, got {max_queries}")
        lanes = get_num_threads() if lanes is None else lanes
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self._search = search
        self.max_queries = max_queries
        self.lanes = lanes
        self._lock = threading.Lock()
        self._pending: collections.deque[_Job] = collections.deque()
        self._busy = 0  # lanes in use: searching, or handed to a queued job that has not taken them yet
        self.batches = 0
        self.queries = 0

    def search(self, codes: dict[int, np.ndarray], k: int, thresholds: Mapping[int, int] | None = None,
               flt=None, query_weights=None) -> BatchAnswer:
        """The answer of ``search(codes, k, thresholds, flt, query_weights)`` for this request alone."""
        nq = next(iter(codes.values())).shape[0]
        job = _Job(codes, k, thresholds, flt, query_weights, nq, _key(thresholds, flt, query_weights))
        with self._lock:
            self._pending.append(job)
            lead = self._busy < self.lanes
            self._busy += lead
        while True:
            if lead:
                self._lead()
            with self._lock:
                lead, job.handed = job.handed, False  # a lane handed to this job: lead with it, answered or not
                if not lead:
                    if job.answer is not None or job.error is not None:
                        break
                    job.wake.clear()  # set again by an answer or a lane handed over
            if not lead:
                job.wake.wait()
        if job.error is not None:
            raise job.error
        return job.answer

    def _lead(self) -> None:
        """With a lane: search the queue (at most ``max_queries`` queries, the first job whatever its size; it may
        be empty when another lane took it), answer those jobs, then hand the lane to the first queued job that
        has none, or free it."""
        with self._lock:
            take, n = [], 0
            while self._pending and (not take or n + self._pending[0].nq <= self.max_queries):
                job = self._pending.popleft()
                take.append(job)
                n += job.nq
            alone = self._busy == 1 and not self._pending  # every core for this batch, else one
        try:
            groups: dict[tuple, list[_Job]] = {}
            for job in take:
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._answer(jobs, None if alone else 1)
        finally:
            for job in take:
                if job.answer is None and job.error is None:
                    job.error = RuntimeError("the search batch stopped before answering")
                job.wake.set()
            with self._lock:
                nxt = next((j for j in self._pending if not j.handed), None)
                if nxt is None:
                    self._busy -= 1
                else:
                    nxt.handed = True
                    nxt.wake.set()

    def _answer(self, jobs: list[_Job], threads: int | None) -> None:
        first = jobs[0]
        codes = first.codes if len(jobs) == 1 else {
            L: np.concatenate([j.codes[L] for j in jobs]) for L in first.codes}
        weights = first.weights if len(jobs) == 1 else _stack([j.weights for j in jobs])
        t0 = time.perf_counter()
        try:
            hits, counts, partial = self._search(codes, max(j.k for j in jobs), first.thresholds, first.flt,
                                                 query_weights=weights, threads=threads)
        except Exception as e:  # noqa: BLE001 - every request of the call gets the error its own search would
            for j in jobs:
                j.error = e
            return
        seconds = time.perf_counter() - t0
        nq = sum(j.nq for j in jobs)
        with self._lock:
            self.batches += 1
            self.queries += nq
        a = 0
        for j in jobs:
            rows = slice(a, a + j.nq)
            j.answer = BatchAnswer([h[:j.k] for h in hits[rows]], counts[rows], partial, seconds, nq)
            a += j.nq
