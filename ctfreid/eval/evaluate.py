"""Evaluate encoded query / gallery sets: the paper's Table 4 rows and the beta trade-off (Fig. 4).

Rows: ``float`` (squared Euclidean on real-valued features, when both sets have them), ``hash<L>`` (Hamming
ranking with counting sort at one code length) and ``ctf`` (coarse-to-fine search with DTO thresholds,
Sec. 3.1). Accuracy: CMC / mAP under the Market-1501 protocol (``ctfreid.eval.metrics``). Query time per probe
= distance computation + sorting, as in Sec. 4.1: the ranking of all queries is timed (single thread for
the numba kernels) and divided by the number of queries; computing the metrics is not timed. With
``search_k``, the binary rows also time the serving path: the top-k search that ``CtFIndex.search`` runs
(``hamming_topk`` / ``ctf_search``, no full sort), which is what a search over a large gallery costs. The float
baseline's matrix product uses NumPy's BLAS, which may use several threads unless
``OPENBLAS_NUM_THREADS=1`` is set before start-up.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError
from ctfreid.eval.metrics import (
    merge_metrics,
    rank_by_distance,
    ranking_stats,
    squared_euclidean_distances,
)
from ctfreid.eval.report import method_key, parse_method
from ctfreid.search.asymmetric import Weighting, weighted_distances
from ctfreid.search.coarse_to_fine import ctf_rank, ctf_search
from ctfreid.search.hamming import (
    check_k,
    hamming_distances,
    hamming_rank,
    hamming_topk,
)
from ctfreid.search.thresholds import (
    DEFAULT_MAX_PAIRS,
    check_thresholds,
    fits_from_distances,
    pair_distances,
)

# beta values of the accuracy / speed sweep (Fig. 4); the paper's DTO uses beta = 2 (Eq. 8)
DEFAULT_BETAS = (0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 3.0, 10.0)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run numba kernels on one thread (the paper times without parallelism); restore afterwards."""
    numba = sys.modules.get("numba")
    if numba is None:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _check_pair(query: EncodedSet, gallery: EncodedSet) -> None:
    if query.lengths != gallery.lengths:
        raise CtfreidError(f"query codes have lengths {query.lengths} but gallery codes have {gallery.lengths}")
    if len(gallery) == 0 or len(query) == 0:
        raise CtfreidError(f"query and gallery must not be empty (got {len(query)} and {len(gallery)} items)")


def _run(rank_block: Callable[[slice], np.ndarray], query: EncodedSet, gallery: EncodedSet,
         max_rank: int, block_size: int, repeats: int = 1) -> dict:
    """Time ``rank_block`` over query blocks (median of ``repeats`` passes) and evaluate the rankings of
    the first pass (metrics untimed)."""
    nq = len(query)
    parts, times = [], []
    with single_thread():
        # warm-up with a whole block: JIT compilation, kernel loading and first-touch costs stay out of the
        # timing (one query would warm only the one-query kernels, not the batch ones a block runs)
        rank_block(slice(0, min(nq, block_size)))
        for rep in range(repeats):
            elapsed = 0.0
            for s in range(0, nq, block_size):
                sl = slice(s, min(nq, s + block_size))
                t0 = time.perf_counter()
                idx = rank_block(sl)
                elapsed += time.perf_counter() - t0
                if rep == 0:
                    parts.append(ranking_stats(idx, query.pids[sl], query.camids[sl], gallery.pids, gallery.camids))
            times.append(elapsed)
    m = merge_metrics(parts, max_rank, len(gallery))
    return {
        "rank1": m.rank1, "rank5": m.rank5, "rank10": m.rank10, "mAP": m.mAP,
        "query_ms": 1000.0 * float(np.median(times)) / nq, "num_valid": m.num_valid, "skipped": m.num_skipped,
    }


