"""DTO -- Distance Threshold Optimization (Sec. 3.3, Alg. 1, Eqs. 6-8).

For every code length except the longest, DTO picks the coarse-search threshold ``t`` (candidates are the
gallery items at Hamming distance ``<= t``) from labelled *validation* codes, never from the test
query/gallery (the authors' released evaluation script fits them on the test query/gallery labels):

1. Hamming distances of relevant pairs (same identity) ``D^r`` and of non-relevant pairs (different
   identities) ``D^n`` (Alg. 1, lines 3-4);
2. a Gaussian fit of each, ``N(mu_r, sigma_r)`` and ``N(mu_n, sigma_n)`` (Eq. 7, left), giving the CDFs
   ``Phi_r`` and ``Phi_n`` (Eq. 7, right);
3. the integer ``t`` in ``[0, L]`` that maximises ``F_beta(t)`` (Eq. 8).

Derivation of the F_beta we maximise, from Eq. 6. For one probe with ``N_r`` relevant and ``N_n``
non-relevant gallery items, thresholding at ``t`` keeps ``TP = N_r Phi_r(t)`` relevant items, lets
``FP = N_n Phi_n(t)`` non-relevant items through, and misses ``FN = N_r (1 - Phi_r(t))``. With
``P = TP / (TP + FP)`` and ``R = TP / (TP + FN)``::

    F_beta = (1 + b^2) P R / (b^2 P + R)
           = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP)
           = (1 + b^2) N_r Phi_r / ((1 + b^2) N_r Phi_r + b^2 N_r (1 - Phi_r) + N_n Phi_n)
           = (1 + b^2) Phi_r / (b^2 + Phi_r + rho Phi_n),        rho = N_n / N_r.

The paper's Eq. 8 and the authors' released code take ``rho = 1`` (the default here): the two CDFs are
weighted equally, as if each probe had as many relevant as non-relevant items. ``rho="auto"`` uses the
real ratio of non-relevant to relevant validation pairs instead, which is the exact F_beta of the
thresholded candidate set but pushes ``t`` much lower (there are ~100x more negatives than positives).

Eq. 8 as printed, ``(b^2 + 1) Phi_r / (Phi_n + Phi_r + b^2 (1 - Phi_n + Phi_r))``, has the denominator
above plus an extra ``b^2 (Phi_r - Phi_n)``; it does not follow from Eq. 6 (it looks like a typo for
``b^2 (1 - Phi_r + Phi_r)`` = ``b^2 (FN + TP) / N_r``), and the authors' code implements the form derived
above with ``rho = 1``, so that is what ``f_beta_curve`` computes.

``Phi(t)`` is evaluated at the integer threshold itself (no continuity correction), as in Eq. 7; ties in
``F_beta`` go to the smallest ``t`` (fewest candidates).

Pairs. Relevant pairs are ``i < j`` with the same pid; when camids are given they must also come from
different cameras, matching the Market-1501 protocol, which ignores same-camera matches at test time
(so the threshold is fitted on the matches that count). Non-relevant pairs have different pids (any
cameras). Items with pid -1 (junk) are ignored. Distractors should be left out of a validation set (or be
given pid -1): every pid >= 0 is taken to be one identity. Large sets are subsampled deterministically
(``seed``) to at most ``max_pairs`` pairs of each kind; the Gaussian moments need far fewer.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.codes import check_code_set, check_length
from ctfreid.errors import CtfreidError, count
from ctfreid.search.asymmetric import WeightedFit, Weighting

DEFAULT_MAX_PAIRS = 1_000_000


@dataclass
class PairDistances:
    """Hamming distances of relevant (``positive``) and non-relevant (``negative``) validation pairs.

    ``num_positive`` / ``num_negative`` count all such pairs in the set, before any subsampling.
    """

    length: int
    positive: np.ndarray
    negative: np.ndarray
    num_positive: int
    num_negative: int


@dataclass
class ThresholdFit:
    """DTO result for one code length: Gaussian fits (Eq. 7), threshold and F_beta (Eq. 8)."""

    length: int
    threshold: int
    f_beta: float
    beta: float
    rho: float
    pos_mean: float
    pos_std: float
    neg_mean: float
    neg_std: float
    num_pos: int
    num_neg: int
    recall: float  # Phi_r(t): expected fraction of true matches kept as candidates
    neg_rate: float  # Phi_n(t): expected fraction of non-matches kept as candidates
    curve: np.ndarray = field(repr=False)  # F_beta(t) for t = 0 .. length

    def to_dict(self) -> dict:
        """JSON-ready summary (without the curve)."""
        return {
            "length": self.length,
            "threshold": self.threshold,
            "f_beta": self.f_beta,
            "beta": self.beta,
            "rho": self.rho,
            "pos_mean": self.pos_mean,
            "pos_std": self.pos_std,
            "neg_mean": self.neg_mean,
            "neg_std": self.neg_std,
            "num_pos": self.num_pos,
            "num_neg": self.num_neg,
            "recall": self.recall,
            "neg_rate": self.neg_rate,
        }


def gaussian_cdf(t: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Eq. 7 (right): ``Phi(t) = (1 + erf((t - mean) / (std sqrt 2))) / 2``, elementwise."""
    z = (np.asarray(t, dtype=np.float64) - mean) / (std * math.sqrt(2.0))
    return 0.5 * (1.0 + np.asarray(np.frompyfunc(math.erf, 1, 1)(z), dtype=np.float64))


