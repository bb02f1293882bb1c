"""Coarse-to-fine (CtF) Hamming search over a code pyramid (Sec. 3.1, Fig. 1).

Shorter codes quickly return a rough ranking of the whole gallery; longer codes re-rank only the top
candidates. Exact semantics (those of the authors' evaluation code), for lengths L1 < L2 < ... < LS and
thresholds t1..t(S-1):

1. rank the whole gallery by the L1 distance (stable counting sort: ties keep gallery order); the
   candidates are the codes with distance <= t1 (inclusive), in that order;
2. each next stage s re-ranks only the current candidates by the Ls distance (stable: ties keep the
   previous order); the ranking becomes the re-ranked candidates followed by everything else in its
   previous order; the new candidates are those with distance <= ts. The longest code has no threshold.

``D`` is the Hamming distance at the finest stage each item reached. ``ctf_search`` returns exactly the
first ``k`` of ``ctf_rank`` without ranking the whole gallery: stage 1 only collects the codes within
t1, and the rest of the stage-1 ranking is scanned for only when fewer than ``k`` survive.

With ``query_weights`` (``uint8[nq, L1]``, see ``ctfreid.search.asymmetric``) stage 1 ranks by the weighted
distance ``sum_i w_i [q_i != g_i]`` instead, ``t1`` bounds it, and items ranked at stage 1 only carry it
in ``D``; everything else is the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ctfreid.codes import check_code_set, check_length
from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.asymmetric import StageWeights, stage_weights
from ctfreid.search.hamming import (
    _aligned,
    check_k,
    hamming_rank,
    hamming_topk,
    prepare_queries,
)
from ctfreid.search.thresholds import threshold_array


def prepare_code_sets(
    query_codes: Mapping[int, np.ndarray], gallery_codes: Mapping[int, np.ndarray]
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], list[int], bool]:
    """Validate query/gallery code sets -> (query tuple, gallery tuple, lengths, single query).

    Raises ``ValueError`` for mismatched lengths or widths and for an empty gallery.
    """
    g = check_code_set(gallery_codes, "gallery_codes")
    lengths = list(g)
    if not isinstance(query_codes, Mapping) or not query_codes:
        raise CtfreidError(f"query_codes must be a non-empty dict {{length: uint8 codes}}, got {query_codes!r:.80}")
    by_len = {check_length(L, "query_codes key"): v for L, v in query_codes.items()}  # as the gallery's: 32.5, "32" refused
    q_lengths = sorted(by_len)
    if q_lengths != lengths:
        raise CtfreidError(f"query_codes have code lengths {q_lengths} but gallery_codes have {lengths}")
    if next(iter(g.values())).shape[0] == 0:
        raise CtfreidError("gallery is empty: gallery_codes hold 0 codes")
    single = all(isinstance(v, np.ndarray) and v.ndim == 1 for v in by_len.values())
    qs, nq = [], None
    for L in lengths:
        q, _ = prepare_queries(by_len[L][None, :] if single else by_len[L], g[L].shape[1], f"query_codes[{L}]")
        if nq is not None and q.shape[0] != nq:
            raise CtfreidError(f"query_codes[{L}] has {q.shape[0]} rows but the shorter codes have {nq}")
        nq = q.shape[0]
        qs.append(q)
    gs = tuple(_aligned(g[L]) for L in lengths)  # validated by check_code_set
    return tuple(qs), gs, lengths, single


def kernel_args(qs: tuple[np.ndarray, ...], gs: tuple[np.ndarray, ...], thr: np.ndarray,
                sw: StageWeights | None = None) -> tuple:
    """Arguments of ``_kernels.ctf_rank``/``ctf_topk`` up to the thresholds (see ``_kernels``); ``Ls`` holds
    each stage's largest distance (``StageWeights.stage_maxima``)."""
    S = len(gs)
    lengths = [g.shape[1] * 8 for g in gs]
    qoff = _kernels.stage_offsets(lengths)
    Qr = _kernels.later_queries(qs, qoff)
    Gr = tuple(_kernels.words64(g) for g in gs[1:]) + _kernels.stage_pad(S - 1)
    Ls = np.array(lengths, dtype=np.int64) if sw is None else sw.stage_maxima(lengths)
    return _kernels.words32(qs[0]), _kernels.words32(gs[0]), lengths[0], Qr, qoff, Gr, Ls, S, thr


def weight_tail(sw: StageWeights | None) -> tuple:
    """The kernels' trailing weight arguments (``StageWeights.kernel_tail``; none for Hamming distances, whose
    kernels are compiled apart)."""
    return () if sw is None else sw.kernel_tail()


def batched(nq: int, lengths: list[int], n: int, sw: StageWeights | None, thr: np.ndarray,
            planes: bool = False) -> bool:
    """Whether a top-k of ``nq`` queries with thresholds ``thr`` runs the tile scan (``_kernels.tile_scan``;
    the limits of a weighted stage 1 apply when stage 1 is weighted). A weighted stage 2 runs query by query:
    the tile scan computes stage 2 inside the scan with Hamming distances (a weighted one there, in the scalar
    loop, was no faster than query by query: ``benchmarks/README.md``, tenth session); weighted stages after it
    run in either. ``planes``: the stage-1 codes' byte planes are kept (``CtFIndex``)."""
    if sw is not None and sw.later is not None and sw.later[1][1]:
        return False
    return _kernels.tile_scan(nq, lengths[0], n, sw is not None and sw.first is not None, int(thr[0]), planes)


