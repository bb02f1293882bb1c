"""Hits and merge_hits: the coarse-to-fine key of each hit against a brute-force key computed here, and the
merge of 1-5 shards (unequal sizes, some smaller than k, forced ties at every length) against one index."""

import numpy as np
import pytest
from reference import ref_distances

from ctfreid.errors import CtfreidError
from ctfreid.search.coarse_to_fine import ctf_rank
from ctfreid.search.index import CtFIndex
from ctfreid.search.merge import Hits, merge_hits

LENGTHS = (32, 64, 128)


def tied_codes(rng, n, pool=12):
    """Codes drawn from a small pool, so that many items tie at every length."""
    base = {L: rng.integers(0, 256, (pool, L // 8), dtype=np.uint8) for L in LENGTHS}
    pick = rng.integers(0, pool, n)
    codes = {L: base[L][pick].copy() for L in LENGTHS}
    for L in LENGTHS:  # a few single-bit flips so that not everything ties
        rows = rng.integers(0, n, n // 4)
        codes[L][rows, rng.integers(0, L // 8, rows.size)] ^= np.uint8(1) << rng.integers(0, 8, rows.size).astype(np.uint8)
    return codes


def brute_hits(q, g, ids, thresholds, k):
    """The CtF order key computed independently: distances by unpacking bits, stages by the thresholds,
    then Python's sort on (-stages, finest distance, ..., shortest distance, insertion order)."""
    d = {L: ref_distances(q[L], g[L]) for L in LENGTHS}
    out_ids, out_st, out_d = [], [], []
    for i in range(q[LENGTHS[0]].shape[0]):
        rows = []
        for j in range(len(ids)):
            st = 1
            for s, L in enumerate(LENGTHS[:-1]):
                if d[L][i, j] <= thresholds[L]:
                    st = s + 2
                else:
                    break
            dist = [int(d[L][i, j]) if s < st else -1 for s, L in enumerate(LENGTHS)]
            rows.append(((-st, *[-1 if x < 0 else x for x in dist[:st][::-1]], j), ids[j], st, dist))
        rows.sort(key=lambda r: (r[0][0], r[0][1:-1], r[0][-1]))
        rows = rows[:k]
        out_ids.append([r[1] for r in rows])
        out_st.append([r[2] for r in rows])
        out_d.append([r[3] for r in rows])
    return np.array(out_ids), np.array(out_st), np.array(out_d)


@pytest.mark.parametrize("thresholds", [{32: 9, 64: 20}, {32: 0, 64: 0}, {32: 32, 64: 64}, {32: 14, 64: 3}])
def test_hits_equal_a_brute_force_key(thresholds):
    rng = np.random.default_rng(3)
    g, q = tied_codes(rng, 90), tied_codes(rng, 5)
    ids = np.arange(90) * 7 + 2  # explicit ids that are not positions
    index = CtFIndex()
    index.add(g, ids=ids)
    hits = index.search_hits(q, 40, thresholds=thresholds)
    bi, bs, bd = brute_hits(q, g, ids, thresholds, 40)
    np.testing.assert_array_equal(hits.ids, bi)
    np.testing.assert_array_equal(hits.stages, bs)
    np.testing.assert_array_equal(hits.distances, bd)
    # candidates: items ranked at each stage = within every earlier threshold, counted by brute force
    d = {L: ref_distances(q[L], g[L]) for L in LENGTHS}
    alive = np.ones((5, 90), bool)
    want = [alive.sum(1)]
    for L in LENGTHS[:-1]:
        alive &= d[L] <= thresholds[L]
        want.append(alive.sum(1))
    np.testing.assert_array_equal(hits.candidates, np.stack(want, axis=1))
    D, I = index.search(q, 40, thresholds=thresholds)  # same order as search, D = finest distance
    np.testing.assert_array_equal(I, hits.ids)
    np.testing.assert_array_equal(D, hits.finest_distances)
    rD, rI = ctf_rank(q, g, thresholds)  # and as the functional full ranking
    np.testing.assert_array_equal(hits.ids, ids[rI[:, :40]])
    assert set(np.unique(hits.stage_bits)) <= set(LENGTHS)


@pytest.mark.parametrize("sizes", [(70,), (40, 30), (3, 50, 17), (25, 1, 30, 14), (10, 9, 8, 40, 3)])
@pytest.mark.parametrize("split", ["contiguous", "round_robin"])
def test_merge_of_shards_equals_one_index(sizes, split):
    rng = np.random.default_rng(len(sizes))
    n = sum(sizes)
    g, q = tied_codes(rng, n), tied_codes(rng, 6)
    ids = np.arange(n, dtype=np.int64) * 3 + 5  # global ids in insertion order
    if split == "contiguous":
        bounds = np.cumsum((0,) + sizes)
        parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        parts = [np.arange(s, n, len(sizes)) for s in range(len(sizes))]
    one = CtFIndex()
    one.add(g, ids=ids)
    shards = []
    for rows in parts:
        shard = CtFIndex()
        shard.add({L: c[rows] for L, c in g.items()}, ids=ids[rows])
        shards.append(shard)
    for thresholds in ({32: 9, 64: 20}, {32: 32, 64: 0}, {32: 12, 64: 64}):
        for k in (1, 7, 20, n + 5):
            want = one.search_hits(q, k, thresholds=thresholds)
            got = merge_hits([s.search_hits(q, k, thresholds=thresholds) for s in shards], k)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.stages, want.stages)
            np.testing.assert_array_equal(got.distances, want.distances)
            np.testing.assert_array_equal(got.candidates, want.candidates)  # counts add up over shards


def test_merge_errors():
    h = Hits(np.zeros((1, 1), np.int64), np.ones((1, 1), np.int8), np.zeros((1, 1, 2), np.int32), (32, 64))
    other = Hits(np.zeros((1, 1), np.int64), np.ones((1, 1), np.int8), np.zeros((1, 1, 1), np.int32), (32,))
    with pytest.raises(CtfreidError, match="share code lengths"):
        merge_hits([h, other], 3)
    with pytest.raises(CtfreidError, match="k must be a positive integer"):
        merge_hits([h], 0)
    with pytest.raises(CtfreidError, match="at least one"):
        merge_hits([], 3)