def f_beta_curve(length: int, pos_mean: float, pos_std: float, neg_mean: float, neg_std: float,
                 beta: float = 2.0, rho: float = 1.0) -> np.ndarray:
    """``F_beta(t) = (1 + b^2) Phi_r(t) / (b^2 + Phi_r(t) + rho Phi_n(t))`` for ``t = 0 .. length`` (Eq. 8).

    See the module docstring for the derivation from Eq. 6 and how it relates to the printed Eq. 8.
    """
    t = np.arange(int(length) + 1, dtype=np.float64)
    phi_r = gaussian_cdf(t, pos_mean, pos_std)
    phi_n = gaussian_cdf(t, neg_mean, neg_std)
    b2 = float(beta) ** 2
    return (1.0 + b2) * phi_r / (b2 + phi_r + rho * phi_n)


def _check_beta_rho(beta, rho) -> None:
    if not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise CtfreidError(f"beta must be a finite number > 0, got {beta!r}")
    if rho != "auto" and (not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho <= 0):
        raise CtfreidError(f"rho must be a finite number > 0 or 'auto', got {rho!r}")


def fit_threshold(pos_distances: np.ndarray, neg_distances: np.ndarray, length: int,
                  beta: float = 2.0, rho: float | str = 1.0) -> ThresholdFit:
    """Fit Gaussians to relevant / non-relevant pair distances (Eq. 7) and maximise F_beta (Eq. 8).

    ``rho="auto"`` uses ``len(neg_distances) / len(pos_distances)`` (pass a number to use other counts).
    Returns the integer threshold in ``[0, length]`` with the highest F_beta (the smallest one on ties).
    Raises ``ValueError`` for an empty or constant distance set, or a bad beta / rho.
    """
    length = check_length(length)
    _check_beta_rho(beta, rho)
    pos = np.asarray(pos_distances, dtype=np.float64).ravel()
    neg = np.asarray(neg_distances, dtype=np.float64).ravel()
    for name, d in (("relevant (same identity)", pos), ("non-relevant (different identity)", neg)):
        if d.size == 0:
            raise CtfreidError(f"{length}-bit codes: no {name} pairs to fit a Gaussian to")
        if d.size < 2 or float(d.std()) == 0.0:
            raise CtfreidError(
                f"{length}-bit codes: all {d.size} {name} pair distances equal {d[0]:g}; "
                "a Gaussian needs at least two different values (are the codes constant?)"
            )
    rho_value = neg.size / pos.size if rho == "auto" else float(rho)
    pm, ps, nm, ns = float(pos.mean()), float(pos.std()), float(neg.mean()), float(neg.std())
    curve = f_beta_curve(length, pm, ps, nm, ns, beta, rho_value)
    t = int(np.argmax(curve))
    return ThresholdFit(
        length=length, threshold=t, f_beta=float(curve[t]), beta=float(beta), rho=rho_value,
        pos_mean=pm, pos_std=ps, neg_mean=nm, neg_std=ns, num_pos=int(pos.size), num_neg=int(neg.size),
        recall=float(gaussian_cdf(t, pm, ps)), neg_rate=float(gaussian_cdf(t, nm, ns)), curve=curve,
    )


if hasattr(np, "bitwise_count"):  # numpy >= 2.0
    _popcount = np.bitwise_count