def _rank_all(qs: tuple[np.ndarray, ...], gs: tuple[np.ndarray, ...], lengths: list[int], thr: np.ndarray,
              sw: StageWeights | None) -> tuple[np.ndarray, np.ndarray]:
    """The full rankings ``(D, I)`` of validated code sets (``sw``: query weights, ``stage_weights``)."""
    if len(lengths) == 1 and sw is None:
        return hamming_rank(qs[0], gs[0])
    nq, n = qs[0].shape[0], gs[0].shape[0]
    D = np.empty((nq, n), dtype=np.int32)
    I = np.empty((nq, n), dtype=np.int64)
    if len(lengths) == 1:
        _kernels.weighted_rank(_kernels.words32(qs[0]), sw.first, _kernels.words32(gs[0]), sw.maxima[lengths[0]], D, I)
    else:
        _kernels.ctf_rank(*kernel_args(qs, gs, thr, sw), D, I, *weight_tail(sw))
    return D, I


def ctf_rank(
    query_codes: Mapping[int, np.ndarray],
    gallery_codes: Mapping[int, np.ndarray],
    thresholds: Mapping[int, int],
    query_weights: np.ndarray | Mapping[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Full coarse-to-fine rankings ``(D int32[nq, n], I int64[nq, n])`` (Sec. 3.1, Fig. 1).

    ``query_codes``/``gallery_codes``: ``{length: uint8[., length // 8]}`` with the same lengths;
    ``thresholds``: ``{length: int}`` for every length but the longest. 1-D query codes give 1-D results.
    ``query_weights``: ``uint8[nq, L1]`` bit weights of the shortest code for a weighted stage 1 (see the
    module docstring), or ``{length: uint8[nq, length]}`` for any stages; the thresholds (and distances) of
    a weighted length are weighted distances.
    """
    qs, gs, lengths, single = prepare_code_sets(query_codes, gallery_codes)
    sw = stage_weights(query_weights, qs[0].shape[0], lengths)
    D, I = _rank_all(qs, gs, lengths, threshold_array(thresholds, lengths, maxima=sw and sw.maxima), sw)
    return (D[0], I[0]) if single else (D, I)


def ctf_search(
    query_codes: Mapping[int, np.ndarray],
    gallery_codes: Mapping[int, np.ndarray],
    thresholds: Mapping[int, int],
    k: int,
    query_weights: np.ndarray | Mapping[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each coarse-to-fine ranking, ``(D int32[nq, k], I int64[nq, k])``.

    Identical to ``ctf_rank(...)[:, :k]`` but never ranks the whole gallery; padded with -1 / int32 max
    when ``k > n``. ``query_weights``: as for :func:`ctf_rank`. Each call validates the gallery and allocates
    fresh scratch (about 60 bytes a code): for many searches of one gallery, ``CtFIndex`` keeps both (one
    query at 1e6 codes: about 3x faster, ``benchmarks/README.md``, "Kernel choices").
    """
    k = check_k(k)
    qs, gs, lengths, single = prepare_code_sets(query_codes, gallery_codes)
    sw = stage_weights(query_weights, qs[0].shape[0], lengths)
    thr = threshold_array(thresholds, lengths, maxima=sw and sw.maxima)
    nq, n, S = qs[0].shape[0], gs[0].shape[0], len(gs)
    if sw is not None and len(lengths) == 1:  # no top-k kernel for one weighted length: the ranking's head
        D, I = _rank_all(qs, gs, lengths, thr, sw)
        pad = max(0, k - n)
        D = np.pad(D[:, :k], ((0, 0), (0, pad)), constant_values=_kernels.INT32_MAX)
        I = np.pad(I[:, :k], ((0, 0), (0, pad)), constant_values=-1)
    elif len(lengths) == 1:
        D, I = hamming_topk(qs[0], gs[0], k)
    else:
        D = np.empty((nq, k), dtype=np.int32)
        I = np.empty((nq, k), dtype=np.int64)
        counts = np.zeros((nq, S), np.int64)
        args = kernel_args(qs, gs, thr, sw)
        work = (k, _kernels.all_live(n), *_kernels.ctf_workspace(n, k, S))
        if batched(nq, lengths, n, sw, thr):  # as CtFIndex.search
            hi2 = _kernels.stage2_keep(n, thr, lengths)
            _kernels.ctf_topk_batch(*args, *work, hi2, *_kernels.batch_buffers(*_kernels.batch_shape(n, nq, S), S),
                                    D, I, counts, *weight_tail(sw))
        else:
            _kernels.ctf_topk(*args, *work, D, I, counts, *weight_tail(sw))
    return (D[0], I[0]) if single else (D, I)
