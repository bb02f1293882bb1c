"""Thresholds aimed at what a user wants: the accuracy of the longest code, or a time budget (Sec. 3.3).

DTO (``ctfreid.search.thresholds``, Alg. 1) balances accuracy and speed with one knob, beta, whose effect on
either is only known after the fact. The paper notes that the direct alternative, a search over the
thresholds by cross-validation, has too large a space (``prod_L L > 4e9`` settings for 32/128/512/2048
bits). This module makes that search small enough to run in seconds and aims it at a target:

- ``target="accuracy"``: the thresholds with the lowest expected query time whose CtF mAP *and* Rank-1 on
  the validation split stay within ``tolerance`` points of the longest code alone;
- ``target="time"``: the best validation mAP (then Rank-1) whose expected time is at most ``budget_ms``.

Protocol. The validation identities are split like a test set (:func:`split_validation`): one query per
identity and camera (for identities seen by two or more cameras), the other images form the gallery;
accuracy is CMC / mAP under the Market-1501 protocol (``ctfreid.eval.metrics``) of the full CtF ranking,
as ``evaluate_sets`` and ``beta_sweep`` compute it. One split has few queries (one per identity and
camera), and picking the cheapest of hundreds of settings within a tolerance favours those that are
lucky on them; so the metrics are pooled over ``folds`` splits that draw other images as queries (the
paper's "cross-validation"), which puts most validation images to use as queries. Time is the cost model's expected milliseconds of
top-``k`` search (``ctfreid.eval.cost_model``) for a gallery of ``gallery_size`` items, from the fractions of
the validation gallery each threshold keeps.

Search. Per thresholded length, a grid of candidate thresholds from the validation distance distributions:
quantiles of the same-identity (cross-camera) distances, of the different-identity distances (the kept
fraction of non-matches), the DTO thresholds of a range of betas (Eq. 8), and the length itself (no
pruning). From "no pruning" at every length, a greedy descent lowers one length's threshold by one grid
step at a time, the step that loses the least accuracy per millisecond saved (free steps first, the
largest saving among them); every point it visits, and every step it tries, is a candidate, as are the
DTO thresholds. The target picks among them, then a local search refines the pick one grid step per
length at a time (down for the accuracy target, up for the time target). Thresholds only decrease along
the descent, so accuracy and time move monotonically but for noise. Rankings are evaluated once per
distinct candidate set (two threshold settings that keep the same items at every stage rank alike).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError, count
from ctfreid.eval.cost_model import CostModel, default_cost_model, expected_ms, stage_work
from ctfreid.eval.evaluate import DEFAULT_BETAS
from ctfreid.eval.metrics import merge_metrics, ranking_stats
from ctfreid.search.asymmetric import DEFAULT_WEIGHT_BITS, WeightedFit, Weighting, weight_scale, weighted_distances
from ctfreid.search.coarse_to_fine import ctf_rank
from ctfreid.search.hamming import check_k, hamming_distances, hamming_rank
from ctfreid.search.thresholds import DEFAULT_MAX_PAIRS, check_thresholds, fits_from_distances, pair_distances

TARGETS = ("accuracy", "time")
DEFAULT_TARGET = "accuracy"  # the default wherever thresholds are fitted automatically (issue #16)
DEFAULT_TOLERANCE = 0.5  # mAP and Rank-1 points
# quantile levels of the grids: same-identity distances (recall kept) and different-identity ones (kept
# fraction of non-matches)
POSITIVE_LEVELS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
NEGATIVE_LEVELS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
GRID_BETAS = DEFAULT_BETAS + (30.0, 100.0)
# A weighted stage 1 scans at a higher cost per item than the Hamming one the cost model measures (3 more AND +
# popcount a code): one top-100 query on 1e6 codes took 554 against 416 us at equal stage-1 keep
# (benchmarks/bench_asymmetric.py, AMD EPYC Zen 4). Added to a weighted fit's expected times; it does not
# depend on the thresholds, so it never changes which thresholds a fit picks.
WEIGHTED_SCAN_EXTRA_MS = 1.4e-7  # per gallery item
# A weighted later stage reads the same rows and adds 3 AND + popcount per 64-bit word (the weight planes): one
# top-100 query on 1e6 codes, unit weights, took 4.5 ns more per row ranked by a weighted 128-bit stage and
# 18.9 ns per 512-bit row (benchmarks/bench_weighted_stages.py, AMD EPYC Zen 4): about 2.3 ns per
# 64-bit word. Added to the expected time of a fit with weighted later stages, per candidate ranked there.
WEIGHTED_ROW_EXTRA_MS = 2.3e-6  # per 64-bit word of a ranked row
DEFAULT_FOLDS = 4  # query / gallery splits pooled (each identity-camera's first four images serve as queries)


@dataclass
class TargetFit:
    """Thresholds for a target and what they are expected to give (fractions are in [0, 1]; ``tolerance``
    and ``budget_ms`` as given).

    ``keep_fractions[L]``: the mean fraction of the validation gallery ranked with the ``L``-bit code (every
    length but the shortest); ``candidates[L]``: that fraction times ``gallery_size``; ``reference``: mAP and
    Rank-1 of the longest code alone on the same split; ``no_pruning_ms``: the expected time with every
    threshold at its length (CtF ranking everything at every length).
    """

    target: str
    thresholds: dict[int, int]
    expected_ms: float
    val_map: float
    val_rank1: float
    reference: dict[str, float]
    keep_fractions: dict[int, float]
    candidates: dict[int, float]
    gallery_size: int
    k: int
    no_pruning_ms: float
    tolerance: float | None = None
    budget_ms: float | None = None
    val_queries: int = 0
    val_gallery: int = 0
    evaluations: int = 0
    folds: int = 1
    grids: dict[int, list[int]] = field(default_factory=dict, repr=False)
    # weighted stages: the thresholds of the lengths it weights (thresholds[L1], and weighting.later's) are in
    # its units
    weighting: Weighting | None = None

    @property
    def weighted_fit(self) -> WeightedFit | None:
        """A weighted fit's thresholds and weighting as one ``WeightedFit``; None for a Hamming fit."""
        return None if self.weighting is None else WeightedFit(self.thresholds, self.weighting)

    def to_dict(self) -> dict:
        """JSON-ready (length keys as strings)."""
        return {
            "target": self.target,
            "tolerance": self.tolerance,
            "budget_ms": self.budget_ms,
            "thresholds": {str(L): t for L, t in self.thresholds.items()},
            "expected_ms": self.expected_ms,
            "gallery_size": self.gallery_size,
            "k": self.k,
            "val_mAP": self.val_map,
            "val_rank1": self.val_rank1,
            "reference": self.reference,
            "keep_fractions": {str(L): f for L, f in self.keep_fractions.items()},
            "candidates": {str(L): c for L, c in self.candidates.items()},
            "no_pruning_ms": self.no_pruning_ms,
            "val_queries": self.val_queries,
            "val_gallery": self.val_gallery,
            "evaluations": self.evaluations,
            "folds": self.folds,
            **({"weights": self.weighting.to_dict()} if self.weighting is not None else {}),
        }