else:  # pragma: no cover - older numpy
    _POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _POPCOUNT8[x]


def _paired_distances(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray,
                      chunk: int = 1 << 16) -> np.ndarray:
    """Hamming distances between rows ``a[i[k]]`` and ``b[j[k]]`` (one per pair), in chunks."""
    out = np.empty(i.size, dtype=np.int32)
    for s in range(0, i.size, chunk):
        x = np.bitwise_xor(a[i[s:s + chunk]], b[j[s:s + chunk]])
        out[s:s + chunk] = _popcount(x).sum(axis=1, dtype=np.int32)
    return out


def _positive_pairs(pids: np.ndarray, camids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """All ``i < j`` with equal pid (and different camid when given), pid -1 excluded."""
    order = np.argsort(pids, kind="stable")
    sorted_pids = pids[order]
    starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    ends = np.r_[starts[1:], sorted_pids.size]
    ii, jj = [], []
    for s, e in zip(starts, ends):  # one loop step per identity, vectorised inside
        if e - s < 2 or sorted_pids[s] == -1:
            continue
        members = np.sort(order[s:e])
        a, b = np.triu_indices(e - s, 1)
        a, b = members[a], members[b]
        if camids is not None:
            cross = camids[a] != camids[b]
            a, b = a[cross], b[cross]
        ii.append(a)
        jj.append(b)
    if not ii:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)