def _time_search(search_block: Callable[[slice], object], nq: int, block_size: int, repeats: int = 1) -> float:
    """Milliseconds per query of ``search_block`` over query blocks: median of ``repeats`` passes, after
    one warm-up call."""
    times = []
    with single_thread():
        search_block(slice(0, min(nq, block_size)))  # warm-up, as in _run
        for _ in range(repeats):
            elapsed = 0.0
            for s in range(0, nq, block_size):
                t0 = time.perf_counter()
                search_block(slice(s, min(nq, s + block_size)))
                elapsed += time.perf_counter() - t0
            times.append(elapsed)
    return 1000.0 * float(np.median(times)) / nq


def candidate_counts(query_codes: Mapping[int, np.ndarray], gallery_codes: Mapping[int, np.ndarray],
                     thresholds: Mapping[int, int], block_size: int = 256,
                     query_weights: np.ndarray | Mapping[int, np.ndarray] | None = None) -> dict[int, float]:
    """Mean number of CtF candidates kept after each thresholded stage: ``{length: mean count}``.

    The candidates after the stage of length ``L_k`` are the items with ``d_{L_1} <= t_1, ..., d_{L_k} <= t_k``
    (weighted distances at the lengths ``query_weights`` weights: an array the shortest, a mapping
    ``{length: weights}`` any; see ``ctfreid.search.asymmetric``).
    """
    lengths = sorted(thresholds)
    weights = _by_length(query_weights, lengths[0])
    nq = next(iter(query_codes.values())).shape[0]
    totals = np.zeros(len(lengths))
    for s in range(0, nq, block_size):
        mask = None
        for k, L in enumerate(lengths):
            q = query_codes[L][s:s + block_size]
            d = (weighted_distances(q, weights[L][s:s + block_size], gallery_codes[L])
                 if L in weights else hamming_distances(q, gallery_codes[L]))
            ok = d <= thresholds[L]
            mask = ok if mask is None else mask & ok
            totals[k] += mask.sum()
    return {L: float(totals[k] / max(nq, 1)) for k, L in enumerate(lengths)}


def _by_length(query_weights, first: int) -> dict[int, np.ndarray]:
    """``query_weights`` as ``{length: weights}`` (an array weights the shortest length, ``first``)."""
    if query_weights is None:
        return {}
    return dict(query_weights) if isinstance(query_weights, Mapping) else {first: query_weights}


