"""Hamming distances, stable counting sort, full ranking and top-k (Sec. 3.1) vs brute force."""

import numpy as np
import pytest
from reference import INT32_MAX, ref_distances, ref_rank, ref_topk

from ctfreid.search.hamming import (
    counting_sort,
    hamming_distances,
    hamming_rank,
    hamming_topk,
)


def _codes(rng, n, length, distinct=None):
    """Random codes; with ``distinct`` only that many different codes (many exact ties)."""
    if distinct is None:
        return rng.integers(0, 256, (n, length // 8), dtype=np.uint8)
    pool = rng.integers(0, 256, (distinct, length // 8), dtype=np.uint8)
    return pool[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("length", [32, 64, 96, 128, 256, 512, 4096])
def test_distances_rank_topk_match_reference(length):
    rng = np.random.default_rng(length)
    gallery = _codes(rng, 301, length)  # > 256 codes: several gallery tiles at 4096 bits
    queries = np.concatenate([_codes(rng, 3, length), gallery[:2]])
    np.testing.assert_array_equal(hamming_distances(queries, gallery), ref_distances(queries, gallery))
    D, I = hamming_rank(queries, gallery)
    rD, rI = ref_rank(queries, gallery)
    assert D.dtype == np.int32 and I.dtype == np.int64
    np.testing.assert_array_equal(I, rI)
    np.testing.assert_array_equal(D, rD)
    for k in (1, 17, 64, 301, 350):
        D, I = hamming_topk(queries, gallery, k)
        rD, rI = ref_topk(queries, gallery, k)
        np.testing.assert_array_equal(I, rI)
        np.testing.assert_array_equal(D, rD)


@pytest.mark.parametrize("n", [5003, 2048, 2047])  # four items at a time, and 1-3 left over
def test_rank_with_heavy_ties_is_stable(n):
    rng = np.random.default_rng(n)
    gallery = _codes(rng, n, 32, distinct=40)
    queries = np.concatenate([gallery[:1], _codes(rng, 2, 32)])
    D, I = hamming_rank(queries, gallery)
    rD, rI = ref_rank(queries, gallery)
    np.testing.assert_array_equal(I, rI)
    np.testing.assert_array_equal(D, rD)


def test_single_query_1d():
    rng = np.random.default_rng(0)
    gallery = _codes(rng, 50, 128)
    q = gallery[7]
    d = hamming_distances(q, gallery)
    assert d.shape == (50,) and d[7] == 0
    D, I = hamming_rank(q, gallery)
    assert D.shape == I.shape == (50,) and I[0] == 7
    D, I = hamming_topk(q, gallery, 5)
    np.testing.assert_array_equal(I, ref_topk(q[None], gallery, 5)[1][0])


def test_counting_sort_stable_with_many_ties():
    rng = np.random.default_rng(3)
    # sizes around _kernels.SORT_SCRATCH_MIN / MAX (scattered through a scratch row or straight into the output),
    # 1-3 items beyond the groups of four; few values (ties within each group of four) and many
    for n in (1, 10, 511, 512, 2047, 2048, 3072, 3073, 5003):
        for hi in (4, 33):
            d = rng.integers(0, hi, n)
            np.testing.assert_array_equal(counting_sort(d, 32), np.argsort(d, kind="stable"))
    d2 = rng.integers(0, 129, (3, 4099))
    out = counting_sort(d2, 128)
    assert out.dtype == np.int64 and out.shape == d2.shape
    np.testing.assert_array_equal(out, np.argsort(d2, axis=1, kind="stable"))
    np.testing.assert_array_equal(counting_sort(np.array([2, 0, 2, 1, 0]), 32), [1, 4, 3, 0, 2])
    for shape in ((3, 0), (0, 0), (0,)):  # rows of an empty gallery, as hamming_rank gives
        out = counting_sort(np.zeros(shape, np.int32), 32)
        assert out.shape == shape and out.dtype == np.int64


def test_counting_sort_errors():
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        counting_sort(np.array([0, 33]), 32)
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        counting_sort(np.array([-1, 3]), 32)
    with pytest.raises(ValueError, match="integer"):
        counting_sort(np.array([0.5, 1.0]), 32)
    with pytest.raises(ValueError, match="length"):
        counting_sort(np.array([0, 1]), 33)


def test_topk_ties_prefer_lower_gallery_index():
    rng = np.random.default_rng(5)
    gallery = _codes(rng, 900, 64, distinct=6)  # six distinct codes: huge tie groups
    q = gallery[:2]
    for k in (1, 100, 150, 899, 900, 1000):
        D, I = hamming_topk(q, gallery, k)
        rD, rI = ref_topk(q, gallery, k)
        np.testing.assert_array_equal(I, rI)
        np.testing.assert_array_equal(D, rD)


def test_topk_large_gallery_with_pruning_and_early_stop():
    """n and k large enough for the bounded buffer to be compacted several times; the query's exact
    duplicates fill top-k at distance 0, so the scan stops early."""
    rng = np.random.default_rng(6)
    gallery = _codes(rng, 20000, 32)
    q = gallery[:3].copy()
    gallery[100:5200] = q[2]  # 5100 exact copies of query 2
    for k in (100, 4300, 6000):
        D, I = hamming_topk(q, gallery, k)
        rD, rI = ref_topk(q, gallery, k)
        np.testing.assert_array_equal(I, rI)
        np.testing.assert_array_equal(D, rD)


def test_topk_padding_and_empty_gallery():
    rng = np.random.default_rng(7)
    gallery = _codes(rng, 3, 32)
    D, I = hamming_topk(gallery[:1], gallery, 5)
    np.testing.assert_array_equal(I[0, 3:], [-1, -1])
    np.testing.assert_array_equal(D[0, 3:], [INT32_MAX, INT32_MAX])
    empty = gallery[:0]
    D, I = hamming_topk(gallery[:2], empty, 4)
    assert (I == -1).all() and (D == INT32_MAX).all()
    D, I = hamming_rank(gallery[:2], empty)
    assert D.shape == I.shape == (2, 0)


def test_unaligned_and_readonly_inputs():
    rng = np.random.default_rng(8)
    gallery = _codes(rng, 40, 128)
    buf = np.zeros(40 * 16 + 1, dtype=np.uint8)
    odd = buf[1:].reshape(40, 16)  # data not 8-byte aligned
    odd[:] = gallery
    ro = gallery.copy()
    ro.flags.writeable = False
    for g in (odd, ro):
        D, I = hamming_topk(gallery[:2], g, 7)
        np.testing.assert_array_equal(I, ref_topk(gallery[:2], gallery, 7)[1])


def test_input_errors():
    g = np.zeros((5, 16), np.uint8)
    with pytest.raises(ValueError, match="128-bit codes"):
        hamming_distances(np.zeros((1, 4), np.uint8), g)
    with pytest.raises(ValueError, match="uint8"):
        hamming_rank(g.astype(np.int8), g)
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        hamming_topk(g, g[0], 3)
    for k in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            hamming_topk(g, g, k)
