"""Batches of queries on several threads give exactly the answers of one thread, ties included."""

import numpy as np
import pytest
from test_merge import tied_codes

from ctfreid.errors import CtfreidError
from ctfreid.search import parallel
from ctfreid.search.index import CtFIndex


pytestmark = pytest.mark.usefixtures("every_batch_split")


@pytest.mark.parametrize("thresholds", [{32: 9, 64: 20}, {32: 32, 64: 0}])
def test_threads_give_the_one_thread_answers(thresholds):
    rng = np.random.default_rng(11)
    g, q = tied_codes(rng, 3000), tied_codes(rng, 37)
    index = CtFIndex()
    index.add(g)
    index.remove_ids(rng.choice(3000, 200, replace=False))
    one = index.search(q, 50, thresholds=thresholds, threads=1)
    h1 = index.search_hits(q, 50, thresholds=thresholds, threads=1)
    r1 = index.rank(q, thresholds=thresholds, threads=1)
    single = [index.search({L: c[i] for L, c in q.items()}, 50, thresholds=thresholds) for i in range(37)]
    np.testing.assert_array_equal(one[1], np.stack([s[1] for s in single]))
    for t in (2, 3, 8):
        for a, b in zip(index.search(q, 50, thresholds=thresholds, threads=t), one):
            np.testing.assert_array_equal(a, b)
        h = index.search_hits(q, 50, thresholds=thresholds, threads=t)
        np.testing.assert_array_equal(h.ids, h1.ids)
        np.testing.assert_array_equal(h.distances, h1.distances)
        np.testing.assert_array_equal(h.stages, h1.stages)
        for a, b in zip(index.rank(q, thresholds=thresholds, threads=t), r1):
            np.testing.assert_array_equal(a, b)


def test_default_number_of_threads():
    before = parallel.get_num_threads()
    try:
        parallel.set_num_threads(3)
        assert parallel.get_num_threads() == 3
        seen = []
        parallel.run_chunks(lambda a, b: seen.append((a, b)), 12, None)
        assert sorted(seen) == [(0, 4), (4, 8), (8, 12)]
        with pytest.raises(CtfreidError, match="positive integer"):
            parallel.set_num_threads(0)
    finally:
        parallel.set_num_threads(before)


def test_small_work_stays_on_one_thread(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_WORK_PER_THREAD", 1000)
    for work, expected in ((10, 1), (250, 2), (500, 4), (10_000, 4)):  # 8 queries x work / 1000, at most 4
        seen = []
        parallel.run_chunks(lambda a, b: seen.append((a, b)), 8, 4, work_per_query=work)
        assert len(seen) == expected, (work, seen)
        assert sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == 8
    seen = []
    parallel.run_chunks(lambda a, b: seen.append((a, b)), 8, 4)  # no work given: split by queries only
    assert len(seen) == 4
    # through the index: 8 queries on 100 items stay on the calling thread
    import threading

    names = set()
    real = parallel.run_chunks

    def spy(fn, nq, threads, work_per_query=0):
        return real(lambda a, b: (names.add(threading.current_thread().name), fn(a, b))[1], nq, threads, work_per_query)

    monkeypatch.setattr("ctfreid.search.index.run_chunks", spy)
    rng = np.random.default_rng(0)
    index = CtFIndex()
    index.add({32: rng.integers(0, 256, (100, 4), dtype=np.uint8), 64: rng.integers(0, 256, (100, 8), dtype=np.uint8)})
    q = {32: rng.integers(0, 256, (8, 4), dtype=np.uint8), 64: rng.integers(0, 256, (8, 8), dtype=np.uint8)}
    index.search(q, 5, thresholds={32: 16}, threads=4)
    assert names == {threading.current_thread().name}
    monkeypatch.setattr(parallel, "MIN_WORK_PER_THREAD", 1)
    index.search(q, 5, thresholds={32: 16}, threads=4)
    assert len(names) > 1


@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_bad_threads_are_refused_for_one_query_too(nq, threads):
    """One query skips the split over threads, not the check of ``threads``."""
    rng = np.random.default_rng(1)
    index = CtFIndex()
    index.add({32: rng.integers(0, 256, (50, 4), dtype=np.uint8), 64: rng.integers(0, 256, (50, 8), dtype=np.uint8)})
    q = {32: rng.integers(0, 256, (nq, 4), dtype=np.uint8), 64: rng.integers(0, 256, (nq, 8), dtype=np.uint8)}
    for call in (lambda: index.search(q, 5, thresholds={32: 16}, threads=threads),
                 lambda: index.search_hits(q, 5, thresholds={32: 16}, threads=threads),
                 lambda: index.rank(q, thresholds={32: 16}, threads=threads)):
        with pytest.raises(CtfreidError, match="threads must be a positive integer"):
            call()


def test_numpy_integer_threads_are_integers():
    rng = np.random.default_rng(2)
    index = CtFIndex()
    index.add({32: rng.integers(0, 256, (50, 4), dtype=np.uint8)})
    q = {32: rng.integers(0, 256, (6, 4), dtype=np.uint8)}
    one = index.search(q, 5, threads=1)
    for t in (np.int64(2), np.int32(3), np.uint8(1)):
        for a, b in zip(index.search(q, 5, threads=t), one):
            np.testing.assert_array_equal(a, b)
    before = parallel.get_num_threads()
    try:
        parallel.set_num_threads(np.int64(2))
        assert parallel.get_num_threads() == 2 and type(parallel.get_num_threads()) is int
    finally:
        parallel.set_num_threads(before)
    with pytest.raises(CtfreidError, match="positive integer"):
        index.search(q, 5, threads=np.bool_(True))