def _negative_pairs(pids: np.ndarray, max_pairs: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs with different pids (pid -1 excluded) and their total count.

    All of them when they fit in ``max_pairs``; otherwise ``max_pairs`` pairs drawn uniformly (with
    replacement) without rejection: draw ``i`` with weight ``#items of another pid``, then ``j`` uniformly
    among the items of another pid, so every ordered pair has probability ``1 / #pairs``.
    """
    valid = np.flatnonzero(pids != -1)
    vp = pids[valid]
    _, inverse, counts = np.unique(vp, return_inverse=True, return_counts=True)
    n = valid.size
    total = int((n * (n - 1) - int((counts * (counts - 1)).sum())) // 2)
    if total <= max_pairs and n * (n - 1) // 2 <= 4 * max_pairs:
        a, b = np.triu_indices(n, 1)
        keep = vp[a] != vp[b]
        return valid[a[keep]], valid[b[keep]], total
    order = np.argsort(inverse, kind="stable")  # valid items grouped by identity
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    weights = (n - counts[inverse]).astype(np.float64)
    i = rng.choice(n, size=max_pairs, p=weights / weights.sum())
    g = inverse[i]
    u = (rng.random(max_pairs) * (n - counts[g])).astype(np.int64)
    u = np.minimum(u, n - counts[g] - 1)  # guard the float edge case u == upper bound
    j = order[np.where(u < starts[g], u, u + counts[g])]  # skip the block of i's own identity
    a, b = np.minimum(i, j), np.maximum(i, j)
    return valid[a], valid[b], total


def pair_distances(codes: Mapping[int, np.ndarray], pids: np.ndarray, camids: np.ndarray | None = None,
                   max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0,
                   lengths: list[int] | None = None) -> dict[int, PairDistances]:
    """Hamming distances of relevant / non-relevant validation pairs per length (Alg. 1, lines 2-4).

    ``lengths`` defaults to every length but the longest (the ones that need a threshold). The same pairs
    are used for every length. Raises ``ValueError`` when there is no relevant or no non-relevant pair.
    """
    codes = check_code_set(codes, "validation codes")
    n = next(iter(codes.values())).shape[0]
    pids = np.asarray(pids)
    if pids.shape != (n,) or not np.issubdtype(pids.dtype, np.integer):
        raise CtfreidError(f"pids must be an integer array of {n} entries, got {pids.dtype} {pids.shape}")
    if camids is not None:
        camids = np.asarray(camids)
        if camids.shape != (n,) or not np.issubdtype(camids.dtype, np.integer):
            raise CtfreidError(f"camids must be an integer array of {n} entries, got {camids.dtype} {camids.shape}")
    if int(max_pairs) < 1:
        raise CtfreidError(f"max_pairs must be >= 1, got {max_pairs!r}")
    all_lengths = sorted(codes)
    lengths = all_lengths[:-1] if lengths is None else sorted(int(L) for L in lengths)
    missing = [L for L in lengths if L not in codes]
    if missing:
        raise CtfreidError(f"validation codes have no length(s) {missing}; they have {all_lengths}")
    if not lengths:
        raise CtfreidError(f"DTO needs at least two code lengths (thresholds for all but the longest); got {all_lengths}")

    labelled = pids[pids != -1]
    ids = np.unique(labelled)
    if ids.size < 2:
        raise CtfreidError(
            f"validation set has {count(ids.size, 'identity', 'identities')} among {labelled.size} "
            "labelled items (pid -1 ignored): DTO needs at least two identities for non-relevant pairs"
        )
    rng = np.random.default_rng(seed)
    pi, pj = _positive_pairs(pids, camids)
    num_pos = pi.size
    if num_pos == 0:
        where = " from different cameras" if camids is not None else ""
        raise CtfreidError(
            f"validation set has no relevant pairs (two images of the same pid{where}) among "
            f"{count(labelled.size, 'labelled item', 'labelled items')} of {count(ids.size, 'identity', 'identities')}: "
            "DTO needs same-identity pairs"
        )
    if num_pos > max_pairs:
        pick = np.sort(rng.choice(num_pos, size=int(max_pairs), replace=False))
        pi, pj = pi[pick], pj[pick]
    ni, nj, num_neg = _negative_pairs(pids, int(max_pairs), rng)
    out = {}
    for L in lengths:
        c = codes[L]
        out[L] = PairDistances(L, _paired_distances(c, c, pi, pj), _paired_distances(c, c, ni, nj),
                               int(num_pos), int(num_neg))
    return out


def fits_from_distances(distances: Mapping[int, PairDistances], beta: float = 2.0,
                        rho: float | str = 1.0) -> dict[int, ThresholdFit]:
    """``fit_threshold`` for each length; ``rho="auto"`` uses the real (not subsampled) pair-count ratio."""
    _check_beta_rho(beta, rho)
    fits = {}
    for L in sorted(distances):
        d = distances[L]
        r = d.num_negative / d.num_positive if rho == "auto" else rho
        fits[L] = fit_threshold(d.positive, d.negative, L, beta, r)
    return fits


def fit_dto(codes: Mapping[int, np.ndarray], pids: np.ndarray, camids: np.ndarray | None = None,
            beta: float = 2.0, rho: float | str = 1.0, max_pairs: int = DEFAULT_MAX_PAIRS,
            seed: int = 0) -> dict[int, ThresholdFit]:
    """Algorithm 1 with full per-length reports: ``{length: ThresholdFit}`` for all but the longest."""
    _check_beta_rho(beta, rho)
    return fits_from_distances(pair_distances(codes, pids, camids, max_pairs, seed), beta, rho)


def fit_thresholds(codes: Mapping[int, np.ndarray], pids: np.ndarray, camids: np.ndarray | None = None,
                   beta: float = 2.0, rho: float | str = 1.0, max_pairs: int = DEFAULT_MAX_PAIRS,
                   seed: int = 0) -> dict[int, int]:
    """Algorithm 1: DTO thresholds ``{length: t}`` for every length but the longest (Eqs. 6-8)."""
    return {L: f.threshold for L, f in fit_dto(codes, pids, camids, beta, rho, max_pairs, seed).items()}


# --- thresholds on the command line and on disk -------------------------------------------------------

THRESHOLDS_FORM = ("LENGTH=DISTANCE pairs separated by commas (e.g. 32=9,128=41,512=190) "
                   "or a .json file written by 'ctfreid calibrate'")


def parse_thresholds(text: str) -> dict[int, int]:
    """Parse ``"32=9,128=41,512=190"`` into ``{32: 9, 128: 41, 512: 190}``; ``ValueError`` otherwise."""
    out: dict[int, int] = {}
    try:
        for item in str(text).split(","):
            key, value = item.split("=")
            length = int(key.strip())
            if length in out:
                raise CtfreidError(f"thresholds: {length}= is given twice in {text!r}")
            out[length] = int(value.strip())
    except CtfreidError:
        raise
    except ValueError:
        raise CtfreidError(f"thresholds: expected {THRESHOLDS_FORM}; got {text!r}") from None
    if not out:
        raise CtfreidError(f"thresholds: expected {THRESHOLDS_FORM}; got {text!r}")
    return out


def _from_mapping(obj, label: str, weighting: Weighting | None = None) -> dict[int, int]:
    """The thresholds of ``obj``; ``weighting``: the Weighting they were fitted with (their weighted lengths'
    thresholds are weighted distances)."""
    if isinstance(obj, Mapping) and "thresholds" in obj:
        obj = obj["thresholds"]
    try:
        if not isinstance(obj, Mapping) or not obj:
            raise TypeError
        out = {}
        for k, v in obj.items():
            out[int(k)] = v
        maxima = weighting.maxima(min(out)) if weighting is not None and out else None
        check_thresholds(out, list(out) + [max(out) + 1], maxima=maxima)  # values: integers in [0, L]
        return {L: int(v) for L, v in out.items()}
    except CtfreidError as e:
        raise CtfreidError(f"{label}: {e}") from None
    except (TypeError, ValueError):
        raise CtfreidError(f"{label}: expected a JSON object {{\"thresholds\": {{\"32\": 9, ...}}}}") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise CtfreidError(f"key {repeated[0]!r} is given twice")
    return dict(pairs)


def _thresholds_file(spec: str | os.PathLike) -> dict | list | None:
    """The parsed JSON of a thresholds file ``spec``, or None when ``spec`` is a ``"32=9,128=41"`` list; a
    spec ending in ``.json`` must be an existing file of JSON."""
    spec_s = str(spec)
    path = Path(spec_s)
    if not (spec_s.endswith(".json") or ("=" not in spec_s and path.is_file())):
        return None
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {spec_s}: no such file")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CtfreidError) as e:
        raise CtfreidError(f"thresholds file {spec_s}: not readable JSON ({e})") from None


WEIGHTED_SECTION = "weighted_stage1"  # a thresholds file's fit for a weighted stage 1, beside its Hamming one


@dataclass(frozen=True)
class ThresholdsFile:
    """What a thresholds spec holds: Hamming thresholds (any query), and those of a weighted stage 1 with
    their :class:`~ctfreid.search.asymmetric.Weighting` (queries with real values) when it was fitted.

    ``ctfreid calibrate`` writes both (``weighted`` in the ``"weighted_stage1"`` entry). A file written by
    ``calibrate --weighted`` before that holds only the weighted fit (``hamming`` None)."""

    hamming: dict[int, int] | None
    weighted: dict[int, int] | None = None
    weighting: Weighting | None = None

    @property
    def weighted_fit(self) -> WeightedFit | None:
        """``weighted`` and ``weighting`` as one :class:`~ctfreid.search.asymmetric.WeightedFit`, or None."""
        return None if self.weighted is None else WeightedFit(self.weighted, self.weighting)

    def hamming_thresholds(self, spec: str | os.PathLike) -> dict[int, int]:
        """The Hamming thresholds; a file (``spec``) that holds only a weighted fit (an older ``calibrate
        --weighted``) is refused: its first threshold is not a Hamming distance."""
        if self.hamming is None:
            raise CtfreidError(f"thresholds file {spec} holds only a fit for a weighted stage 1 (an older 'ctfreid "
                               "calibrate --weighted'): Hamming thresholds are needed here; calibrate again (its "
                               "file holds both)")
        return self.hamming


def read_thresholds_file(spec: str | os.PathLike) -> ThresholdsFile:
    """Thresholds from ``"32=9,128=41"`` or a JSON file (``{"thresholds": {"32": 9, ...}}``, a plain ``{"32": 9,
    ...}``, or ``ctfreid calibrate``'s file with its ``"weighted_stage1"`` entry). A spec ending in ``.json``
    must be an existing file. Every fit in it is checked (:func:`check_thresholds` for its own lengths)."""
    obj = _thresholds_file(spec)
    if obj is None:
        return ThresholdsFile(parse_thresholds(str(spec)))
    label = f"thresholds file {spec}"
    if isinstance(obj, dict) and "weights" in obj:  # only a weighted fit: its first threshold is weighted
        weighting = Weighting.from_dict(obj["weights"], f"{label}: 'weights'")
        return ThresholdsFile(None, _from_mapping(obj, label, weighting), weighting)
    hamming = _from_mapping(obj, label)
    section = obj.get(WEIGHTED_SECTION) if isinstance(obj, dict) else None
    if section is None:
        return ThresholdsFile(hamming)
    where = f"{label}: '{WEIGHTED_SECTION}'"
    if not isinstance(section, dict) or "weights" not in section or "thresholds" not in section:
        raise CtfreidError(f"{where}: expected an object {{\"thresholds\": {{...}}, \"weights\": {{...}}}}")
    weighting = Weighting.from_dict(section["weights"], f"{where}: 'weights'")
    weighted = _from_mapping(section, where, weighting)
    if sorted(weighted) != sorted(hamming):
        raise CtfreidError(f"{where}: thresholds for lengths {sorted(weighted)}, the Hamming ones for {sorted(hamming)}")
    unthresholded = sorted(set(weighting.later) - set(weighted))
    if unthresholded:
        raise CtfreidError(f"{where}: 'weights' weight lengths {unthresholded} that have no threshold "
                           f"(the thresholds' lengths: {sorted(weighted)})")
    return ThresholdsFile(hamming, weighted, weighting)


def read_thresholds(spec: str | os.PathLike) -> dict[int, int]:
    """The Hamming thresholds of a spec (:func:`read_thresholds_file`, :meth:`ThresholdsFile.hamming_thresholds`)."""
    return read_thresholds_file(spec).hamming_thresholds(spec)


def check_thresholds(thresholds: Mapping[int, int], lengths: Sequence[int],
                     maxima: Mapping[int, int] | None = None) -> dict[int, int]:
    """The one contract for CtF thresholds (Sec. 3.1): a mapping with exactly one threshold per code
    length but the longest, each an integer distance in ``[0, length]`` -> ``{length: t}`` sorted.
    ``maxima``: the bounds of some lengths' thresholds instead of their lengths (weighted stages,
    ``ctfreid.search.asymmetric``: ``Weighting.maxima``).

    Keys may be ints or their strings (JSON); values ints (or floats with an integral value, such as
    ``9.0``). Anything else (``9.7``, ``true``, ``inf``, a threshold above its length, a missing or extra
    length) is a :class:`~ctfreid.errors.CtfreidError` naming the length.
    """
    if not isinstance(thresholds, Mapping):
        raise CtfreidError(f"thresholds must be a dict {{length: int}}, got {type(thresholds).__name__}")
    lengths = sorted(int(L) for L in lengths)
    th: dict[int, int] = {}
    for key, t in thresholds.items():
        if isinstance(key, (bool, np.bool_)):
            raise CtfreidError(f"thresholds keys must be code lengths in bits, got {key!r}")
        try:
            L = int(key)
        except (TypeError, ValueError):
            raise CtfreidError(f"thresholds keys must be code lengths in bits, got {key!r}") from None
        if L in th:
            raise CtfreidError(f"thresholds give the {L}-bit code twice")
        integral = isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))
        if not integral and isinstance(t, (float, np.floating)) and math.isfinite(t) and float(t).is_integer():
            integral, t = True, int(t)
        if not integral:
            raise CtfreidError(f"thresholds[{L}] must be an integer Hamming distance in [0, {L}], got {t!r}")
        th[L] = int(t)
    need = lengths[:-1]
    missing, extra = sorted(set(need) - set(th)), sorted(set(th) - set(need))
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else ""]
        raise CtfreidError(f"thresholds must give one value for every code length but the longest {need}: "
                           + ", ".join(p for p in parts if p))
    for L, t in th.items():
        hi = maxima.get(L, L) if maxima else L
        if not 0 <= t <= hi:
            kind = "weighted" if hi != L else "Hamming"
            raise CtfreidError(f"thresholds[{L}] must be an integer {kind} distance in [0, {hi}], got {t}")
    return dict(sorted(th.items()))


def threshold_array(thresholds: Mapping[int, int], lengths: Sequence[int],
                    maxima: Mapping[int, int] | None = None) -> np.ndarray:
    """:func:`check_thresholds` as the kernels' ``int64`` array, shortest length first (one dummy entry for
    a single length)."""
    th = check_thresholds(thresholds, lengths, maxima)
    out = np.zeros(max(len(th), 1), np.int64)
    out[: len(th)] = list(th.values())
    return out


def save_thresholds(path: str | os.PathLike, fits: Mapping[int, ThresholdFit], extra: dict | None = None) -> None:
    """Write ``{"thresholds": {"32": t, ...}, "beta": .., "rho": .., "fits": {...}}`` atomically."""
    first = next(iter(fits.values()))
    obj = {
        "thresholds": {str(L): f.threshold for L, f in sorted(fits.items())},
        "beta": first.beta,
        "rho": first.rho,
        "fits": {str(L): f.to_dict() for L, f in sorted(fits.items())},
    }
    obj.update(extra or {})
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
