"""Hamming distances between packed binary codes, ranking by counting sort, and top-k (Sec. 3.1).

The Hamming distance between two L-bit codes is the number of differing bits, popcount(a XOR b); it
takes only the L + 1 integer values 0..L, so a full ranking is a *counting sort* (histogram of L + 1
bins, prefix sum, one stable scatter): O(n + L) per query instead of O(n log n), and stable, so ties
keep gallery order. Top-k never sorts the gallery: one scan keeps the codes within a bound that drops
to the k-th distance seen so far (see ``ctfreid.search._kernels``). All results equal a brute-force NumPy
reference exactly, ties included (tests/reference.py).

Codes are packed ``uint8[n, L // 8]`` (``numpy.packbits`` order, as in faiss binary indexes).
Distances are int32, indices int64; top-k pads with index -1 and distance ``np.iinfo(np.int32).max``
when ``k > n``.
"""

from __future__ import annotations

import numpy as np

from ctfreid.codes import check_codes, check_length
from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels

INT32_MAX = _kernels.INT32_MAX


def _aligned(codes: np.ndarray) -> np.ndarray:
    """The kernels read codes as 32/64-bit words: copy the rare array whose data is not 8-byte aligned."""
    return codes if codes.ctypes.data % 8 == 0 else codes.copy()


def prepare_gallery(gallery: np.ndarray, name: str = "gallery", length: int | None = None) -> np.ndarray:
    """Validate packed gallery codes for the kernels (C-contiguous, aligned ``uint8[n, L // 8]``)."""
    return _aligned(check_codes(gallery, name, length))


def prepare_queries(queries: np.ndarray, width: int, name: str = "queries") -> tuple[np.ndarray, bool]:
    """Validate queries against a gallery of ``width`` bytes per code; a 1-D query becomes one row.

    Returns the 2-D queries and whether the input was a single 1-D query.
    """
    single = isinstance(queries, np.ndarray) and queries.ndim == 1
    q = check_codes(queries[None, :] if single else queries, name)
    if q.shape[1] != width:
        raise CtfreidError(
            f"{name} have {q.shape[1] * 8}-bit codes ({q.shape[1]} bytes) but the gallery has "
            f"{width * 8}-bit codes ({width} bytes)"
        )
    return _aligned(q), single


def check_k(k: int) -> int:
    """``k`` as a positive int, else ``ValueError``."""
    if type(k) is int and k >= 1:  # the common case, checked on every search
        return k
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CtfreidError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_radius(radius: int) -> int:
    """``radius`` of a range search as an int >= 0 (a Hamming distance), else ``CtfreidError``."""
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise CtfreidError(f"radius must be an integer >= 0 (a Hamming distance), got {radius!r}")
    return int(radius)


def range_result(keep: np.ndarray, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss's range-search layout ``lims int64[nq + 1], D int32[m], I int64[m]`` of the entries ``keep``
    (bool [nq, cols]) of the per-query rows ``D`` and ``I``."""
    lims = np.zeros(keep.shape[0] + 1, np.int64)
    np.cumsum(keep.sum(axis=1), out=lims[1:])
    return lims, D[keep].astype(np.int32), I[keep].astype(np.int64)


def hamming_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Hamming distances ``int32[nq, n]`` between packed codes (``int32[n]`` for one 1-D query)."""
    g = prepare_gallery(gallery)
    q, single = prepare_queries(queries, g.shape[1])
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.int32)
    _kernels.distances(_kernels.words(q), _kernels.words(g), out)
    return out[0] if single else out


def counting_sort(distances: np.ndarray, length: int) -> np.ndarray:
    """Stable ascending argsort of integer distances in [0, length] (ties keep gallery order) -> int64.

    Accepts 1-D ``[n]`` or 2-D ``[nq, n]`` (sorted row by row). Histogram of ``length + 1`` bins, prefix
    sum, scatter: O(n + length) per row.
    """
    length = check_length(length, "length")
    d = np.asarray(distances)
    if d.ndim not in (1, 2) or not (np.issubdtype(d.dtype, np.integer) or d.dtype == np.bool_):
        raise CtfreidError(f"distances must be a 1-D or 2-D integer array, got {d.dtype} {d.shape}")
    if d.size and (d.min() < 0 or d.max() > length):
        raise CtfreidError(f"distances must lie in [0, {length}], got values in [{d.min()}, {d.max()}]")
    d2 = np.ascontiguousarray(d if d.ndim == 2 else d[None, :], dtype=np.int32)
    out = np.empty(d2.shape, dtype=np.int64)
    _kernels.counting_sort_rows(d2, length, out)
    return out if d.ndim == 2 else out[0]


def hamming_rank(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full Hamming rankings: sorted distances ``int32[nq, n]`` and gallery indices ``int64[nq, n]``.

    Ties keep gallery order (stable counting sort). A 1-D query gives 1-D results.
    """
    g = prepare_gallery(gallery)
    q, single = prepare_queries(queries, g.shape[1])
    D = np.empty((q.shape[0], g.shape[0]), dtype=np.int32)
    I = np.empty((q.shape[0], g.shape[0]), dtype=np.int64)
    _kernels.rank(_kernels.words(q), _kernels.words(g), g.shape[1] * 8, D, I)
    return (D[0], I[0]) if single else (D, I)


def hamming_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each Hamming ranking, ``(D int32[nq, k], I int64[nq, k])``, without a full sort.

    Equal to ``hamming_rank(...)[:, :k]`` (ties: lower gallery index first); padded with -1 / int32 max
    when ``k > n``. A 1-D query gives 1-D results.
    """
    k = check_k(k)
    g = prepare_gallery(gallery)
    q, single = prepare_queries(queries, g.shape[1])
    D = np.empty((q.shape[0], k), dtype=np.int32)
    I = np.empty((q.shape[0], k), dtype=np.int64)
    _kernels.topk(_kernels.words(q), _kernels.words(g), g.shape[1] * 8, k, _kernels.all_live(g.shape[0]), D, I)
    return (D[0], I[0]) if single else (D, I)
