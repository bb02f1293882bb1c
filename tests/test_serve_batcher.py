"""Concurrent searches searched together (``ctfreid.serve.batcher``), on a real gallery: which requests share a
call (one lane, its search held open while others arrive, so the batching is deterministic), two searches at
once, and each request's answer against the same search made alone (the oracle: ``Gallery.search`` of that request
by itself)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ctfreid.serve.batcher import SearchBatcher
from ctfreid.serve.gallery import Filter, Gallery
from ctfreid.serve.store import ItemMeta, Store

LENGTHS = [32, 64]
THR = {32: 14}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    rng = np.random.default_rng(3)
    store = Store(tmp_path_factory.mktemp("s") / "s", "test", LENGTHS)
    n = 400
    base = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    base[200:] = base[:200] ^ (rng.random((200, 8)) < 0.05) * rng.integers(1, 256, (200, 8), dtype=np.uint8)  # ties, near
    store.add({32: base[:, :4].copy(), 64: base}, [ItemMeta(camera=i % 3) for i in range(n)])
    g = Gallery(store, THR)
    yield g, base
    store.close()


class Gated:
    """The gallery's search, recording each call's query count, k, filter and threads; the first ``held`` calls
    wait for ``open``."""

    def __init__(self, gallery: Gallery, fail_on: int | None = None, held: int = 1) -> None:
        self.gallery, self.calls, self.fail_on, self.held = gallery, [], fail_on, held
        self.entered, self.open = threading.Semaphore(0), threading.Event()
        self.threads: list = []
        self._lock = threading.Lock()

    def __call__(self, codes, k, thresholds=None, flt=None, query_weights=None, threads=None):
        nq = next(iter(codes.values())).shape[0]
        with self._lock:
            self.calls.append((nq, k, flt))
            self.threads.append(threads)
            held = len(self.calls) <= self.held
        if held:
            self.entered.release()
            assert self.open.wait(30)
        if self.fail_on is not None and k == self.fail_on:
            raise ValueError("this search fails")
        return self.gallery.search(codes, k, thresholds, flt, query_weights=query_weights, threads=threads)


def requests_of(base, rng, specs):
    """(codes, k, thresholds, filter, weights) of each spec (rows of the gallery, k, filter, weighted?)."""
    out = []
    for rows, k, flt, weighted in specs:
        codes = {32: base[rows, :4].copy(), 64: base[rows].copy()}
        w = rng.integers(0, 16, (len(rows), 32), dtype=np.uint8) if weighted else None
        out.append((codes, k, {32: 200} if weighted else THR, flt, w))
    return out


def run_held(batcher: SearchBatcher, gate: Gated, requests: list) -> list:
    """The first ``gate.held`` requests' searches are held open until the others wait in the queue: they go out
    after them."""
    answers: list = [None] * len(requests)

    def one(i):
        codes, k, thr, flt, w = requests[i]
        try:
            answers[i] = batcher.search(codes, k, thr, flt, w)
        except Exception as e:  # noqa: BLE001 - the test compares errors too
            answers[i] = e

    threads = []
    for i in range(gate.held):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        assert gate.entered.acquire(timeout=30)
    for i in range(gate.held, len(requests)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while len(batcher._pending) < len(requests) - gate.held:  # every later request queued behind the held ones
        assert time.monotonic() < deadline
        time.sleep(0.001)
    gate.open.set()
    for t in threads:
        t.join(30)
    return answers


def alone(g: Gallery, req):
    codes, k, thr, flt, w = req
    return g.search(codes, k, thr, flt, query_weights=w)


def test_searches_that_arrive_during_one_go_out_together_with_their_own_answers(gallery):
    g, base = gallery
    rng = np.random.default_rng(0)
    specs = [([0], 5, None, False), ([1, 2], 3, None, False), ([201], 12, None, False), ([3], 1, None, False),
             ([4, 204, 5], 7, None, False)]
    reqs = requests_of(base, rng, specs)
    gate = Gated(g)
    b = SearchBatcher(gate, max_queries=64, lanes=1)
    answers = run_held(b, gate, reqs)
    # the held one alone, then the four waiting ones (7 queries) in one call at the largest k
    assert gate.calls == [(1, 5, None), (7, 12, None)]
    assert (b.batches, b.queries) == (2, 8)
    for req, got in zip(reqs, answers):
        hits, counts, partial = alone(g, req)
        assert got.hits == hits and got.candidates == counts and got.partial == partial == ()
        assert [len(h) for h in got.hits] == [req[1]] * len(hits)
    assert answers[1].queries == 7 and answers[0].queries == 1


def test_only_searches_with_the_same_thresholds_filter_and_weights_share_a_call(gallery):
    g, base = gallery
    rng = np.random.default_rng(1)
    specs = [([0], 5, None, False),
             ([1], 4, Filter(camera=1), False), ([2], 6, None, True), ([3], 3, Filter(camera=1), False),
             ([4], 2, Filter(camera=2), False), ([5, 6], 8, None, True), ([7], 9, None, False)]
    reqs = requests_of(base, rng, specs)
    gate = Gated(g)
    answers = run_held(SearchBatcher(gate, lanes=1), gate, reqs)
    assert sorted(gate.calls[1:], key=str) == sorted(
        [(2, 4, Filter(camera=1)), (3, 8, None), (1, 2, Filter(camera=2)), (1, 9, None)], key=str)
    for req, got in zip(reqs, answers):
        assert (got.hits, got.candidates) == alone(g, req)[:2]


def test_a_batch_holds_at_most_max_queries_and_a_larger_request_goes_alone(gallery):
    g, base = gallery
    rng = np.random.default_rng(2)
    specs = [([0], 5, None, False), ([1, 2], 5, None, False), ([3, 4], 5, None, False), ([5, 6], 5, None, False),
             (list(range(10, 16)), 5, None, False), ([7], 5, None, False)]
    reqs = requests_of(base, rng, specs)
    gate = Gated(g)
    answers = run_held(SearchBatcher(gate, max_queries=5, lanes=1), gate, reqs)
    assert [c[0] for c in gate.calls] == [1, 4, 2, 6, 1]  # FIFO: 2 + 2, then 2 (6 would not fit), 6 alone, 1
    for req, got in zip(reqs, answers):
        assert (got.hits, got.candidates) == alone(g, req)[:2]
    gate = Gated(g)
    run_held(SearchBatcher(gate, max_queries=1, lanes=1), gate, reqs[:1] + reqs[5:] + reqs[:1])
    assert [c[0] for c in gate.calls] == [1, 1, 1]
    with pytest.raises(ValueError, match="max_queries"):
        SearchBatcher(gate, max_queries=0)


def test_a_failing_call_fails_its_own_requests_only_and_the_next_batches_still_run(gallery):
    g, base = gallery
    rng = np.random.default_rng(3)
    specs = [([0], 5, None, False), ([1], 99, Filter(camera=0), False), ([2], 4, None, False),
             ([3], 99, Filter(camera=0), False)]
    reqs = requests_of(base, rng, specs)
    gate = Gated(g, fail_on=99)
    b = SearchBatcher(gate, lanes=1)
    answers = run_held(b, gate, reqs)
    assert isinstance(answers[1], ValueError) and answers[3] is answers[1]
    for i in (0, 2):
        assert (answers[i].hits, answers[i].candidates) == alone(g, reqs[i])[:2]
    got = b.search(*reqs[2][:4])  # the lane was freed: a later search runs at once, on the calling thread
    assert got.hits == alone(g, reqs[2])[0] and b._busy == 0 and not b._pending


def test_two_lanes_search_at_once_and_a_lane_alone_uses_every_core(gallery):
    g, base = gallery
    rng = np.random.default_rng(4)
    specs = [([0], 5, None, False), ([1], 4, None, False), ([2], 6, None, False), ([3], 3, None, False),
             ([4, 5], 2, None, False)]
    reqs = requests_of(base, rng, specs)
    gate = Gated(g, held=2)  # both lanes' first searches are in the gallery at the same time
    answers = run_held(SearchBatcher(gate, lanes=2), gate, reqs)
    assert gate.calls[:2] == [(1, 5, None), (1, 4, None)] and gate.calls[2] == (4, 6, None) and len(gate.calls) == 3
    assert gate.threads[:2] == [None, 1]  # the first searched alone (every core), the second beside it (one)
    for req, got in zip(reqs, answers):
        assert (got.hits, got.candidates) == alone(g, req)[:2]
    with pytest.raises(ValueError, match="lanes"):
        SearchBatcher(gate, lanes=0)


def test_many_threads_at_once_all_get_their_answers_and_every_lane_is_given_back(gallery):
    g, base = gallery
    rng = np.random.default_rng(5)
    specs = [([i % 400], 1 + i % 9, (None, Filter(camera=1))[i % 2], i % 5 == 0) for i in range(240)]
    reqs = requests_of(base, rng, specs)
    want = [alone(g, r)[:2] for r in reqs]
    b = SearchBatcher(g.search, max_queries=8, lanes=2)
    wrong = []

    def client(t):
        for i in range(t, 240, 8):
            got = b.search(*reqs[i][:4], reqs[i][4])
            if (got.hits, got.candidates) != want[i]:
                wrong.append(i)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not wrong
    assert b.queries == 240 and b.batches <= 240 and b._busy == 0 and not b._pending
