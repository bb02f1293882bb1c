"""Coarse-to-fine search (Sec. 3.1, Fig. 1): hand-worked example, loop-based reference, top-k == prefix."""

import numpy as np
import pytest
from reference import INT32_MAX, correlated_code_sets, pad_topk, ref_ctf_rank

from ctfreid.errors import CtfreidError
from ctfreid.search.coarse_to_fine import ctf_rank, ctf_search
from ctfreid.search.hamming import hamming_rank


def _code(length, d):
    """A code at Hamming distance ``d`` from the all-zero query."""
    bits = np.zeros(length, dtype=np.uint8)
    bits[:d] = 1
    return np.packbits(bits)


def _hand_example():
    # distances to the all-zero query, per gallery item 0..5
    d = {32: [3, 1, 3, 5, 1, 2], 64: [10, 7, 4, 0, 7, 7], 96: [0, 20, 20, 1, 15, 20]}
    gallery = {L: np.stack([_code(L, x) for x in ds]) for L, ds in d.items()}
    query = {L: np.zeros((1, L // 8), np.uint8) for L in d}
    return query, gallery


def test_hand_worked_example_with_ties_and_inclusive_thresholds():
    q, g = _hand_example()
    # stage 1 (32 bits), stable: [1, 4 | 5 | 0, 2 | 3]; t = 3 keeps 1, 4, 5, 0, 2 (3 is inclusive)
    # stage 2 (64 bits) re-ranks them: 2 (4), then 1, 4, 5 (all 7, previous order), 0 (10); 3 stays last
    #   even though its 64-bit distance is 0; t = 7 keeps 2, 1, 4, 5 (inclusive)
    # stage 3 (96 bits): 4 (15), then 2, 1, 5 (all 20, stage-2 order); 0 and 3 keep their place
    D, I = ctf_rank(q, g, {32: 3, 64: 7})
    np.testing.assert_array_equal(I, [[4, 2, 1, 5, 0, 3]])
    np.testing.assert_array_equal(D, [[15, 20, 20, 20, 10, 5]])  # distance at the finest stage reached
    for k in range(1, 9):
        sD, sI = ctf_search(q, g, {32: 3, 64: 7}, k)
        np.testing.assert_array_equal(sI, pad_topk(D, I, k)[1])
        np.testing.assert_array_equal(sD, pad_topk(D, I, k)[0])
    assert ctf_search(q, g, {32: 3, 64: 7}, 8)[1][0, 6:].tolist() == [-1, -1]
    assert ctf_search(q, g, {32: 3, 64: 7}, 8)[0][0, 6:].tolist() == [INT32_MAX] * 2


def test_zero_candidates():
    q, g = _hand_example()
    D, I = ctf_rank(q, g, {32: 0, 64: 7})  # nobody within 0 at 32 bits: the stage-1 ranking
    np.testing.assert_array_equal(I, [[1, 4, 5, 0, 2, 3]])
    np.testing.assert_array_equal(D, [[1, 1, 2, 3, 3, 5]])
    D, I = ctf_rank(q, g, {32: 3, 64: 3})  # nobody within 3 at 64 bits: the stage-2 ranking
    np.testing.assert_array_equal(I, [[2, 1, 4, 5, 0, 3]])
    np.testing.assert_array_equal(D, [[4, 7, 7, 7, 10, 5]])
    for th in ({32: 0, 64: 7}, {32: 3, 64: 3}):
        for k in (1, 3, 6, 7):
            D, I = ctf_rank(q, g, th)
            np.testing.assert_array_equal(ctf_search(q, g, th, k)[1], pad_topk(D, I, k)[1])


@pytest.mark.parametrize(
    "lengths,n",
    [((32, 128, 512), 300), ((32, 64), 2500), ((64, 128, 256, 512), 200), ((32, 96, 128), 300),
     ((32, 64, 96, 128, 160), 150), ((32, 64, 96, 128, 160, 192), 120), ((32, 4096), 60)],
)
def test_matches_loop_reference_on_random_data(lengths, n):
    rng = np.random.default_rng(n + len(lengths))
    q, g = correlated_code_sets(rng, n, 3, lengths)
    for trial in range(3):
        th = {L: int(rng.integers(0, L // 2 + 1)) for L in lengths[:-1]}
        if trial == 2:
            th[lengths[0]] = lengths[0]  # a threshold equal to the length keeps everything
        D, I = ctf_rank(q, g, th)
        rD, rI = ref_ctf_rank(q, g, th)
        np.testing.assert_array_equal(I, rI)
        np.testing.assert_array_equal(D, rD)
        for k in (1, 10, n // 3, n - 1, n, n + 4):
            sD, sI = ctf_search(q, g, th, k)
            pD, pI = pad_topk(D, I, k)
            np.testing.assert_array_equal(sI, pI)
            np.testing.assert_array_equal(sD, pD)


def test_long_pyramid_whose_sort_keys_do_not_fit_one_word():
    """Top-k orders each part by (distances at every stage reached, gallery order) packed into one 62-bit
    key; nine long codes with thresholds that keep everything need ~100 bits, so the counting-sort path
    runs: both must give the reference ranking."""
    lengths = (32, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
    rng = np.random.default_rng(9)
    q, g = correlated_code_sets(rng, 70, 2, lengths)
    for th in ({L: L for L in lengths[:-1]}, {L: L // 2 for L in lengths[:-1]}):
        rD, rI = ref_ctf_rank(q, g, th)
        for k in (1, 5, 69, 70, 75):
            sD, sI = ctf_search(q, g, th, k)
            pD, pI = pad_topk(rD, rI, k)
            np.testing.assert_array_equal(sI, pI)
            np.testing.assert_array_equal(sD, pD)


def test_topk_around_the_number_of_stage1_candidates():
    """Top-k must continue with the stage-1 ranking when fewer than k codes pass t1."""
    rng = np.random.default_rng(11)
    q, g = correlated_code_sets(rng, 400, 2, (32, 128))
    th = {32: 9}
    D, I = ctf_rank(q, g, th)
    d1 = hamming_rank(q[32], g[32])[0]
    for i in range(2):
        c1 = int((d1[i] <= 9).sum())
        for k in (max(1, c1 - 1), max(1, c1), c1 + 1, c1 + 50):
            sD, sI = ctf_search({L: v[i] for L, v in q.items()}, g, th, k)  # 1-D queries -> 1-D results
            np.testing.assert_array_equal(sI, pad_topk(D[i : i + 1], I[i : i + 1], k)[1][0])
            np.testing.assert_array_equal(sD, pad_topk(D[i : i + 1], I[i : i + 1], k)[0][0])


def test_single_length_is_hamming_ranking():
    rng = np.random.default_rng(12)
    q, g = correlated_code_sets(rng, 100, 2, (128,))
    D, I = ctf_rank(q, g, {})
    rD, rI = hamming_rank(q[128], g[128])
    np.testing.assert_array_equal(I, rI)
    np.testing.assert_array_equal(ctf_search(q, g, {}, 10)[1], rI[:, :10])


def test_errors():
    q, g = _hand_example()
    with pytest.raises(ValueError, match=r"missing \[64\]"):
        ctf_rank(q, g, {32: 3})
    with pytest.raises(ValueError, match=r"extra \[96\]"):
        ctf_rank(q, g, {32: 3, 64: 7, 96: 1})
    # one contract (ctfreid.search.thresholds.check_thresholds): integers in [0, L], named by length
    for bad in (-1, 2.5, 65, float("inf"), True, "7"):
        with pytest.raises(CtfreidError, match=r"thresholds\[64\] must be an integer Hamming distance in \[0, 64\]"):
            ctf_search(q, g, {32: 3, 64: bad}, 3)
    assert ctf_search(q, g, {32: 3, 64: 64.0}, 3)[1].tolist() == ctf_search(q, g, {32: 3, 64: 64}, 3)[1].tolist()
    with pytest.raises(ValueError, match="gallery is empty"):
        ctf_rank(q, {L: v[:0] for L, v in g.items()}, {32: 3, 64: 7})
    with pytest.raises(ValueError, match="code lengths"):
        ctf_rank({32: q[32], 64: q[64]}, g, {32: 3, 64: 7})
    with pytest.raises(ValueError, match=r"query_codes\[64\]"):
        ctf_rank({**q, 64: np.zeros((1, 4), np.uint8)}, g, {32: 3, 64: 7})
    with pytest.raises(ValueError, match=r"query_codes\[64\] has 2 rows"):
        ctf_rank({**q, 64: np.zeros((2, 8), np.uint8)}, g, {32: 3, 64: 7})
    with pytest.raises(ValueError, match=r"gallery_codes\[64\]"):
        ctf_rank(q, {**g, 64: g[64][:, :4]}, {32: 3, 64: 7})
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ctf_search(q, g, {32: 3, 64: 7}, 0)


@pytest.mark.parametrize("key", [32.5, "32", None])
def test_query_keys_are_checked_like_the_gallery_keys(key):
    """A query key that is not a code length is refused, not read as one (32.5 used to search as 32)."""
    rng = np.random.default_rng(3)
    g = {32: rng.integers(0, 256, (20, 4), dtype=np.uint8), 64: rng.integers(0, 256, (20, 8), dtype=np.uint8)}
    q = {key: g[32][:2], 64: g[64][:2]}
    for call in (lambda: ctf_search(q, g, {32: 10}, 5), lambda: ctf_rank(q, g, {32: 10})):
        with pytest.raises(CtfreidError, match="query_codes key"):
            call()
    assert ctf_search({np.int64(32): g[32][:2], 64: g[64][:2]}, g, {32: 10}, 5)[1].shape == (2, 5)
