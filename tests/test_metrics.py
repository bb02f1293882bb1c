"""CMC / mAP under the Market-1501 protocol against a loop-based reference and a hand-worked case."""

import numpy as np
import pytest

from ctfreid.eval.metrics import (
    RankingStats,
    euclidean_rank,
    evaluate_ranking,
    merge_metrics,
    rank_by_distance,
    ranking_stats,
    squared_euclidean_distances,
)


def reference_market1501(indices, q_pids, q_camids, g_pids, g_camids, max_rank):
    """One query at a time, the protocol as written: drop same pid+camid and junk, AP over hits."""
    cmcs, aps, skipped = [], [], 0
    for q in range(len(q_pids)):
        kept = [g for g in indices[q]
                if g_pids[g] != -1 and not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
        hits = [g_pids[g] == q_pids[q] for g in kept]
        if not any(hits):
            skipped += 1
            continue
        precisions, found = [], 0
        for pos, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / pos)
        aps.append(sum(precisions) / len(precisions))
        first = hits.index(True) + 1
        cmcs.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), len(aps), skipped


def random_case(rng, nq, n, n_ids=8, cams=3):
    g_pids = rng.integers(1, n_ids, n)
    g_pids[rng.random(n) < 0.15] = -1  # junk
    g_pids[rng.random(n) < 0.15] = 0  # distractors
    q_pids = rng.integers(1, n_ids + 2, nq)  # some identities absent from the gallery -> skipped
    return q_pids, rng.integers(0, cams, nq), g_pids, rng.integers(0, cams, n)


@pytest.mark.parametrize("seed", range(6))
def test_random_rankings_match_loop_reference(seed):
    rng = np.random.default_rng(seed)
    nq, n = 40, int(rng.integers(20, 120))
    q_pids, q_cams, g_pids, g_cams = random_case(rng, nq, n)
    # Integer distances with many ties, ranked stably: ties broken by gallery position.
    dist = rng.integers(0, 6, (nq, n))
    indices = rank_by_distance(dist)
    got = evaluate_ranking(indices, q_pids, q_cams, g_pids, g_cams, max_rank=10)
    cmc, mAP, valid, skipped = reference_market1501(indices, q_pids, q_cams, g_pids, g_cams, 10)
    assert np.allclose(got.cmc, cmc) and got.mAP == pytest.approx(mAP)
    assert (got.num_valid, got.num_skipped) == (valid, skipped) and skipped > 0
    assert got.rank1 == pytest.approx(cmc[0]) and got.rank5 == pytest.approx(cmc[4])
    assert got.rank10 == pytest.approx(cmc[9])
    assert got.ap.shape == (valid,) and got.valid.sum() == valid


def test_blocks_of_queries_merge_to_the_same_result():
    rng = np.random.default_rng(7)
    q_pids, q_cams, g_pids, g_cams = random_case(rng, 50, 64)
    indices = np.argsort(rng.random((50, 64)), axis=1)
    whole = evaluate_ranking(indices, q_pids, q_cams, g_pids, g_cams)
    parts = [ranking_stats(indices[s:s + 7], q_pids[s:s + 7], q_cams[s:s + 7], g_pids, g_cams) for s in range(0, 50, 7)]
    assert all(isinstance(p, RankingStats) for p in parts)  # public type of the public function
    blocked = merge_metrics(parts, 10, 64)
    assert np.allclose(whole.cmc, blocked.cmc) and whole.mAP == pytest.approx(blocked.mAP)
    assert (whole.num_valid, whole.num_skipped) == (blocked.num_valid, blocked.num_skipped)


def test_hand_worked_case():
    # gallery:        0       1       2 (same cam)  3 (junk)  4 (distractor)  5
    g_pids = np.array([1, 2, 1, -1, 0, 1])
    g_cams = np.array([1, 1, 0, 1, 2, 2])
    q_pids, q_cams = np.array([1, 3, 2]), np.array([0, 0, 0])
    order = np.array([1, 2, 0, 3, 4, 5])
    indices = np.stack([order, order, order])
    m = evaluate_ranking(indices, q_pids, q_cams, g_pids, g_cams, max_rank=4)
    # query 0: kept list [1 (miss), 0 (hit), 4 (miss), 5 (hit)] -> AP = (1/2 + 2/4) / 2 = 0.5, first hit at 2
    # query 1: pid 3 is not in the gallery -> skipped
    # query 2: kept list [1 (hit), 2, 0, 4, 5] -> AP = 1, first hit at 1
    assert (m.num_valid, m.num_skipped) == (2, 1)
    assert np.allclose(m.ap, [0.5, 1.0]) and m.mAP == pytest.approx(0.75)
    assert np.allclose(m.cmc, [0.5, 1.0, 1.0, 1.0])
    assert list(m.valid) == [True, False, True]


def test_gallery_smaller_than_max_rank_warns_and_clips():
    g_pids, g_cams = np.array([5, 6, 5]), np.array([1, 1, 2])
    indices = np.array([[1, 0, 2], [0, 1, 2]])
    with pytest.warns(UserWarning, match="only 3 items"):
        m = evaluate_ranking(indices, np.array([5, 6]), np.array([0, 0]), g_pids, g_cams, max_rank=10)
    assert m.cmc.shape == (3,)
    cmc, mAP, _, _ = reference_market1501(indices, [5, 6], [0, 0], g_pids, g_cams, 3)
    assert np.allclose(m.cmc, cmc) and m.mAP == pytest.approx(mAP)
    assert m.rank5 == m.rank10 == m.cmc[-1] == 1.0


def test_bad_input_and_no_valid_query():
    g_pids, g_cams = np.array([1, 2]), np.array([0, 0])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_ranking(np.array([[0, 1]]), np.array([1]), np.array([0]), g_pids, g_cams, max_rank=2)
    with pytest.raises(ValueError, match="whole gallery"):
        evaluate_ranking(np.array([[0]]), np.array([1]), np.array([1]), g_pids, g_cams)
    with pytest.raises(ValueError, match="gallery positions"):
        evaluate_ranking(np.array([[-1, 0]]), np.array([1]), np.array([1]), g_pids, g_cams)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_ranking(np.array([[0, 1]]), np.array([1, 2]), np.array([1]), g_pids, g_cams)


def test_rank_by_distance_breaks_ties_by_gallery_position():
    d = np.array([[3, 1, 3, 1, 0], [2, 2, 2, 2, 2]])
    assert rank_by_distance(d).tolist() == [[4, 1, 3, 0, 2], [0, 1, 2, 3, 4]]
    assert rank_by_distance(d).dtype == np.int64


def test_euclidean_rank_matches_float64_brute_force():
    rng = np.random.default_rng(3)
    q, g = rng.standard_normal((7, 16)), rng.standard_normal((300, 16))
    D, I = euclidean_rank(q.astype(np.float32), g.astype(np.float32), block_size=3)
    exact = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(I, np.argsort(exact, axis=1, kind="stable"))
    assert np.allclose(D, np.sort(exact, axis=1), atol=1e-3)
    # the distances are squared (what the name says), not Euclidean
    assert np.allclose(squared_euclidean_distances(q, g), exact, atol=1e-3)
    assert not np.allclose(squared_euclidean_distances(q, g), np.sqrt(exact), atol=1e-3)
    same = np.repeat(g[:1], 4, axis=0)  # identical gallery items: gallery order
    _, I = euclidean_rank(g[:1], same)
    assert I.tolist() == [[0, 1, 2, 3]]