def split_validation(val: EncodedSet, seed: int = 0, fold: int = 0) -> tuple[EncodedSet, EncodedSet]:
    """Query and gallery from a validation set, like a test protocol (CUHK03-NP, Market-1501): one query
    per identity and camera, for identities seen by two or more cameras; every other image (pid -1 ones
    dropped) is in the gallery. The images of each identity and camera are shuffled with ``seed``; fold
    ``j`` takes the ``j``-th (cyclically) as the query, so folds ``0 .. m - 1`` use each of ``m`` images
    once. Raises when no query would have a true match."""
    pids, cams = val.pids, val.camids
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(pids != -1)
    order = labelled[rng.permutation(labelled.size)]
    cams_of: dict[int, set] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        cams_of.setdefault(int(pids[i]), set()).add(int(cams[i]))
        groups.setdefault((int(pids[i]), int(cams[i])), []).append(int(i))
    is_query = np.zeros(pids.size, bool)
    for (pid, _), members in groups.items():
        if len(cams_of[pid]) >= 2:
            is_query[members[fold % len(members)]] = True
    is_gallery = (pids != -1) & ~is_query
    if not is_query.any() or not is_gallery.any():
        raise CtfreidError(
            f"validation set: {count(len(cams_of), 'identity', 'identities')}, none seen by two cameras "
            "with images to spare: a query / gallery split needs identities with images from two or more cameras"
        )

    return val.take(is_query), val.take(is_gallery)


