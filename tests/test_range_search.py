"""``CtFIndex.range_search`` (faiss's lims, D, I) against brute force: NumPy distances at every length, the
items passing every threshold and the radius, ordered by the coarse-to-fine key (Sec. 3.1)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import correlated_code_sets

from ctfreid.errors import CtfreidError
from ctfreid.search.index import CtFIndex


def brute(q: dict, g: dict, ids: np.ndarray, thr: dict, radius: int):
    lengths = sorted(g)
    lims, D, I = [0], [], []
    for i in range(q[lengths[0]].shape[0]):
        d = {L: np.unpackbits(g[L] ^ q[L][i], axis=1).sum(1) for L in lengths}
        ok = d[lengths[-1]] <= radius
        for L in lengths[:-1]:
            ok &= d[L] <= thr[L]
        order = np.lexsort([np.arange(len(ids))] + [d[L] for L in lengths])  # last key sorts first
        order = order[ok[order]]
        D += d[lengths[-1]][order].tolist()
        I += ids[order].tolist()
        lims.append(len(D))
    return np.array(lims), np.array(D, np.int32), np.array(I, np.int64)


@pytest.mark.parametrize("lengths", [(32, 128, 512), (64,), (32, 128)])
def test_range_search_equals_brute_force_with_removals_and_custom_ids(lengths):
    rng = np.random.default_rng(3)
    q, g = correlated_code_sets(rng, 700, 9, lengths)
    ids = rng.permutation(10_000)[:700].astype(np.int64) * 3
    index = CtFIndex()
    index.add(g, ids)
    L = lengths[-1]
    thr = {lengths[s]: int(lengths[s] * 0.3) for s in range(len(lengths) - 1)}
    index.thresholds = thr
    for radius in (0, L // 4, int(L * 0.35), L):
        got = index.range_search(q, radius)
        want = brute(q, g, ids, thr, radius)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert got[1].dtype == np.int32 and got[2].dtype == np.int64 and got[0].dtype == np.int64
    gone = ids[rng.choice(700, 250, replace=False)]
    index.remove_ids(gone)
    keep = ~np.isin(ids, gone)
    looser = {k: v + 2 for k, v in thr.items()}  # per-call thresholds
    got = index.range_search({k: v[0] for k, v in q.items()}, int(L * 0.4), looser)  # one 1-D query
    want = brute({k: v[:1] for k, v in q.items()}, {k: v[keep] for k, v in g.items()}, ids[keep], looser, int(L * 0.4))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert got[0].shape == (2,) and got[0][1] > 0


def test_range_search_edge_cases():
    rng = np.random.default_rng(4)
    q, g = correlated_code_sets(rng, 50, 3, (32, 128))
    index = CtFIndex()
    index.add(g)
    index.thresholds = {32: 32}  # no pruning: the longest code's range search
    lims, D, I = index.range_search(q, 128)
    assert lims.tolist() == [0, 50, 100, 150] and (np.diff(D.reshape(3, 50), axis=1) >= 0).all()
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(CtfreidError, match="radius"):
            index.range_search(q, bad)
    index.remove_ids(np.arange(50))
    lims, D, I = index.range_search(q, 128)
    assert lims.tolist() == [0, 0, 0, 0] and D.size == 0 and I.size == 0
    with pytest.raises(CtfreidError, match="empty"):
        CtFIndex().range_search(q, 3)
