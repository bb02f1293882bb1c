"""A cost model of coarse-to-fine search: expected milliseconds per query of ``CtFIndex.search`` (Sec. 3.1).

CtF top-``k`` search (``ctfreid.search._kernels.ctf_topk``) scans the whole gallery with the shortest code,
computes, for each later length, the distances of the candidates left by the previous thresholds, and
sorts the last ones by their distances (counting sorts). Its time per query is linear in that work::

    ms = fixed + scan * n + sum_{s >= 2} rerank[L_s] * c_s + refill * n * [c_2 < min(k, n)] + sort * bins

- ``n``: the gallery size; every item is scanned at the first length (stage 1);
- ``c_s``: the candidates ranked with the ``L_s``-bit code, i.e. within every threshold before it (the
  per-stage counts of ``Hits.candidates``);
- ``refill``: when fewer than ``min(k, n)`` items pass the first threshold, the search fills the top-k
  from a second, top-k scan of the first length (another pass over the gallery);
- ``bins``: the counting sorts of the last candidates visit every value between the smallest and the
  largest distance at each length (the sum of those ranges; hundreds at 2048 bits, so at small galleries
  this is a large share of the time).

The coefficients are *measured* (:func:`measure_cost_model`): ``CtFIndex.search`` on generated codes at a
couple of gallery sizes and many thresholds, one thread, median of interleaved repeats, batches of
queries (so a call's fixed overhead is shared, as in ``ctfreid evaluate``), fitted by non-negative least
squares on relative errors (:func:`fit_coefficients`). They depend on the machine and the kernels, so the
model saves to and loads from JSON (:meth:`CostModel.save`, :meth:`CostModel.load`) with a note of where it
was measured.

Planning for another gallery size (:func:`expected_ms`): the *fractions* of the gallery kept at each
stage, measured per validation query, transfer across gallery sizes (a threshold keeps a fraction of the
non-matching items); counts are ``fraction * n``; fixed costs do not scale, and neither do the sort bins
(an approximation: the range of distances under a threshold grows little with more candidates). This is
the speed half of the accuracy / speed balance that DTO strikes with one knob (Sec. 3.3);
``ctfreid.eval.calibration`` uses it to aim the thresholds at a target.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.codes import check_length
from ctfreid.errors import CtfreidError
from ctfreid.search.hamming import check_k, hamming_distances
from ctfreid.search.index import CtFIndex

COST_MODEL_VERSION = 1
DEFAULT_SIZES = (20_000, 200_000)
DEFAULT_K = 100


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the time per query of CtF top-``k`` search, in milliseconds (see the module).

    ``rerank_ms`` has one entry per code length but the shortest: the cost of one candidate ranked with
    that length. ``k`` is the top-k the model was measured with (the default of predictions); ``info``
    records how and where it was measured (JSON-serialisable).
    """

    lengths: tuple[int, ...]
    fixed_ms: float
    scan_ms: float
    rerank_ms: dict[int, float]
    refill_ms: float
    sort_ms: float = 0.0
    k: int = DEFAULT_K
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        lengths = tuple(check_length(L) for L in self.lengths)
        if len(lengths) < 2 or list(lengths) != sorted(set(lengths)):
            raise CtfreidError(f"cost model: lengths must be two or more increasing code lengths, got {list(self.lengths)}")
        object.__setattr__(self, "lengths", lengths)
        rerank = {int(L): v for L, v in dict(self.rerank_ms).items()}
        if sorted(rerank) != list(lengths[1:]):
            raise CtfreidError(f"cost model: rerank_ms must give one cost per length {list(lengths[1:])}, "
                               f"got {sorted(rerank)}")
        for name, v in [("fixed_ms", self.fixed_ms), ("scan_ms", self.scan_ms), ("refill_ms", self.refill_ms),
                        ("sort_ms", self.sort_ms)] + \
                [(f"rerank_ms[{L}]", v) for L, v in rerank.items()]:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(v) or v < 0:
                raise CtfreidError(f"cost model: {name} must be a finite number >= 0 (milliseconds), got {v!r}")
        object.__setattr__(self, "rerank_ms", {L: float(rerank[L]) for L in lengths[1:]})
        object.__setattr__(self, "k", check_k(self.k))

    @property
    def coefficients(self) -> np.ndarray:
        """``[fixed, scan, rerank[L_2], ..., rerank[L_S], refill, sort]``: the order of :func:`features`."""
        return np.array([self.fixed_ms, self.scan_ms, *self.rerank_ms.values(), self.refill_ms, self.sort_ms])

    def predict_ms(self, n: float, ranked: Mapping[int, float], refill: float = 0.0, bins: float = 0.0) -> float:
        """Milliseconds per query for a gallery of ``n`` items, ``ranked[L]`` candidates ranked with the
        ``L``-bit code (each length but the shortest), ``refill`` the share of queries with fewer than
        ``min(k, n)`` stage-1 candidates and ``bins`` the sort bins (see the module). Means over queries are
        fine: the model is linear."""
        missing = sorted(set(self.lengths[1:]) - {int(L) for L in ranked})
        if missing:
            raise CtfreidError(f"cost model: ranked counts missing for length(s) {missing}")
        x = features(n, [ranked[L] for L in self.lengths[1:]], refill, bins)
        return float(x @ self.coefficients)

    def to_dict(self) -> dict:
        return {
            "version": COST_MODEL_VERSION,
            "lengths": list(self.lengths),
            "fixed_ms": self.fixed_ms,
            "scan_ms": self.scan_ms,
            "rerank_ms": {str(L): v for L, v in self.rerank_ms.items()},
            "refill_ms": self.refill_ms,
            "sort_ms": self.sort_ms,
            "k": self.k,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, obj: Mapping, label: str = "cost model") -> CostModel:
        try:
            if obj.get("version") != COST_MODEL_VERSION:
                raise CtfreidError(f"version {obj.get('version')!r}, expected {COST_MODEL_VERSION}")
            return cls(lengths=tuple(int(L) for L in obj["lengths"]), fixed_ms=obj["fixed_ms"], scan_ms=obj["scan_ms"],
                       rerank_ms={int(L): v for L, v in obj["rerank_ms"].items()}, refill_ms=obj["refill_ms"],
                       sort_ms=obj.get("sort_ms", 0.0), k=obj.get("k", DEFAULT_K), info=dict(obj.get("info", {})))
        except CtfreidError as e:
            raise CtfreidError(f"{label}: {str(e).removeprefix('cost model: ')}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CtfreidError(f"{label}: expected a JSON object written by CostModel.save "
                               f"(lengths, fixed_ms, scan_ms, rerank_ms, refill_ms), got {type(e).__name__}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON (atomically)."""
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        """Read a model written by :meth:`save`; a missing file is ``FileNotFoundError``, anything else
        unreadable a :class:`~ctfreid.errors.CtfreidError` naming the file."""
        label = f"cost model {os.fspath(path)}"
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"{label}: no such file") from None
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise CtfreidError(f"{label}: not a readable JSON file ({e})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise CtfreidError(f"{label}: not readable JSON ({e})") from None
        if not isinstance(obj, dict):
            raise CtfreidError(f"{label}: expected a JSON object, got {type(obj).__name__}")
        return cls.from_dict(obj, label)

    def check_lengths(self, lengths: Sequence[int], what: str = "codes") -> None:
        """Refuse codes of other lengths than the model's (their costs were not measured)."""
        if list(lengths) != list(self.lengths):
            raise CtfreidError(f"the cost model was measured for code lengths {list(self.lengths)}, but the "
                               f"{what} have {list(lengths)}; measure one for these lengths")


def features(n: float, ranked: Sequence[float], refill: float = 0.0, bins: float = 0.0) -> np.ndarray:
    """The regressors of one measurement: ``[1, n, c_2, ..., c_S, refill * n, bins]`` (see the module)."""
    return np.array([1.0, float(n), *(float(c) for c in ranked), float(refill) * float(n), float(bins)])


def stage_work(distances: Sequence[np.ndarray], thresholds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The work of CtF search per query, from its distances to the gallery at every length.

    ``distances``: one ``[nq, m]`` array per code length, shortest first (any columns holding every
    stage-1 candidate, so a query's own candidate list is enough); ``thresholds``: one per length but the
    longest. Returns ``counts`` ``int64 [nq, S - 1]`` (items ranked with each length but the shortest: within
    every threshold before it) and ``bins`` ``int64 [nq]``: the sum over the lengths of the range
    ``max - min + 1`` of the last candidates' distances (0 without candidates).
    """
    if len(distances) != len(thresholds) + 1 or not thresholds:
        raise CtfreidError(f"stage_work: need one distance array per length and one threshold per length but "
                           f"the longest, got {len(distances)} and {len(thresholds)}")
    mask = distances[0] <= thresholds[0]
    counts = [mask.sum(axis=1)]
    for d, t in zip(distances[1:-1], thresholds[1:]):
        mask &= d <= t
        counts.append(mask.sum(axis=1))
    bins = np.zeros(mask.shape[0], np.int64)
    for d in distances:
        hi = np.where(mask, d, -1).max(axis=1, initial=-1)
        lo = np.where(mask, d, np.iinfo(np.int32).max).min(axis=1, initial=np.iinfo(np.int32).max)
        bins += np.where(hi >= 0, hi.astype(np.int64) - lo + 1, 0)
    return np.stack(counts, axis=1).astype(np.int64), bins


def expected_ms(model: CostModel, fractions: np.ndarray, n: int, k: int | None = None,
                bins: np.ndarray | float = 0.0) -> float:
    """Expected milliseconds per query of top-``k`` CtF search over a gallery of ``n`` items.

    ``fractions``: ``[nq, S - 1]`` per query, the fraction of the gallery ranked at each length but the
    shortest (measured on validation queries; they transfer across gallery sizes). Counts are
    ``fraction * n``; a query with ``fraction_2 * n < min(k, n)`` pays the refill scan. ``bins``: the sort
    bins per query (or their mean), not scaled. The mean over the queries of the model's prediction.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != len(model.lengths) - 1 or f.shape[0] == 0:
        raise CtfreidError(f"fractions must be [queries, {len(model.lengths) - 1}] (one column per length but "
                           f"the shortest), got shape {f.shape}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise CtfreidError(f"gallery size must be a positive integer, got {n!r}")
    k = model.k if k is None else check_k(k)
    counts = f * n
    refill = float((counts[:, 0] < min(k, n)).mean())
    return model.predict_ms(n, dict(zip(model.lengths[1:], counts.mean(axis=0))), refill, float(np.mean(bins)))


# ------------------------------------------------------------------------------------------- fitting
def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares ``argmin_{x >= 0} |A x - b|`` (Lawson and Hanson's active-set method)."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, p = A.shape
    x = np.zeros(p)
    passive = np.zeros(p, dtype=bool)
    tol = 10 * np.finfo(float).eps * np.linalg.norm(A, 1) * max(m, p)
    for _ in range(max_iter or 3 * p + 10):
        w = A.T @ (b - A @ x)
        if passive.all() or (w[~passive] <= tol).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(p)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def fit_coefficients(X: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Non-negative coefficients of ``ms ~ X @ c`` minimising the squared *relative* errors (each row
    divided by its time), so that fast and slow configurations count alike."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < X.shape[1]:
        raise CtfreidError(f"cost model fit: need at least as many timings as coefficients ({X.shape[1] if X.ndim == 2 else '?'}), "
                           f"got X {X.shape} and times {y.shape}")
    if not np.isfinite(y).all() or (y <= 0).any():
        raise CtfreidError("cost model fit: times must be finite and > 0")
    w = 1.0 / y
    scale = np.maximum(np.abs(X * w[:, None]).max(axis=0), 1e-300)  # column scaling: n and 1 differ by 1e5
    return nnls(X * w[:, None] / scale, np.ones_like(y)) / scale


def model_from_coefficients(lengths: Sequence[int], c: np.ndarray, k: int = DEFAULT_K, info: dict | None = None) -> CostModel:
    """A :class:`CostModel` from the coefficient vector of :func:`fit_coefficients`."""
    lengths = tuple(int(L) for L in lengths)
    c = [float(v) for v in c]
    return CostModel(lengths=lengths, fixed_ms=c[0], scan_ms=c[1], rerank_ms=dict(zip(lengths[1:], c[2:-2])),
                     refill_ms=c[-2], sort_ms=c[-1], k=k, info=info or {})


# ----------------------------------------------------------------------------------------- measuring
def generated_codes(lengths: Sequence[int], n: int, seed: int = 0, per_id: int = 8) -> dict[int, np.ndarray]:
    """Codes of ``n`` images, ``per_id`` per identity, in identity order: each identity has a random
    code of the longest length; each image flips its bits with a probability of 1/4, 1/8 or 1/16 (drawn
    per image); shorter codes are prefixes of the longest, so distances agree across lengths as in a code
    pyramid. Cheap to make (random bytes only): the kernels' time depends on the counts, not the values."""
    rng = np.random.default_rng(seed)
    longest = max(lengths)
    nb = longest // 8
    centers = rng.integers(0, 256, ((n + per_id - 1) // per_id, nb), dtype=np.uint8)
    codes = np.repeat(centers, per_id, axis=0)[:n]
    level = rng.integers(2, 5, n)  # AND of 2, 3 or 4 random bytes: a bit is set with probability 1/4 .. 1/16
    flips = rng.integers(0, 256, (n, nb), dtype=np.uint8)
    for a in range(1, 4):
        more = rng.integers(0, 256, (n, nb), dtype=np.uint8)
        flips = np.where((level > a)[:, None], flips & more, flips)
    codes ^= flips
    return {L: np.ascontiguousarray(codes[:, : L // 8]) for L in sorted(lengths)}


def _thresholds_for(dist: Sequence[np.ndarray], keep: Sequence[float]) -> list[int]:
    """Thresholds whose stage-s candidates are about ``keep[s]`` of the previous stage's (the first: of
    the gallery) on a sample (``dist[s]``: query x gallery-sample distances at length s, shortest first)."""
    mask = np.ones(dist[0].shape, bool)
    th = []
    for d_all, f in zip(dist[:-1], keep):
        d = d_all[mask]
        th.append(int(np.quantile(d, f, method="lower")) if d.size else 0)
        mask &= d_all <= th[-1]
    return th


def _design(k: int, n: int, stages: int) -> list[tuple[float, ...]]:
    """Keep fractions per thresholded stage (first: of the gallery; later: of the previous stage's
    candidates) of the timed configurations: from under ``k`` stage-1 candidates (the refill scan) to a few
    per cent, later stages keeping little or most of what reaches them (the pattern repeats beyond four
    lengths)."""
    first = [min(1.0, f) for f in (k / (4.0 * n), 1.5 * k / n, 6.0 * k / n, 0.04)]
    later = ((0.15, 0.15), (0.8, 0.8), (0.8, 0.15), (0.15, 0.8), (0.5, 0.5))
    return [(f, *(r[i % 2] for i in range(stages - 1))) for f in first for r in later]


def _config_features(q: dict[int, np.ndarray], g: dict[int, np.ndarray], lengths: list[int],
                     configs: list[list[int]], n: int, k: int) -> list[np.ndarray]:
    """The mean :func:`features` over the queries of each threshold configuration, from each query's
    distances to its stage-1 candidates (those within the largest first threshold)."""
    t1max = max(th[0] for th in configs)
    nq = q[lengths[0]].shape[0]
    counts = np.zeros((len(configs), nq, len(lengths) - 1))
    bins = np.zeros((len(configs), nq))
    for i in range(nq):
        d1 = hamming_distances(q[lengths[0]][i : i + 1], g[lengths[0]])[0]
        cand = np.flatnonzero(d1 <= t1max)
        dists = [d1[cand][None, :]] + [hamming_distances(q[L][i : i + 1], g[L][cand]) for L in lengths[1:]]
        for j, th in enumerate(configs):
            c, b = stage_work(dists, th)
            counts[j, i], bins[j, i] = c[0], b[0]
    refill = (counts[:, :, 0] < min(k, n)).mean(axis=1)
    return [features(n, counts[j].mean(axis=0), refill[j], bins[j].mean()) for j in range(len(configs))]


def default_sizes(gallery_size: int, k: int = DEFAULT_K) -> tuple[int, int]:
    """Gallery sizes to measure at when planning for ``gallery_size`` items: that size and a quarter of it
    (at least ``8 k`` and ``2 k``). Per-candidate costs depend on whether the codes stay in the caches, so a
    model is measured where it will be used."""
    hi = max(int(gallery_size), 8 * k)
    return max(2 * k, hi // 4), hi


def measure_cost_model(lengths: Sequence[int], sizes: Sequence[int] = DEFAULT_SIZES, queries: int | None = None,
                       repeats: int = 5, k: int = DEFAULT_K, seed: int = 0, statistic: str = "min",
                       progress=None) -> CostModel:
    """Measure the coefficients of :class:`CostModel` on this machine (5-20 s).

    ``sizes``: the gallery sizes to time (see :func:`default_sizes`); ``queries``: queries timed per call
    (default: enough for a few milliseconds, 100 to 1000). For each gallery size, generated codes
    (:func:`generated_codes`) go into a ``CtFIndex``; thresholds are chosen so that stage 1 keeps from ``k / 4`` items to 4 % of the gallery and each later stage 15-80 %
    of what reaches it (:func:`_design`). Each configuration's ``index.search(queries, k, threads=1)`` is
    timed ``repeats`` times, interleaved with the others (a load change on a shared machine hits them
    alike); the fastest of them per query (``statistic="min"``: other processes only ever add time, and on
    a loaded 2-core machine most repeats of a few milliseconds are interrupted; ``"median"`` on a quiet one)
    and the work of the search (:func:`stage_work`, from the distances) are one row of the fit
    (:func:`fit_coefficients`).
    """
    if statistic not in ("min", "median"):
        raise CtfreidError(f"cost model: statistic must be 'min' or 'median', got {statistic!r}")
    lengths = sorted(check_length(L) for L in lengths)
    if len(lengths) < 2:
        raise CtfreidError(f"a cost model needs two or more code lengths, got {lengths}")
    k = check_k(k)
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or len(set(sizes)) < 2 or min(sizes) < 2 * k:
        raise CtfreidError(f"cost model: need two or more different gallery sizes >= 2 k = {2 * k}, got {sizes}")
    for name, v in (("queries", 100 if queries is None else queries), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise CtfreidError(f"cost model: {name} must be a positive integer, got {v!r}")
    t_start = time.perf_counter()
    rows, times = [], []
    for size_i, n in enumerate(sizes):
        nq = queries or int(np.clip(4_000_000 // n, 100, 1000))
        codes = generated_codes(lengths, n + nq, seed=seed + size_i)
        rng = np.random.default_rng(seed + 100 + size_i)
        qi = rng.choice(n + nq, nq, replace=False)  # queries: images of gallery identities
        keep_g = np.ones(n + nq, bool)
        keep_g[qi] = False
        q = {L: np.ascontiguousarray(c[qi]) for L, c in codes.items()}
        g = {L: np.ascontiguousarray(c[keep_g]) for L, c in codes.items()}
        index = CtFIndex()
        index.add(g)
        sample = rng.choice(n, min(n, 5000), replace=False)
        nsq = min(nq, 50)
        dist = [hamming_distances(q[L][:nsq], g[L][sample]) for L in lengths]
        configs = [_thresholds_for(dist, keep) for keep in _design(k, n, len(lengths) - 1)]
        x = _config_features(q, g, lengths, configs, n, k)
        ths = [dict(zip(lengths[:-1], th)) for th in configs]
        samples: list[list[float]] = [[] for _ in configs]
        for th in ths:  # warm-up: compilation, first touch of the scratch
            index.search({L: c[:1] for L, c in q.items()}, k, thresholds=th, threads=1)
        for _ in range(repeats):
            for j, th in enumerate(ths):
                t0 = time.perf_counter()
                index.search(q, k, thresholds=th, threads=1)
                samples[j].append((time.perf_counter() - t0) * 1000.0 / nq)
        rows += x
        times += [float(np.min(s) if statistic == "min" else np.median(s)) for s in samples]
        if progress is not None:
            progress(f"cost model: {len(configs)} thresholds timed on {n} generated codes")
    X, y = np.array(rows), np.array(times)
    c = fit_coefficients(X, y)
    rel = np.abs(X @ c - y) / y
    info = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "node": platform.node(),
        "sizes": sizes, "queries": queries, "repeats": int(repeats), "statistic": statistic,
        "configurations": len(y),
        "median_relative_error": float(np.median(rel)), "max_relative_error": float(rel.max()),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return model_from_coefficients(lengths, c, k, info)


# The built-in cost model: measured once, so that fits made without a cost model (index build, the demo,
# the service, ``ctfreid calibrate`` without --measure-cost-model) are deterministic and cost no timing.
# Measured on 2026-12-04 after three kernel changes (distance loops vectorised, the Zen 4 compress fix, the
# stage-1 walk: per 2048-bit candidate 22 -> 16 ns, refill 0.42 -> 0.12 ns an item, fixed 2.2 -> 0.5 us; the
# default thresholds of the CUHK03 dev runs did not change) on a 2-core AMD EPYC Zen 4 machine (quiet;
# fastest of 5 interleaved repeats) for the default pyramid 32/128/512/2048 at DEFAULT_SIZES, with:
#   python3 -c "from ctfreid.eval.cost_model import *; measure_cost_model((32, 128, 512, 2048), DEFAULT_SIZES).save('ctfreid/eval/default_cost_model.json')"
# Re-measure (same command) when the kernels change. Its absolute times are this machine's; the fits
# depend on the ratios between the coefficients, which move less between machines.
DEFAULT_COST_MODEL_FILE = Path(__file__).with_name("default_cost_model.json")


def default_cost_model(lengths: Sequence[int] | None = None, k: int | None = None) -> CostModel:
    """The built-in cost model (``default_cost_model.json``, see the comment above), for ``lengths``
    (default: the measured 32/128/512/2048) and top-``k`` (default: the measured 100).

    Other code lengths are derived from the measured ones, an approximation: the cost per candidate ranked
    with ``L`` bits is interpolated linearly in ``L`` between the measured lengths (extrapolated along the
    nearest segment, never below the cheapest measured length); the cost per item of the first-stage scan
    and of the refill scan is scaled by ``L_1 / 32`` (the bytes read per item) when the shortest code is
    not 32 bits. ``k`` only changes the model's default top-k (the coefficients are per item)."""
    base = CostModel.load(DEFAULT_COST_MODEL_FILE)
    lengths = base.lengths if lengths is None else tuple(sorted(check_length(L) for L in lengths))
    k = base.k if k is None else check_k(k)
    if lengths == base.lengths and k == base.k:
        return base
    if len(lengths) < 2:
        raise CtfreidError(f"a cost model needs two or more code lengths, got {list(lengths)}")
    xs = np.array(base.lengths[1:], dtype=np.float64)
    ys = np.array(list(base.rerank_ms.values()))

    def rerank(L: int) -> float:
        if L <= xs[0] or L >= xs[-1]:  # extrapolate along the nearest measured segment
            i = 0 if L <= xs[0] else len(xs) - 2
            v = ys[i] + (ys[i + 1] - ys[i]) * (L - xs[i]) / (xs[i + 1] - xs[i])
            return float(max(v, ys.min()))
        return float(np.interp(L, xs, ys))

    scale = lengths[0] / base.lengths[0]
    info = dict(base.info, derived_from=list(base.lengths),
                note="per-candidate costs interpolated in the code length; scans scaled by the shortest length")
    return CostModel(lengths=lengths, fixed_ms=base.fixed_ms, scan_ms=base.scan_ms * scale,
                     rerank_ms={L: rerank(L) for L in lengths[1:]}, refill_ms=base.refill_ms * scale,
                     sort_ms=base.sort_ms, k=k, info=info)


def format_cost_model(model: CostModel) -> str:
    """One line per coefficient, in microseconds (the scale of these costs)."""

    def us(v: float) -> str:
        return f"{1000.0 * v:.4g} us"

    lines = [(f"cost model of top-{model.k} CtF search (per query): fixed {us(model.fixed_ms)}, "
             f"{us(model.scan_ms)} per item scanned at {model.lengths[0]} bits")]
    lines.append("  per candidate ranked at " + ", ".join(f"{L} bits {us(v)}" for L, v in model.rerank_ms.items())
                 + f"; refill scan {us(model.refill_ms)} per item; sort {us(model.sort_ms)} per bin")
    if "median_relative_error" in model.info:
        lines.append(f"  measured {model.info.get('measured', '?')} on {model.info.get('configurations')} configurations "
                     f"(gallery sizes {model.info.get('sizes')}): median error {100 * model.info['median_relative_error']:.1f} %, "
                     f"max {100 * model.info['max_relative_error']:.1f} %")
    return "\n".join(lines)
