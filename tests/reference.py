"""Pure-NumPy / pure-Python brute-force references for the search core (independent of the kernels).

Slow but obviously correct: bits are unpacked and compared one by one, rankings use a stable argsort or
Python's stable ``sorted``, and coarse-to-fine follows the issue's wording step by step with lists.
Other test modules may import these.
"""

from __future__ import annotations

import numpy as np

INT32_MAX = np.iinfo(np.int32).max


def ref_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Hamming distances by unpacking every bit: ``int32[nq, n]``."""
    qb = np.unpackbits(np.atleast_2d(queries), axis=1).astype(np.int32)
    gb = np.unpackbits(gallery, axis=1).astype(np.int32)
    return (qb[:, None, :] != gb[None, :, :]).sum(axis=2).astype(np.int32)


def ref_rank(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking with a stable argsort (ties keep gallery order)."""
    d = ref_distances(queries, gallery)
    idx = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, idx, axis=1), idx.astype(np.int64)


def pad_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``k`` columns of full rankings, padded with int32 max / -1 when ``k`` exceeds them."""
    nq, n = I.shape
    outD = np.full((nq, k), INT32_MAX, dtype=np.int32)
    outI = np.full((nq, k), -1, dtype=np.int64)
    m = min(k, n)
    outD[:, :m] = D[:, :m]
    outI[:, :m] = I[:, :m]
    return outD, outI


def ref_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k as the first k of the stable full ranking."""
    return pad_topk(*ref_rank(queries, gallery), k)


def ref_ctf_rank_one(q_dists: dict[int, np.ndarray], thresholds: dict[int, int]) -> tuple[list[int], list[int]]:
    """Coarse-to-fine ranking of one query from its distances at every length (Sec. 3.1, literally: the ``ctfreid.search.coarse_to_fine`` docstring's steps).

    ``q_dists[L][i]`` is the distance of gallery item i at length L. Returns (indices, distances).
    """
    lengths = sorted(q_dists)
    n = len(q_dists[lengths[0]])
    d1 = q_dists[lengths[0]]
    order = sorted(range(n), key=lambda i: d1[i])  # Python's sort is stable: ties keep gallery order
    dist = {i: int(d1[i]) for i in range(n)}
    candidates = [i for i in order if d1[i] <= thresholds[lengths[0]]]
    for s, L in enumerate(lengths[1:], start=1):
        ds = q_dists[L]
        reranked = sorted(candidates, key=lambda i: ds[i])  # stable: ties keep the previous order
        in_cand = set(candidates)
        order = reranked + [i for i in order if i not in in_cand]
        for i in reranked:
            dist[i] = int(ds[i])
        if s < len(lengths) - 1:
            candidates = [i for i in reranked if ds[i] <= thresholds[L]]
    return order, [dist[i] for i in order]


def ref_ctf_rank(query_codes: dict, gallery_codes: dict, thresholds: dict) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-to-fine rankings of a batch, ``(D int32[nq, n], I int64[nq, n])``."""
    lengths = sorted(gallery_codes)
    dists = {L: ref_distances(query_codes[L], gallery_codes[L]) for L in lengths}
    nq = dists[lengths[0]].shape[0]
    D, I = [], []
    for i in range(nq):
        order, dist = ref_ctf_rank_one({L: dists[L][i] for L in lengths}, thresholds)
        I.append(order)
        D.append(dist)
    return np.array(D, dtype=np.int32), np.array(I, dtype=np.int64)


def correlated_code_sets(
    rng: np.random.Generator, n: int, nq: int, lengths=(32, 128, 512), dim: int = 64, ids: int = 20
) -> tuple[dict, dict]:
    """Small random code pyramids where shorter codes are noisy versions of longer ones (many ties).

    Each length is the sign of a random projection of a shared latent with identity clusters, as
    multi-length hashing models produce; returns (query codes, gallery codes).
    """
    centers = rng.normal(size=(ids, dim))
    lat = centers[rng.integers(0, ids, n + nq)] + 0.8 * rng.normal(size=(n + nq, dim))
    codes = {L: np.packbits(lat @ rng.normal(size=(dim, L)) > 0, axis=1) for L in lengths}
    return {L: c[:nq] for L, c in codes.items()}, {L: c[nq:] for L, c in codes.items()}