def _splits(val: EncodedSet, seed: int, folds: int) -> list[tuple[EncodedSet, EncodedSet]]:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 1:
        raise CtfreidError(f"folds must be a positive integer, got {folds!r}")
    return [split_validation(val, seed, j) for j in range(int(folds))]


def _check_target(target: str, tolerance, budget_ms) -> None:
    if target not in TARGETS:
        raise CtfreidError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if target == "accuracy":
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) \
                or tolerance < 0:
            raise CtfreidError(f"tolerance must be a finite number >= 0 (mAP and Rank-1 points), got {tolerance!r}")
        if budget_ms is not None:
            raise CtfreidError("budget_ms applies to target='time', not 'accuracy'")
    else:
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, numbers.Real) or not math.isfinite(budget_ms) \
                or budget_ms <= 0:
            raise CtfreidError(f"budget_ms must be a finite number > 0 (milliseconds per query), got {budget_ms!r}")


class _Evaluator:
    """Accuracy and expected time of threshold settings on validation splits (folds), memoised; metrics
    are pooled over the queries of all folds."""

    def __init__(self, splits: list[tuple[EncodedSet, EncodedSet]], model: CostModel, gallery_size: int, k: int,
                 weighting: Weighting | None = None):
        self.splits, self.model, self.n, self.k, self.weighting = splits, model, gallery_size, k, weighting
        self.lengths = splits[0][1].lengths
        L1 = self.lengths[0]
        # weighted stages: each split's queries get their bit weights, and those stages weighted distances
        self.weights = [None if weighting is None else weighting.query_weights(q.values, q.later_values)
                        for q, _ in splits]
        by_length = [{} if w is None else w if isinstance(w, dict) else {L1: w} for w in self.weights]
        self.dist = [[hamming_distances(q.codes[L], g.codes[L]) if L not in w
                      else weighted_distances(q.codes[L], w[L], g.codes[L]) for L in self.lengths]
                     for (q, g), w in zip(splits, by_length)]
        # the extra cost of a candidate ranked at each later length (weighted later stages)
        later = weighting.later if weighting is not None else {}
        self.row_extra = np.array([WEIGHTED_ROW_EXTRA_MS * (L // 64) if L in later else 0.0
                                   for L in self.lengths[1:]])
        self._points: dict[tuple[int, ...], tuple[float, float, float, np.ndarray]] = {}
        self._by_sets: dict[bytes, tuple[float, float]] = {}
        self.rankings = 0
        L = self.lengths[-1]
        self.ref_map, self.ref_rank1 = self._metrics([hamming_rank(q.codes[L], g.codes[L])[1] for q, g in splits])

    def _metrics(self, rankings: list[np.ndarray]) -> tuple[float, float]:
        parts = [ranking_stats(r, q.pids, q.camids, g.pids, g.camids) for r, (q, g) in zip(rankings, self.splits)]
        m = merge_metrics(parts, 1, min(len(g) for _, g in self.splits))
        return 100.0 * m.mAP, 100.0 * m.rank1

    def __call__(self, th: tuple[int, ...]) -> tuple[float, float, float, np.ndarray]:
        """``(expected ms, mAP points, Rank-1 points, mean keep fraction per later length)``."""
        if th in self._points:
            return self._points[th]
        fractions, bins, keys = [], [], hashlib.blake2b(digest_size=16)
        for dist, (_, g) in zip(self.dist, self.splits):
            c, b = stage_work(dist, th)
            fractions.append(c / len(g))
            bins.append(b)
            # the CtF ranking depends only on how far each item gets (its distances are fixed)
            reached = np.ones(dist[0].shape, np.int8)
            alive = np.ones(dist[0].shape, bool)
            for d, t in zip(dist[:-1], th):
                alive &= d <= t
                reached += alive
            keys.update(reached.tobytes())
        f = np.concatenate(fractions)
        ms = expected_ms(self.model, f, self.n, self.k, np.concatenate(bins))
        if self.weighting is not None:
            ms += self.n * (WEIGHTED_SCAN_EXTRA_MS + float(f.mean(axis=0) @ self.row_extra))
        key = keys.digest()
        if key not in self._by_sets:
            thr = dict(zip(self.lengths[:-1], th))
            self._by_sets[key] = self._metrics([ctf_rank(q.codes, g.codes, thr, query_weights=w)[1]
                                                for (q, g), w in zip(self.splits, self.weights)])
            self.rankings += 1
        out = (ms, *self._by_sets[key], f.mean(axis=0))
        self._points[th] = out
        return out

    @property
    def points(self) -> dict[tuple[int, ...], tuple[float, float, float, np.ndarray]]:
        return self._points

    @property
    def num_queries(self) -> int:
        return sum(len(q) for q, _ in self.splits)

    @property
    def mean_gallery(self) -> int:
        return round(float(np.mean([len(g) for _, g in self.splits])))


def threshold_grids(splits: list[tuple[EncodedSet, EncodedSet]], dist: list[list[np.ndarray]],
                    dto: list[dict[int, int]], tops: Mapping[int, int] | None = None) -> list[list[int]]:
    """Candidate thresholds per length but the longest (ascending, ending with the length itself): quantiles
    of the same-identity cross-camera and of the different-identity query-gallery distances (all folds),
    and the DTO thresholds ``dto``. ``tops``: the largest distance of each weighted length, which then ends
    its grid (DTO's Hamming thresholds are not in its units and are left out of it)."""
    tops = dict(tops or {})
    lengths = splits[0][1].lengths
    pos = {L: [] for L in lengths[:-1]}
    neg = {L: [] for L in lengths[:-1]}
    for (q, g), d in zip(splits, dist):
        same = q.pids[:, None] == g.pids[None, :]
        p = same & (q.camids[:, None] != g.camids[None, :])
        for s, L in enumerate(lengths[:-1]):
            pos[L].append(d[s][p])
            neg[L].append(d[s][~same])
    grids = []
    for L in lengths[:-1]:
        values = {tops[L]} if L in tops else {L} | {t[L] for t in dto}
        for dd, levels in ((np.concatenate(pos[L]), POSITIVE_LEVELS), (np.concatenate(neg[L]), NEGATIVE_LEVELS)):
            if dd.size:
                values |= {int(v) for v in np.quantile(dd, levels, method="lower")}
        grids.append(sorted(values))
    return grids


def _step(grid: list[int], value: int, up: bool) -> int | None:
    """The next grid value above (``up``) or below ``value``; None at the end of the grid."""
    i = int(np.searchsorted(grid, value, side="right" if up else "left"))
    if up:
        return grid[i] if i < len(grid) else None
    return grid[i - 1] if i > 0 else None


def fit_target(val: EncodedSet, target: str = "accuracy", tolerance: float = DEFAULT_TOLERANCE,
               budget_ms: float | None = None, cost_model: CostModel | None = None, gallery_size: int | None = None,
               k: int | None = None, seed: int = 0, folds: int = DEFAULT_FOLDS,
               max_pairs: int = DEFAULT_MAX_PAIRS, weight_bits: int | None = None,
               weight_later: Sequence[int] = ()) -> TargetFit:
    """Thresholds for ``target`` on the validation set ``val`` (see the module).

    ``weight_bits``: fit for a weighted stage 1 (``ctfreid.search.asymmetric``) with weights of that many
    bits, their scale fitted on ``val.values``; the fit's ``weighting`` goes with its thresholds.
    ``weight_later``: the later lengths (not the longest) weighted too, their scales fitted on
    ``val.later_values``.

    ``cost_model``: the built-in one when None (``default_cost_model``: measured once, so the fit is
    deterministic; pass ``measure_cost_model(...)`` for this machine's); ``gallery_size``: the gallery the time is planned for (default: the validation gallery);
    ``k``: the top-k of the searches (default: the cost model's); ``seed``, ``folds``: the query / gallery
    splits (:func:`split_validation`); ``max_pairs``: the pair subsample of the DTO seeds. Raises :class:`~ctfreid.errors.CtfreidError` for a
    bad target, tolerance or budget, a budget below the cheapest thresholds, or a tolerance that nothing
    meets (possible only for a tolerance of about 0: the ranking without pruning breaks the longest code's
    ties by the shorter codes).
    """
    _check_target(target, tolerance, budget_ms)
    lengths = val.lengths
    if len(lengths) < 2:
        raise CtfreidError(f"coarse-to-fine thresholds need two or more code lengths, the validation codes have {lengths}")
    splits = _splits(val, seed, folds)
    n = len(splits[0][1]) if gallery_size is None else gallery_size
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CtfreidError(f"gallery_size must be a positive integer, got {gallery_size!r}")
    n = int(n)
    if cost_model is None:  # the built-in model: deterministic, no timing
        cost_model = default_cost_model(lengths, k)
    cost_model.check_lengths(lengths, "validation codes")
    k = cost_model.k if k is None else check_k(k)
    weighting = None
    later = sorted({int(L) for L in weight_later})
    if later and weight_bits is None:
        raise CtfreidError("weight_later needs weight_bits (the later stages are weighted beside stage 1)")
    if any(L not in lengths[1:-1] for L in later):
        raise CtfreidError(f"weight_later must name lengths between the shortest and the longest {lengths[1:-1]}, "
                           f"got {later}")
    if weight_bits is not None:
        for L in [lengths[0], *later]:
            if (val.values if L == lengths[0] else val.later_values.get(L)) is None:
                raise CtfreidError(f"a weighted {L}-bit stage needs the validation images' values_{L} (bn(v) of the "
                                   f"{L}-bit code), which this validation set lacks: encode it with 'ctfreid encode'")
        weighting = Weighting(scale=weight_scale(val.values), bits=weight_bits,
                              later={L: weight_scale(val.later_values[L]) for L in later})
    maxima = weighting.maxima(lengths[0]) if weighting is not None else None

    ev = _Evaluator(splits, cost_model, n, k, weighting)
    distances = pair_distances(val.codes, val.pids, val.camids, max_pairs, seed)
    try:  # DTO's thresholds as seeds; none where its Gaussians cannot be fitted (constant distances)
        dto = [{L: f.threshold for L, f in fits_from_distances(distances, b).items()} for b in GRID_BETAS]
    except CtfreidError:
        dto = []
    grids = threshold_grids(splits, ev.dist, dto, maxima)
    S = len(grids)

    def loss(a: tuple, b: tuple) -> float:  # accuracy lost going from a to b, in points (mAP or Rank-1)
        return max(a[1] - b[1], a[2] - b[2])

    top = tuple(g[-1] for g in grids)
    x = top
    while True:  # the greedy descent
        cur = ev(x)
        moves = []
        for s in range(S):
            lower = _step(grids[s], x[s], up=False)
            if lower is not None:
                m = x[:s] + (lower,) + x[s + 1:]
                moves.append((m, cur[0] - ev(m)[0], loss(cur, ev(m))))
        if not moves:
            break
        free = [mv for mv in moves if mv[2] <= 0]
        if free:
            x = max(free, key=lambda mv: mv[1])[0]
        else:
            saving = [mv for mv in moves if mv[1] > 0]
            x = (max(saving, key=lambda mv: mv[1] / mv[2]) if saving else min(moves, key=lambda mv: mv[2]))[0]
    for t in dto if weighting is None else []:
        ev(tuple(t[L] for L in lengths[:-1]))

    if target == "accuracy":
        def ok(p: tuple) -> bool:
            r = ev(p)
            return r[1] >= ev.ref_map - tolerance and r[2] >= ev.ref_rank1 - tolerance

        feasible = [p for p in ev.points if ok(p)]
        if not feasible:
            best = max(ev.points.values(), key=lambda r: (min(r[1] - ev.ref_map, r[2] - ev.ref_rank1)))
            raise CtfreidError(
                f"no thresholds keep mAP and Rank-1 within {tolerance:g} points of the {lengths[-1]}-bit code "
                f"(validation mAP {ev.ref_map:.2f}, Rank-1 {ev.ref_rank1:.2f}); the closest gives mAP {best[1]:.2f}, "
                f"Rank-1 {best[2]:.2f}: use a larger tolerance"
            )
        pick = min(feasible, key=lambda p: (ev(p)[0], -ev(p)[1]))
        while True:  # refine: one grid step down at any length, while it stays feasible and saves time
            options = [pick[:s] + (lo,) + pick[s + 1:] for s in range(S)
                       if (lo := _step(grids[s], pick[s], up=False)) is not None]
            options = [p for p in options if ok(p) and ev(p)[0] < ev(pick)[0]]
            if not options:
                break
            pick = min(options, key=lambda p: ev(p)[0])
    else:
        within = [p for p in ev.points if ev(p)[0] <= budget_ms]
        if not within:
            cheapest = min(ev.points, key=lambda p: ev(p)[0])
            raise CtfreidError(
                f"budget {budget_ms:g} ms per query is unreachable for a gallery of {n} items: the cheapest "
                f"thresholds ({','.join(f'{L}={t}' for L, t in zip(lengths, cheapest))}) are expected to take "
                f"{ev(cheapest)[0]:.4g} ms (fixed costs and the {lengths[0]}-bit scan of every item)"
            )

        def better(p: tuple) -> tuple:
            r = ev(p)
            return (r[1], r[2], -r[0])

        pick = max(within, key=better)
        while True:  # refine: one grid step up at any length, while within the budget and more accurate
            options = [pick[:s] + (hi,) + pick[s + 1:] for s in range(S)
                       if (hi := _step(grids[s], pick[s], up=True)) is not None]
            options = [p for p in options if ev(p)[0] <= budget_ms and better(p) > better(pick)]
            if not options:
                break
            pick = max(options, key=better)

    ms, mAP, rank1, fractions = ev(pick)
    later = lengths[1:]
    return TargetFit(
        target=target, thresholds=check_thresholds(dict(zip(lengths[:-1], pick)), lengths, maxima=maxima),
        expected_ms=ms,
        val_map=mAP / 100.0, val_rank1=rank1 / 100.0,
        reference={"mAP": ev.ref_map / 100.0, "rank1": ev.ref_rank1 / 100.0, "length": lengths[-1]},
        keep_fractions={L: float(f) for L, f in zip(later, fractions)},
        candidates={L: float(f) * n for L, f in zip(later, fractions)},
        gallery_size=n, k=k, no_pruning_ms=ev(top)[0],
        tolerance=float(tolerance) if target == "accuracy" else None,
        budget_ms=float(budget_ms) if target == "time" else None,
        val_queries=ev.num_queries, val_gallery=ev.mean_gallery, evaluations=ev.rankings, folds=len(splits),
        grids={L: g for L, g in zip(lengths[:-1], grids)}, weighting=weighting,
    )


def assess(val: EncodedSet, thresholds: Mapping[int, int], cost_model: CostModel, gallery_size: int | None = None,
           k: int | None = None, seed: int = 0, folds: int = DEFAULT_FOLDS) -> TargetFit:
    """What given thresholds (DTO's, say) give under the protocol of :func:`fit_target`: expected time,
    validation mAP and Rank-1, keep fractions (``target="given"``), to compare them with a targeted fit."""
    lengths = val.lengths
    th = check_thresholds(thresholds, lengths)
    cost_model.check_lengths(lengths, "validation codes")
    splits = _splits(val, seed, folds)
    n = len(splits[0][1]) if gallery_size is None else int(gallery_size)
    if n < 1:
        raise CtfreidError(f"gallery_size must be a positive integer, got {gallery_size!r}")
    k = cost_model.k if k is None else check_k(k)
    ev = _Evaluator(splits, cost_model, n, k)
    ms, mAP, rank1, fractions = ev(tuple(th.values()))
    return TargetFit(
        target="given", thresholds=th, expected_ms=ms, val_map=mAP / 100.0, val_rank1=rank1 / 100.0,
        reference={"mAP": ev.ref_map / 100.0, "rank1": ev.ref_rank1 / 100.0, "length": lengths[-1]},
        keep_fractions={L: float(f) for L, f in zip(lengths[1:], fractions)},
        candidates={L: float(f) * n for L, f in zip(lengths[1:], fractions)},
        gallery_size=n, k=k, no_pruning_ms=ev(tuple(lengths[:-1]))[0],
        val_queries=ev.num_queries, val_gallery=ev.mean_gallery, evaluations=ev.rankings, folds=len(splits),
    )


def fit_thresholds(codes: Mapping[int, np.ndarray], pids: np.ndarray, camids: np.ndarray,
                   target: str = "accuracy", tolerance: float = DEFAULT_TOLERANCE, budget_ms: float | None = None,
                   cost_model: CostModel | None = None, gallery_size: int | None = None, k: int | None = None,
                   seed: int = 0) -> dict[int, int]:
    """:func:`fit_target` on validation codes and labels: thresholds ``{length: t}`` for every length but the
    longest (the targeted counterpart of DTO's ``ctfreid.search.thresholds.fit_thresholds``)."""
    val = EncodedSet(codes=codes, pids=pids, camids=camids)
    return fit_target(val, target, tolerance, budget_ms, cost_model, gallery_size, k, seed).thresholds


def format_fit(fit: TargetFit) -> str:
    """A few lines: the thresholds, the expected time, validation accuracy against the longest code, the
    keep fractions."""
    if fit.target == "accuracy":
        aim = f"within {fit.tolerance:g} points of the {fit.reference['length']}-bit code"
    elif fit.target == "time":
        aim = f"best mAP within {fit.budget_ms:g} ms per query"
    else:
        aim = "thresholds as given"
    lines = [
        f"target {fit.target} ({aim}), top-{fit.k} search over a gallery of {fit.gallery_size} items",
        "thresholds: " + ",".join(f"{L}={t}" for L, t in fit.thresholds.items())
        + (f" ({fit.weighting.stages(min(fit.thresholds))}: {fit.weighting.bits}-bit weights, "
           f"scale {fit.weighting.scale:.4g}"
           + "".join(f", {L} bits {sc:.4g}" for L, sc in fit.weighting.later.items()) + ")"
           if fit.weighting is not None else ""),
        f"expected {fit.expected_ms:.4g} ms per query, searched in batches on one thread (no pruning: "
        f"{fit.no_pruning_ms:.4g} ms; one query at a time costs more)",
        (f"validation ({fit.val_queries} queries in {fit.folds} folds, {fit.val_gallery} gallery): CtF mAP {100 * fit.val_map:.2f}, "
        f"Rank-1 {100 * fit.val_rank1:.2f}; {fit.reference['length']}-bit code mAP {100 * fit.reference['mAP']:.2f}, "
        f"Rank-1 {100 * fit.reference['rank1']:.2f}"),
        "kept per stage: " + ", ".join(f"{L} bits {100 * f:.2f} % ({fit.candidates[L]:.1f} items)"
                                        for L, f in fit.keep_fractions.items()),
        f"({fit.evaluations} rankings evaluated)",
    ]
    return "\n".join(lines)


def default_fit(val: EncodedSet, gallery_size: int | None = None) -> TargetFit:
    """The thresholds fitted wherever none are given (``ctfreid index build``, the demo, the service):
    target accuracy within :data:`DEFAULT_TOLERANCE` points, the built-in cost model, planned for
    ``gallery_size`` items (default: the validation gallery). On the CUHK03 dev set it kept DTO beta=2's
    accuracy with 1.7-1.8x faster search."""
    return fit_target(val, DEFAULT_TARGET, DEFAULT_TOLERANCE, gallery_size=gallery_size)


def default_weighted_fit(val: EncodedSet, gallery_size: int | None = None, bits: int = DEFAULT_WEIGHT_BITS,
                         later: Sequence[int] = ()) -> TargetFit | None:
    """:func:`default_fit` for a weighted stage 1 with ``bits``-bit weights, the default for queries with real
    values (encoded images); ``later``: later lengths weighted too (:func:`fit_target`'s ``weight_later``).
    None when ``val`` has no ``values`` or its shortest code is not a multiple of 32 bits (the kernels'
    words). On seven CUHK03 dev runs it kept 2.3-9.5 % of the gallery at stage 1 within 0.2 mAP of the
    longest code, where the Hamming fit kept 5.8-21.4 %. Weighting the later stages too made one query at
    10^6 items faster in most of them, but lost up to 0.9 mAP on the test split in two
    (``docs/results-cuhk03.md``, "Which stages to weight by default"), so by default only stage 1 is
    weighted."""
    if val.values is None or val.lengths[0] % 32:
        return None
    return fit_target(val, DEFAULT_TARGET, DEFAULT_TOLERANCE, gallery_size=gallery_size, weight_bits=bits,
                      weight_later=later)


def describe_fit(fit: TargetFit, num_images: int) -> str:
    """One line for a thresholds source: ``target accuracy (tolerance 0.5) on N validation images, ...``."""
    aim = f"tolerance {fit.tolerance:g}" if fit.target == "accuracy" else f"budget {fit.budget_ms:g} ms"
    return (f"target {fit.target} ({aim}) on {num_images} validation images, planned for {fit.gallery_size} items")


def save_fit(path, fit: TargetFit, cost_model: CostModel | None = None, extra: Mapping | None = None,
             weighted: TargetFit | None = None) -> None:
    """Write thresholds as ``ctfreid calibrate`` does for a target: ``{"thresholds", "target", "fit",
    "cost_model", ..., "weighted_stage1": {"thresholds", "weights", "fit"}}`` (read by
    ``ctfreid.search.thresholds.read_thresholds_file``, ``--thresholds`` and the model directory).
    ``weighted``: the fit of a weighted stage 1 beside the Hamming ``fit`` (queries with real values use it).
    A weighted ``fit`` alone is written with its ``"weights"`` at the top (its thresholds are not Hamming)."""
    import json

    from ctfreid._atomic import atomic_write
    from ctfreid.search.thresholds import WEIGHTED_SECTION

    if weighted is not None and (weighted.weighting is None or fit.weighting is not None):
        raise CtfreidError("save_fit: 'weighted' must be a weighted fit beside a Hamming 'fit'")
    doc = {"thresholds": {str(L): t for L, t in fit.thresholds.items()}, "target": fit.target, **dict(extra or {}),
           "fit": fit.to_dict()}
    if fit.weighting is not None:  # read back by read_thresholds_file: the stage-1 threshold is in its units
        doc["weights"] = fit.weighting.to_dict()
    if weighted is not None:
        doc[WEIGHTED_SECTION] = {"thresholds": {str(L): t for L, t in weighted.thresholds.items()},
                                 "weights": weighted.weighting.to_dict(), "fit": weighted.to_dict()}
    if cost_model is not None:
        doc["cost_model"] = cost_model.to_dict()
    with atomic_write(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
