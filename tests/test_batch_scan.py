"""The cache-blocked batch scan (``_kernels.ctf_topk_batch``) gives exactly the one-query answers and those of a
brute-force oracle: ties, removed items, k beyond the candidates, per-call thresholds, every ``Hits`` field."""

import threading

import numpy as np
import pytest

from ctfreid.search import _kernels
from ctfreid.search.index import CtFIndex


pytestmark = pytest.mark.usefixtures("every_batch_split")

NQ = 70  # queries: batches of 1 .. 70 are their prefixes


def codes(rng: np.random.Generator, n: int, lengths: tuple[int, ...], pool: int) -> dict[int, np.ndarray]:
    """Random codes, half of them drawn from a small pool (many exact ties at every length)."""
    out = {L: rng.integers(0, 256, (n, L // 8), dtype=np.uint8) for L in lengths}
    tied = rng.random(n) < 0.5
    pick = rng.integers(0, pool, n)
    for L in lengths:
        base = rng.integers(0, 256, (pool, L // 8), dtype=np.uint8)
        out[L][tied] = base[pick[tied]]
    return out


def oracle(q: dict, g: dict, live: np.ndarray, thresholds: dict, k: int) -> tuple:
    """(ids, stages, distances, candidates) by unpacking bits: the stages from the thresholds, then the
    documented key (more stages first, finest distance, ..., shortest distance, insertion order)."""
    lengths = sorted(g)
    S = len(lengths)
    d = []
    for L in lengths:  # Hamming distance = mismatching bits, counted from the unpacked bits
        qb = np.unpackbits(q[L], axis=1).astype(np.int64)
        gb = np.unpackbits(g[L], axis=1).astype(np.int64)
        d.append(qb @ (1 - gb).T + (1 - qb) @ gb.T)
    d = np.stack(d, axis=2)  # [nq, n, S]
    nq, n = d.shape[:2]
    stages = np.ones((nq, n), np.int64)
    reach = np.ones((nq, n), bool)
    for s, L in enumerate(lengths[:-1]):
        reach &= d[:, :, s] <= thresholds[L]
        stages += reach
    keyd = np.where(np.arange(S) < stages[..., None], d, -1)
    m = min(k, int(live.sum()))
    ids = np.full((nq, k), -1, np.int64)
    st = np.zeros((nq, k), np.int8)
    dist = np.full((nq, k, S), -1, np.int32)
    cand = np.stack([(stages[:, live] >= s + 1).sum(axis=1) for s in range(S)], axis=1)
    pos = np.flatnonzero(live)
    for i in range(nq):
        order = np.lexsort([pos] + [keyd[i, pos, s] for s in range(S)] + [-stages[i, pos]])[:m]
        ids[i, :m] = pos[order]
        st[i, :m] = stages[i, pos[order]]
        dist[i, :m] = keyd[i, pos[order]]
    return ids, st, dist, cand


def one_query(index: CtFIndex, q: dict, k: int, thresholds: dict) -> tuple:
    """One query at a time on one thread."""
    hits = [index.search_hits({L: c[i : i + 1] for L, c in q.items()}, k, thresholds, threads=1) for i in range(NQ)]
    found = [index.search({L: c[i] for L, c in q.items()}, k, thresholds, threads=1) for i in range(NQ)]
    return (np.concatenate([h.ids for h in hits]), np.concatenate([h.stages for h in hits]),
            np.concatenate([h.distances for h in hits]), np.concatenate([h.candidates for h in hits]),
            np.stack([f[0] for f in found]))


CASES = [  # n, lengths, thresholds, k
    (1, (32, 128, 512), {32: 16, 128: 64}, 5),
    (63, (32, 64, 96, 128), {32: 14, 64: 30, 96: 46}, 10),
    (4095, (32, 128, 512), {32: 10, 128: 56}, 20),
    (4097, (32, 64, 96, 128), {32: 12, 64: 28, 96: 46}, 30),
    (8269, (32, 128), {32: 11}, 40),  # two stages: every stage-1 candidate is kept
    (9001, (32, 64, 96, 128), {32: 13, 64: 30, 96: 44}, 300),  # k beyond the later stages' candidates
    (10000, (32, 128, 512), {32: 32, 128: 128}, 50),  # everything passes: buffers overflow
    (5000, (32, 64, 96, 128), {32: 0, 64: 0, 96: 0}, 7000),  # k > n, (almost) no candidates
]


@pytest.mark.parametrize("filter_min_n", [0, 1 << 40])  # stage 2 keeps only thr[1]'s candidates / all
@pytest.mark.parametrize("n, lengths, thresholds, k", CASES)
def test_batches_equal_one_query_and_oracle(monkeypatch, filter_min_n, n, lengths, thresholds, k):
    monkeypatch.setattr(_kernels, "BATCH_FILTER_MIN_N", filter_min_n)
    monkeypatch.setattr(_kernels, "BATCH_MIN_QUERIES", 1)  # the batch scan for every batch size
    rng = np.random.default_rng(n)
    g, q = codes(rng, n, lengths, 9), codes(rng, NQ, lengths, 9)
    q = {L: np.concatenate([g[L][rng.integers(0, n, NQ // 2)], c[: NQ - NQ // 2]]) for L, c in q.items()}
    index = CtFIndex()
    index.add(g)
    index.thresholds = {L: 0 for L in lengths[:-1]}  # overridden per call
    removed = rng.choice(n, n // 7, replace=False)
    index.remove_ids(removed)
    live = np.ones(n, bool)
    live[removed] = False
    want = oracle(q, g, live, thresholds, k)
    with monkeypatch.context() as m:
        m.setattr(_kernels, "BATCH_MIN_QUERIES", 1 << 40)  # ctf_topk, one query at a time
        one = one_query(index, q, k, thresholds)
    m = min(k, int(live.sum()))
    for got, ref in zip(one[:3], want[:3]):
        np.testing.assert_array_equal(got, ref[:, :m])
    np.testing.assert_array_equal(one[3], want[3])
    for b in (1, 2, 3, 9, 64, NQ):  # 2 threads: chunks of 1 .. 35 queries
        qb = {L: c[:b] for L, c in q.items()}
        for t in (1, 2):
            h = index.search_hits(qb, k, threads=t, thresholds=thresholds)
            D, ids = index.search(qb, k, threads=t, thresholds=thresholds)
            np.testing.assert_array_equal(h.ids, one[0][:b])
            np.testing.assert_array_equal(h.stages, one[1][:b])
            np.testing.assert_array_equal(h.distances, one[2][:b])
            np.testing.assert_array_equal(h.candidates, one[3][:b])
            np.testing.assert_array_equal(ids, one[0][:b])
            np.testing.assert_array_equal(D, one[4][:b])


def test_kernel_groups_and_hi2():
    """Groups smaller than the batch and any stage-2 bound >= thr[1] give the one-query answers."""
    rng = np.random.default_rng(5)
    lengths = (32, 128, 512, 2048)
    n, k = 6000, 25
    g, q = codes(rng, n, lengths, 5), codes(rng, 33, lengths, 5)
    index = CtFIndex()
    index.add(g)
    index.thresholds = {32: 12, 128: 58, 512: 240}
    index.remove_ids(rng.choice(n, 500, replace=False))
    qs = tuple(q[L] for L in lengths)
    G1, Gr, Ls, qoff = index._stage_views()[:4]
    thr = index._thresholds(None)
    args = (_kernels.words32(qs[0]), _kernels.words32(G1), 32, _kernels.later_queries(qs, qoff), qoff, Gr, Ls, 4, thr,
            k, index._live, *_kernels.ctf_workspace(n, k, 4))
    want = [np.empty((33, k), np.int32), np.empty((33, k), np.int64), np.zeros((33, 4), np.int64)]
    _kernels.ctf_topk(*args, *want)
    for G, hi2 in ((1, thr[1]), (4, thr[1] + 3), (33, 128), (50, thr[1])):
        got = [np.empty((33, k), np.int32), np.empty((33, k), np.int64), np.zeros((33, 4), np.int64)]
        _kernels.ctf_topk_batch(*args, int(hi2), *_kernels.batch_buffers(G, _kernels.batch_shape(n, 33, 4)[1], 4), *got)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_batch_buffers_grow_to_what_the_queries_keep(monkeypatch):
    """Queries that keep more candidates than a batch's buffers hold (first guess: n / 64 a query) are
    searched on their own, with the same answers; the next batches get buffers that hold them, on this
    thread and on a thread that has not searched yet."""
    monkeypatch.setattr(_kernels, "BATCH_FILTER_MIN_N", 0)  # stage 2 keeps only thr[1]'s candidates
    monkeypatch.setattr(_kernels, "BATCH_MIN_QUERIES", 1)
    rng = np.random.default_rng(8)
    n, k, lengths = 5000, 20, (32, 128, 512)
    thresholds = {32: 12, 128: 56}
    g, q = codes(rng, n, lengths, 7), codes(rng, NQ, lengths, 7)
    index = CtFIndex()
    index.add(g)
    live = np.ones(n, bool)
    want = oracle(q, g, live, thresholds, k)
    kept = int(want[3][:, 2].max())  # candidates ranked at stage 3: those within both thresholds
    assert n // 64 < kept and kept + kept // 4 <= n // 8  # more than the first guess, less than the most
    for _ in range(2):  # the first batch overflows its buffers, the second fits
        h = index.search_hits(q, k, thresholds, threads=1)
        np.testing.assert_array_equal(h.ids, want[0])
        np.testing.assert_array_equal(h.distances, want[2])
        np.testing.assert_array_equal(h.candidates, want[3])
        assert index._batch_room(n) == kept + kept // 4
    assert _kernels.batch_shape(n, NQ, 3, room=index._batch_room(n))[1] >= kept
    other: list = []  # a new thread's first batch: buffers sized by the batches seen, and the same answers
    t = threading.Thread(target=lambda: other.extend([index._batch_room(n),
                                                      index.search_hits(q, k, thresholds, threads=1)]))
    t.start()
    t.join(60)
    assert other[0] == kept + kept // 4  # a thread of its own had n / 64 and searched its queries one by one
    np.testing.assert_array_equal(other[1].ids, want[0])


@pytest.mark.parametrize("byte_planes", [False, True])
def test_tile_scan_takes_fewer_queries_on_large_galleries_and_weighted_byte_planes(monkeypatch, byte_planes):
    # the rule of _kernels.tile_scan, worked by hand with the default 16 queries: a quarter from BATCH_LARGE_N
    # codes on; a weighted stage 1 that the byte-plane masks take (threshold < 255): from 2^17 queries x codes
    # and 5,000 codes on
    monkeypatch.setattr(_kernels, "BYTE_PLANES", byte_planes)
    monkeypatch.setattr(_kernels, "BATCH_MIN_QUERIES", 16)
    big, small = _kernels.BATCH_LARGE_N, _kernels.BATCH_LARGE_N - 1
    wmin, work, bmin = _kernels.WEIGHTED_TILE_MIN_N, _kernels.BYTE_PLANES_TILE_WORK, _kernels.BYTE_PLANES_TILE_MIN_N
    assert (big, wmin, work, bmin) == (1 << 21, 1 << 16, 1 << 17, 5000)
    bp = byte_planes
    cases = [  # (nq, L1, n, weighted, t1) -> whether the tile scan runs
        ((16, 32, 1000, False, 9), True), ((15, 32, 1000, False, 9), False), ((15, 32, small, False, 9), False),
        ((4, 32, big, False, 9), True), ((3, 32, big, False, 9), False), ((64, 64, big, False, 9), False),
        ((64, 32, wmin - 1, True, 255), False), ((16, 32, wmin, True, 255), True), ((15, 32, wmin, True, 255), False),
        ((4, 32, big, True, 255), True), ((3, 32, big, True, 400), False),
        # byte planes: nq * n >= 2^17 (1 query from 131,072 codes; 14 at 10,000 codes), and n >= 5,000
        ((1, 32, 1 << 17, True, 254), bp), ((1, 32, (1 << 17) - 1, True, 0), False), ((2, 32, 1 << 16, True, 9), bp),
        ((14, 32, 10_000, True, 9), bp), ((13, 32, 10_000, True, 9), False), ((64, 32, 4999, True, 9), False),
        ((27, 32, 5000, True, 9), bp), ((26, 32, 5000, True, 9), False), ((600, 32, 2276, True, 9), False),
        ((1, 32, big, True, 9), bp), ((1, 32, big, False, 9), False), ((16, 32, 10_000, True, 255), False),
    ]
    for args, want in cases:
        assert _kernels.tile_scan(*args) == want, args
    # BATCH_MIN_QUERIES scales every case: a large value forces ctf_topk everywhere
    monkeypatch.setattr(_kernels, "BATCH_MIN_QUERIES", 1 << 40)
    assert not any(_kernels.tile_scan(*args) for args, _ in cases)