def evaluate_sets(query: EncodedSet, gallery: EncodedSet, thresholds: Mapping[int, int] | None = None,
                  max_rank: int = 10, block_size: int = 256, methods: Sequence[str] | None = None,
                  search_k: int | None = None, repeats: int = 1, weighting: Weighting | None = None) -> dict:
    """Table 4 rows for ``query`` against ``gallery``.

    Returns ``{"methods": {"float"?, "hash<L>"..., "ctf"?: {"rank1", "rank5", "rank10", "mAP", "query_ms",
    ...}}, "ctf_thresholds": {L: t}, "skipped_queries": n}``; metrics are fractions in [0, 1]. ``float``
    needs features in both sets, ``ctf`` needs ``thresholds`` (every length but the longest). The ``ctf``
    row also has ``"candidates"``: the mean number of candidates per probe after each thresholded stage.
    ``methods`` restricts the rows computed (names as above). With ``search_k``, every binary row also has
    ``"search_ms"``: milliseconds per query of the top-``search_k`` search alone (the serving path).
    Times are the median of ``repeats`` timed passes (the accuracy comes from the first). ``weighting``: the
    ``ctf`` row uses weighted stages (``ctfreid.search.asymmetric``: stage 1 and the later lengths it
    weights), the query set's ``values`` (and ``later_values``) weighted by it; ``thresholds`` must then be
    those fitted with it.
    """
    _check_pair(query, gallery)
    qw = None
    if weighting is not None:
        if thresholds is None:
            raise CtfreidError("a weighting applies to the ctf row: give the thresholds fitted with it")
        if query.values is None:
            raise CtfreidError(f"a weighted stage 1 needs the queries' values_{query.lengths[0]} (bn(v) of the "
                               "shortest code): encode the queries with 'ctfreid encode'")
        qw = _by_length(weighting.query_weights(query.values, query.later_values), query.lengths[0])
    if search_k is not None:
        search_k = check_k(search_k)
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise CtfreidError(f"repeats must be a positive integer, got {repeats!r}")
    lengths = gallery.lengths
    maxima = weighting.maxima(lengths[0]) if qw is not None else None
    th = check_thresholds(thresholds, lengths, maxima=maxima) if thresholds is not None else None
    rankers: dict[str, Callable[[slice], np.ndarray]] = {}
    if query.features is not None and gallery.features is not None:
        if query.features.shape[1] != gallery.features.shape[1]:
            raise CtfreidError(
                f"query features have {query.features.shape[1]} dimensions but gallery features have "
                f"{gallery.features.shape[1]}"
            )
        g_feat = gallery.features
        g_norms = np.einsum("ij,ij->i", g_feat, g_feat)
        rankers["float"] = lambda sl: rank_by_distance(
            squared_euclidean_distances(query.features[sl], g_feat, g_norms))
    for L in lengths:
        rankers[method_key(L)] = lambda sl, L=L: hamming_rank(query.codes[L][sl], gallery.codes[L])[1]
    if th is not None:
        q_sub = lambda sl: {L: c[sl] for L, c in query.codes.items()}  # noqa: E731
        q_w = lambda sl: None if qw is None else {L: w[sl] for L, w in qw.items()}  # noqa: E731
        rankers["ctf"] = lambda sl: ctf_rank(q_sub(sl), gallery.codes, th, query_weights=q_w(sl))[1]
    if methods is not None:
        unknown = set(methods) - set(rankers)
        if unknown:
            raise CtfreidError(f"unknown or unavailable method(s) {sorted(unknown)}; available: {list(rankers)}")
        rankers = {k: v for k, v in rankers.items() if k in methods}
    # float last: BLAS worker threads keep spinning for a while after a matrix product and would slow
    # down whichever method is timed next
    timed = {name: _run(fn, query, gallery, max_rank, block_size, repeats)
             for name, fn in sorted(rankers.items(), key=lambda item: item[0] == "float")}
    rows = {name: timed[name] for name in rankers}
    if search_k is not None:
        searchers: dict[str, Callable[[slice], object]] = {
            method_key(L): lambda sl, L=L: hamming_topk(query.codes[L][sl], gallery.codes[L], search_k) for L in lengths
        }
        if th is not None:
            searchers["ctf"] = lambda sl: ctf_search(q_sub(sl), gallery.codes, th, search_k, query_weights=q_w(sl))
        for name, fn in searchers.items():
            if name in rows:
                rows[name]["search_ms"] = _time_search(fn, len(query), block_size, repeats)
    if "ctf" in rows:
        counts = candidate_counts(query.codes, gallery.codes, th, query_weights=qw)
        rows["ctf"]["candidates"] = {str(L): c for L, c in counts.items()}
    skipped = next(iter(rows.values()))["skipped"] if rows else 0
    for r in rows.values():
        del r["skipped"]
    return {
        "methods": rows,
        "ctf_thresholds": {str(L): t for L, t in (th or {}).items()},
        **({"ctf_weights": weighting.to_dict()} if weighting is not None else {}),
        "skipped_queries": int(skipped),
        "num_queries": len(query),
        "num_gallery": len(gallery),
        **({"search_k": search_k} if search_k is not None else {}),
    }


