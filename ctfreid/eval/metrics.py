"""ReID accuracy: CMC (Rank-k) and mAP under the Market-1501 protocol (Sec. 4.1).

For each query, gallery items with the same pid *and* the same camid are removed, and so are junk items
(pid -1); distractors (pid 0) stay as negatives. Over the remaining ("kept") list in ranking order:

- ``AP`` = mean over the query's true matches of the precision at each match's position;
- ``CMC[k] = 1`` if the first true match is within the first ``k + 1`` kept items (clipped at 1);

queries with no true match in the gallery are skipped (and counted). ``mAP`` and ``CMC`` average the
valid queries. Given the same ranking this equals torchreid's ``eval_market1501`` (whose Market-1501
loader drops pid -1 images from the gallery). Ties are the ranking's business: pass a stable ranking
(``rank_by_distance``) to break them by gallery position.

The scan is one numba pass down each ranking that stops at the query's last true match, so a good
ranking costs only its head (a Market-1501-sized evaluation takes well under a second).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ctfreid.errors import CtfreidError


@dataclass
class ReIDMetrics:
    """CMC curve (fractions, ``cmc[k]`` = Rank-(k+1)), mAP and per-query AP of the valid queries."""

    cmc: np.ndarray
    mAP: float
    num_valid: int
    num_skipped: int
    ap: np.ndarray = field(repr=False)  # float64[num_valid], AP of each valid query in query order
    valid: np.ndarray = field(repr=False)  # bool[nq], False for skipped queries

    def rank(self, k: int) -> float:
        """Rank-k accuracy; for ``k`` beyond the CMC length (a gallery smaller than ``max_rank``) the
        last value, which is exact: every kept item is already within the first ``len(cmc)``."""
        if k < 1:
            raise CtfreidError(f"rank k must be >= 1, got {k}")
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    @property
    def rank1(self) -> float:
        return self.rank(1)

    @property
    def rank5(self) -> float:
        return self.rank(5)

    @property
    def rank10(self) -> float:
        return self.rank(10)


@dataclass
class RankingStats:
    """Per-query results of a block of queries (``ranking_stats``), merged into CMC / mAP by ``merge_metrics``.

    Blocks of queries evaluated separately (e.g. to bound memory) merge into exactly the metrics of one
    evaluation of all queries."""

    ap: np.ndarray  # float64[nq] (0 for skipped queries)
    first_hit: np.ndarray  # int64[nq]: 1-based kept rank of the first true match (0 = skipped)


def _labels(x, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or (n is not None and arr.shape[0] != n):
        want = f"{n} entries" if n is not None else "a 1-D array"
        raise CtfreidError(f"{name} must be an integer array of {want}, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


@njit(cache=True, nogil=True)
def _scan(indices, q_pids, q_camids, g_pids, g_camids, num_matches, ap, first):
    """One pass down each query's ranking; stops at its last true match. Returns the number of the first
    query whose ranking holds an out-of-range position, or -1."""
    nq, n = indices.shape
    for q in range(nq):
        total = num_matches[q]
        if total == 0:
            continue
        qp, qc = q_pids[q], q_camids[q]
        kept, hits, precision_sum, first_hit = 0, 0, 0.0, 0
        for r in range(n):
            g = indices[q, r]
            if g < 0 or g >= n:
                return q
            gp = g_pids[g]
            if gp == -1 or (gp == qp and g_camids[g] == qc):
                continue  # junk, or the same identity seen by the same camera: removed
            kept += 1
            if gp == qp:
                hits += 1
                precision_sum += hits / kept
                if first_hit == 0:
                    first_hit = kept
                if hits == total:
                    break
        ap[q] = precision_sum / total
        first[q] = first_hit
    return -1


def _num_matches(q_pids, q_camids, g_pids, g_camids) -> np.ndarray:
    """Per query, the gallery items that count as true matches: same pid, other camera (pid -1 never)."""
    ids, g_id = np.unique(g_pids, return_inverse=True)
    cams, g_cam = np.unique(g_camids, return_inverse=True)
    per_id = np.bincount(g_id, minlength=ids.size)
    per_id_cam = np.bincount(g_id * cams.size + g_cam, minlength=ids.size * cams.size).reshape(ids.size, cams.size)
    qi = np.minimum(np.searchsorted(ids, q_pids), ids.size - 1)
    known = (ids[qi] == q_pids) & (q_pids != -1)
    ci = np.minimum(np.searchsorted(cams, q_camids), cams.size - 1)
    same_cam = np.where(cams[ci] == q_camids, per_id_cam[qi, ci], 0)
    return np.where(known, per_id[qi] - same_cam, 0).astype(np.int64)


def ranking_stats(indices: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray,
                  g_pids: np.ndarray, g_camids: np.ndarray) -> RankingStats:
    """Per-query AP and first-match rank of full rankings ``indices`` (see ``evaluate_ranking``)."""
    indices = np.asarray(indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise CtfreidError(f"indices must be an integer array [nq, n_gallery], got {indices.dtype} {indices.shape}")
    nq, n = indices.shape
    q_pids = _labels(q_pids, "q_pids", nq)
    q_camids = _labels(q_camids, "q_camids", nq)
    g_pids = _labels(g_pids, "g_pids")
    g_camids = _labels(g_camids, "g_camids", g_pids.shape[0])
    if n != g_pids.shape[0]:
        raise CtfreidError(
            f"indices must rank the whole gallery: {g_pids.shape[0]} columns expected, got shape {indices.shape}"
        )
    ap = np.zeros(nq, dtype=np.float64)
    first = np.zeros(nq, dtype=np.int64)
    if nq == 0 or n == 0:
        return RankingStats(ap, first)
    matches = _num_matches(q_pids, q_camids, g_pids, g_camids)
    bad = _scan(np.ascontiguousarray(indices), q_pids, q_camids, g_pids, g_camids, matches, ap, first)
    if bad >= 0:
        row = indices[bad]
        raise CtfreidError(
            f"indices must be gallery positions in [0, {n}); row {bad} has values in [{row.min()}, {row.max()}]"
        )
    return RankingStats(ap, first)


def merge_metrics(parts: list[RankingStats], max_rank: int = 10, n_gallery: int | None = None) -> ReIDMetrics:
    """Combine per-block results into CMC / mAP. ``max_rank`` is cut to ``n_gallery`` (with a warning)."""
    ap = np.concatenate([p.ap for p in parts]) if parts else np.zeros(0)
    first = np.concatenate([p.first_hit for p in parts]) if parts else np.zeros(0, np.int64)
    if max_rank < 1:
        raise CtfreidError(f"max_rank must be >= 1, got {max_rank}")
    if n_gallery is not None and n_gallery < max_rank:
        warnings.warn(f"gallery has only {n_gallery} items: CMC computed up to rank {n_gallery}", stacklevel=3)
        max_rank = max(n_gallery, 1)
    valid = first > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise CtfreidError(
            f"no query has a true match in the gallery (all {first.size} queries skipped): "
            "check that query and gallery share identities seen from different cameras"
        )
    cmc = (first[valid, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0)
    return ReIDMetrics(cmc=cmc, mAP=float(ap[valid].mean()), num_valid=num_valid,
                       num_skipped=int(first.size - num_valid), ap=ap[valid], valid=valid)


def evaluate_ranking(indices: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray,
                     g_camids: np.ndarray, max_rank: int = 10) -> ReIDMetrics:
    """CMC and mAP of full rankings ``indices`` (``int[nq, n]``, gallery positions best first).

    Market-1501 protocol (Sec. 4.1), identical to torchreid's ``eval_market1501`` for the same order.
    Raises :class:`~ctfreid.errors.CtfreidError` (a ``ValueError``) when no query has a true match.
    """
    part = ranking_stats(indices, q_pids, q_camids, g_pids, g_camids)
    return merge_metrics([part], max_rank, np.asarray(indices).shape[1])


def squared_euclidean_distances(query_features: np.ndarray, gallery_features: np.ndarray,
                        gallery_sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances ``float32[nq, n]`` = ``|q|^2 + |g|^2 - 2 q.g`` (one matmul)."""
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise CtfreidError(f"query and gallery features must be [nq, d] and [n, d], got {q.shape} and {g.shape}")
    gn = np.einsum("ij,ij->i", g, g) if gallery_sq_norms is None else gallery_sq_norms
    d = q @ g.T
    d *= -2.0
    d += gn[None, :]
    d += np.einsum("ij,ij->i", q, q)[:, None]
    return d


def rank_by_distance(distances: np.ndarray) -> np.ndarray:
    """Ascending ranking ``int64[nq, n]``; equal distances keep gallery order (stable sort)."""
    return np.argsort(distances, axis=-1, kind="stable").astype(np.int64, copy=False)


def euclidean_rank(query_features: np.ndarray, gallery_features: np.ndarray, block_size: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Float baseline: ``(D float32[nq, n], I int64[nq, n])`` by squared Euclidean distance, computed in
    query blocks; ties broken by gallery position."""
    g = np.asarray(gallery_features, dtype=np.float32)
    q = np.asarray(query_features, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise CtfreidError(f"query and gallery features must be [nq, d] and [n, d], got {q.shape} and {g.shape}")
    gn = np.einsum("ij,ij->i", g, g)
    D = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    I = np.empty((q.shape[0], g.shape[0]), dtype=np.int64)
    for s in range(0, q.shape[0], block_size):
        d = squared_euclidean_distances(q[s:s + block_size], g, gn)
        i = rank_by_distance(d)
        I[s:s + block_size] = i
        D[s:s + block_size] = np.take_along_axis(d, i, axis=1)
    return D, I