def format_table(result: Mapping) -> str:
    """Plain-text table in the layout of the paper's Table 4 (percentages, ms per query, speed-up
    relative to the longest code)."""
    rows = result["methods"]
    hashes = [k for k in rows if parse_method(k) is not None]
    ref = max(hashes, key=parse_method) if hashes else None
    ref_ms = rows[ref]["query_ms"] if ref else None
    header = f"{'method':<10}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>9}{'mAP':>8}{'ms/query':>10}"
    header += f"{'speed-up vs ' + ref:>22}" if ref else ""
    k = result.get("search_k")
    ref_search = rows[ref].get("search_ms") if ref and k else None
    if ref_search:
        header += f"{f'top-{k} ms':>12}{'speed-up':>10}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        line = (f"{name:<10}{100 * r['rank1']:>7.1f}%{100 * r['rank5']:>7.1f}%{100 * r['rank10']:>8.1f}%"
                f"{100 * r['mAP']:>7.1f}%{r['query_ms']:>10.3f}")
        if ref:
            line += f"{ref_ms / r['query_ms']:>21.1f}x" if r["query_ms"] > 0 else f"{'-':>22}"
        if ref_search:
            t = r.get("search_ms")
            line += f"{t:>12.4f}{ref_search / t:>9.1f}x" if t else f"{'-':>12}{'-':>10}"
        lines.append(line)
    notes = []
    if result.get("ctf_thresholds"):
        notes.append("ctf thresholds: " + ", ".join(f"{L}={t}" for L, t in result["ctf_thresholds"].items()))
    cand = rows.get("ctf", {}).get("candidates")
    if cand:
        notes.append("ctf mean candidates: " + ", ".join(f"{L}-bit {c:.1f}" for L, c in cand.items()))
    notes.append(f"skipped queries (no true match in gallery): {result.get('skipped_queries', 0)}")
    return "\n".join(lines + notes)


def beta_sweep(val: EncodedSet, query: EncodedSet | None = None, gallery: EncodedSet | None = None,
               betas: Sequence[float] = DEFAULT_BETAS, rho: float | str = 1.0,
               max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0, max_rank: int = 10,
               repeats: int = 1) -> list[dict]:
    """Accuracy / speed against beta (the paper's Fig. 4): one row per beta.

    Thresholds come from DTO on ``val`` (pair distances computed once). With ``query`` and ``gallery`` each
    row also has the CtF evaluation: mean candidates per stage, Rank-1/5/10, mAP, ms per query (the median
    of ``repeats`` timed passes, as in ``evaluate_sets``).
    """
    if (query is None) != (gallery is None):
        raise CtfreidError("beta_sweep needs both query and gallery, or neither")
    if query is not None:
        _check_pair(query, gallery)
        if val.lengths != gallery.lengths:
            raise CtfreidError(f"validation codes have lengths {val.lengths} but gallery codes have {gallery.lengths}")
    distances = pair_distances(val.codes, val.pids, val.camids, max_pairs, seed)
    rows = []
    for beta in betas:
        fits = fits_from_distances(distances, beta, rho)
        th = {L: f.threshold for L, f in fits.items()}
        row = {
            "beta": float(beta),
            "thresholds": {str(L): t for L, t in th.items()},
            "expected_recall": {str(L): f.recall for L, f in fits.items()},
            "expected_neg_rate": {str(L): f.neg_rate for L, f in fits.items()},
        }
        if query is not None:
            r = evaluate_sets(query, gallery, th, max_rank=max_rank, methods=["ctf"], repeats=repeats)["methods"]["ctf"]
            row.update(r)
        rows.append(row)
    return rows


def format_sweep(rows: Sequence[Mapping]) -> str:
    """Plain-text table of ``beta_sweep`` rows."""
    if not rows:
        return "(no betas)"
    lengths = list(rows[0]["thresholds"])
    has_eval = "rank1" in rows[0]
    header = f"{'beta':>7}  {'thresholds':<22}"
    header += f"{'candidates':<26}{'Rank-1':>8}{'mAP':>8}{'ms/query':>10}" if has_eval else \
        f"{'expected recall':<30}{'expected neg. rate':<30}"
    lines = [header, "-" * len(header)]
    for r in rows:
        th = ",".join(f"{L}={r['thresholds'][L]}" for L in lengths)
        line = f"{r['beta']:>7g}  {th:<22}"
        if has_eval:
            cand = "/".join(f"{r['candidates'][L]:.0f}" for L in lengths)
            line += f"{cand:<26}{100 * r['rank1']:>7.1f}%{100 * r['mAP']:>7.1f}%{r['query_ms']:>10.3f}"
        else:
            recall = "/".join(f"{r['expected_recall'][L]:.3f}" for L in lengths)
            neg_rate = "/".join(f"{r['expected_neg_rate'][L]:.2e}" for L in lengths)
            line += f"{recall:<30}{neg_rate:<30}"
        lines.append(line)
    return "\n".join(lines)
