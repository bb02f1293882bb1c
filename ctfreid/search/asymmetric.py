"""Asymmetric first stage: the query's shortest code with a weight per bit (an extension of Sec. 3.1).

The gallery stores binary codes only; a query is encoded on the spot, so its real values ``bn(v_1)``
(Eq. 2 before the sign) are at hand. A bit whose value is near 0 is a coin flip, one far from 0 is
reliable. Weighting each differing bit by the query's confidence, ``d_w(q, g) = sum_i w_i [q_i != g_i]``
with ``w_i`` a quantised ``|bn(v_1)_i|``, is the asymmetric distance of hashing (Gordo et al., "Asymmetric
distances for binary embeddings", TPAMI 2014), and it ranks by ``-<bn(v_1), sgn(g)>`` up to the
quantisation. CtF uses it for stage 1 by default: the shortest code is where the sign throws most away.
Any later stage may be weighted too (``query_weights={length: weights}``, ``Weighting.later``): it keeps
fewer candidates, and each row it ranks costs 3 more AND + popcount a word. On the CUHK03 dev runs it made
one query at 10^6 items faster in most runs, but its thresholds held their accuracy less well from the
validation split to the test split, so it is an option, not the default (``docs/results-cuhk03.md``).

Weights are small integers (``bits`` bits each, at most 4), so a distance is a few AND + popcount
instructions, and stage-1 thresholds stay integers (in units of one weight step: a code of L bits has
weighted distances in ``[0, L * (2 ** bits - 1)]``). ``scale`` maps ``|bn(v_1)|`` to the top weight; it
is fitted once on validation queries (:func:`weight_scale`) and stored with the thresholds, so that a
distance means the same for every query.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.hamming import _aligned, prepare_gallery, prepare_queries

MAX_WEIGHT_BITS = _kernels.WEIGHT_PLANES  # weights in [0, 15]
# the best of 2-4 bits on seven CUHK03 dev runs (docs/results-cuhk03.md, "A weighted (asymmetric) stage 1"),
# and the bits of the default calibration's weighted fit (ctfreid.eval.calibration.default_weighted_fit)
DEFAULT_WEIGHT_BITS = 4
DEFAULT_SCALE_QUANTILE = 0.99


def _values(values: np.ndarray, name: str = "values") -> np.ndarray:
    v = np.asarray(values)
    if v.ndim not in (1, 2) or v.shape[-1] == 0 or not np.issubdtype(v.dtype, np.floating):
        raise CtfreidError(f"{name} must be a float array [n, L] (or [L]) of the shortest code's bn(v), "
                           f"got {v.dtype} {v.shape}")
    if not np.isfinite(v).all():
        raise CtfreidError(f"{name} must be finite (no NaN or inf)")
    return v


def weight_scale(values: np.ndarray, quantile: float = DEFAULT_SCALE_QUANTILE) -> float:
    """The ``scale`` of :func:`bit_weights` fitted on validation queries' ``bn(v_1)`` (float [n, L]): the
    ``quantile`` of ``|bn(v_1)|`` over all their bits, so that only the top 1 % of values saturate."""
    v = _values(values)
    if not 0 < quantile <= 1:
        raise CtfreidError(f"quantile must be in (0, 1], got {quantile!r}")
    s = float(np.quantile(np.abs(v), quantile))
    if not s > 0:
        raise CtfreidError("values are all zero: no weight scale can be fitted")
    return s


def bit_weights(values: np.ndarray, scale: float, bits: int = DEFAULT_WEIGHT_BITS) -> np.ndarray:
    """Integer bit weights ``uint8[n, L]`` (or ``[L]``) of queries' ``bn(v_1)`` values:
    ``w_i = min(floor(|v_i| / scale * (2 ** bits - 1) + 1/2), 2 ** bits - 1)`` (halves round up).

    ``bits=1`` weighs the bits from ``scale / 2`` on 1 and ignores the others (a masked Hamming distance);
    with every weight 1 the weighted distance is the Hamming distance.
    """
    return Weighting(scale=scale, bits=bits).weights(values)


@dataclass(frozen=True)
class Weighting:
    """How queries' ``bn(v)`` values become bit weights (:func:`bit_weights`): ``scale`` of the shortest code
    (fitted on validation queries, :func:`weight_scale`), ``bits`` per weight, and ``later``: the scales of
    any longer lengths weighted too (``{length: scale}``; empty: stage 1 alone). Stored with the thresholds it
    was fitted with (the ``"weights"`` entry of a thresholds file, ``CtFIndex.weighting``), since their
    thresholds at the weighted lengths are in its units."""

    scale: float
    bits: int = DEFAULT_WEIGHT_BITS
    later: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral) \
                or not 1 <= self.bits <= MAX_WEIGHT_BITS:
            raise CtfreidError(f"weights: bits must be an integer in [1, {MAX_WEIGHT_BITS}], got {self.bits!r}")
        _check_scale(self.scale, "scale")
        if not isinstance(self.later, Mapping):
            raise CtfreidError(f"weights: later must be a mapping {{length: scale}}, got {self.later!r:.80}")
        later = {}
        for key, scale in self.later.items():
            try:
                L = int(key)
            except (TypeError, ValueError):
                L = None
            if isinstance(key, (bool, np.bool_)) or L is None or str(L) != str(key).strip() or L <= 0 or L % 64:
                raise CtfreidError(f"weights: later keys must be code lengths, multiples of 64 bits, got {key!r}")
            _check_scale(scale, f"later[{L}]")
            later[L] = float(scale)
        object.__setattr__(self, "later", dict(sorted(later.items())))

    def weights(self, values: np.ndarray) -> np.ndarray:
        """``uint8`` bit weights of queries' ``bn(v_1)`` (:func:`bit_weights`)."""
        return self._quantise(_values(values), self.scale)

    def _quantise(self, v: np.ndarray, scale: float) -> np.ndarray:
        top = (1 << int(self.bits)) - 1
        return np.minimum(np.floor(np.abs(v) / float(scale) * top + 0.5), top).astype(np.uint8)

    def query_weights(self, values: np.ndarray, later_values: Mapping[int, np.ndarray] | None = None
                      ) -> np.ndarray | dict[int, np.ndarray]:
        """The ``query_weights`` of a search: :meth:`weights` of the shortest code's ``values`` (an array) when
        only stage 1 is weighted, else ``{length: weights}`` for the shortest length and every length of
        :attr:`later`, whose values come from ``later_values`` (``{length: float [n, length]}``,
        ``EncodedSet.later_values``); a missing one is a CtfreidError naming it."""
        first = self.weights(values)
        if not self.later:
            return first
        v1 = np.asarray(values)
        out = {v1.shape[-1]: first}
        for L, scale in self.later.items():
            v = None if later_values is None else later_values.get(L)
            if v is None:
                raise CtfreidError(f"these weights weight the {L}-bit code too: the queries need its values "
                                   f"(values_{L}, bn(v) of the {L}-bit code; 'ctfreid encode' writes them)")
            v = _values(v, f"values_{L}")
            if v.shape[-1] != L or v.shape[:-1] != v1.shape[:-1]:
                raise CtfreidError(f"values_{L} must be float [{', '.join(map(str, v1.shape[:-1] + (L,)))}], "
                                   f"got {v.shape}")
            out[L] = self._quantise(v, scale)
        return out

    def lengths(self, first: int) -> list[int]:
        """The lengths it weights, for codes whose shortest length is ``first``."""
        return [first, *self.later]

    def stages(self, first: int) -> str:
        """What it weights, in words (:func:`weighted_stages`)."""
        return weighted_stages(self.lengths(first))

    def maxima(self, first: int) -> dict[int, int]:
        """The largest weighted distance of each length it weights (``check_thresholds``' ``maxima``)."""
        return {L: max_distance(L) for L in self.lengths(first)}

    def to_dict(self) -> dict:
        return {"bits": int(self.bits), "scale": float(self.scale),
                **({"later": {str(L): s for L, s in self.later.items()}} if self.later else {})}

    @classmethod
    def from_dict(cls, obj: object, where: str = "weights") -> Weighting:
        """From ``{"bits": b, "scale": s[, "later": {"128": s128, ...}]}``; anything else is a
        :class:`CtfreidError` naming ``where``."""
        if not isinstance(obj, Mapping) or set(obj) - {"bits", "scale", "later"} or "scale" not in obj:
            raise CtfreidError(f"{where} must be an object {{\"bits\": int, \"scale\": number[, \"later\": "
                               f"{{length: number}}]}}, got {obj!r:.80}")
        try:
            return cls(scale=obj["scale"], bits=obj.get("bits", DEFAULT_WEIGHT_BITS), later=obj.get("later", {}))
        except CtfreidError as e:
            raise CtfreidError(f"{where}: {e}") from None


def weighted_stages(lengths: list[int]) -> str:
    """``"weighted stage 1"`` for the shortest length alone, else ``"weighted 32/128-bit stages"``."""
    return "weighted stage 1" if len(lengths) == 1 else f"weighted {'/'.join(map(str, lengths))}-bit stages"


def _check_scale(scale, name: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise CtfreidError(f"weights: {name} must be a positive number, got {scale!r}")


class WeightedFit(NamedTuple):
    """CtF thresholds fitted with weighted stages (Sec. 3.1; those of the lengths the :class:`Weighting` weights
    bound weighted distances) and that Weighting: the default of searches by queries with real values."""

    thresholds: dict[int, int]
    weighting: Weighting


def check_weights(weights: np.ndarray, nq: int, length: int, name: str = "query_weights") -> np.ndarray:
    """``weights`` as ``uint8[nq, length]`` in ``[0, 2 ** MAX_WEIGHT_BITS - 1]`` (a 1-D row for one query),
    else a :class:`CtfreidError` naming the shape or value expected."""
    w = np.asarray(weights)
    if w.ndim == 1:
        w = w[None, :]
    if w.dtype == np.uint8 and w.shape == (nq, length):  # the common case, without issubdtype (~1 us a search)
        return w
    if w.shape != (nq, length) or not np.issubdtype(w.dtype, np.integer) or w.dtype == np.bool_:
        raise CtfreidError(f"{name} must be integers [{nq}, {length}] (one weight per bit of the {length}-bit "
                           f"query codes), got {w.dtype} {w.shape}")
    if w.dtype != np.uint8:
        if w.size and (w.min() < 0 or w.max() > 255):
            _out_of_range(name, w)
        w = w.astype(np.uint8)
    return w


def _out_of_range(name: str, w: np.ndarray) -> None:
    raise CtfreidError(f"{name} must be in [0, {(1 << MAX_WEIGHT_BITS) - 1}], got values in [{w.min()}, {w.max()}]")


def weight_planes(weights: np.ndarray, name: str = "query_weights") -> np.ndarray:
    """The kernels' form of ``uint8[nq, L]`` weights (:func:`check_weights`): ``uint32[nq, WEIGHT_PLANES,
    L // 32]``, plane ``b`` holding bit ``b`` of every weight, packed like the codes (``numpy.packbits``
    order); a weight above ``2 ** MAX_WEIGHT_BITS - 1`` is a :class:`CtfreidError` naming ``name``."""
    nq, L = weights.shape
    out = np.zeros((nq, MAX_WEIGHT_BITS, L // 32), np.uint32)
    if _kernels.weight_planes(np.ascontiguousarray(weights), out) >= 1 << MAX_WEIGHT_BITS:
        _out_of_range(name, weights)
    return out


def query_planes(weights: np.ndarray, nq: int, length: int, name: str = "query_weights") -> np.ndarray:
    """Checked weights of ``nq`` queries' ``length``-bit first codes in the kernels' form (:func:`check_weights`,
    :func:`weight_planes`); the codes' length must be a multiple of 32 bits (the kernels' words)."""
    if length % 32:
        raise CtfreidError(f"{name} need a first code of a multiple of 32 bits, got {length}")
    return weight_planes(check_weights(weights, nq, length, name), name)


def max_distance(length: int) -> int:
    """The largest weighted distance of ``length``-bit codes (every weight at its top)."""
    return length * ((1 << MAX_WEIGHT_BITS) - 1)


def check_query_weights(weights, nq: int, lengths: list[int], name: str = "query_weights"
                        ) -> np.ndarray | dict[int, np.ndarray]:
    """``query_weights`` of a CtF search over code ``lengths`` (shortest first), checked: an array weights the
    shortest code (``uint8 [nq, L1]``, :func:`check_weights`); a mapping ``{length: weights}`` weights any of
    the lengths (``uint8 [nq, L]`` each; the shortest a multiple of 32 bits, the later ones of 64: the
    kernels' words). Returns the same form with ``uint8`` arrays; else a CtfreidError naming what is wrong."""
    if not isinstance(weights, Mapping):
        if lengths[0] % 32:
            raise CtfreidError(f"{name} need a first code of a multiple of 32 bits, got {lengths[0]}")
        return check_weights(weights, nq, lengths[0], name)
    if not weights:
        raise CtfreidError(f"{name} must weight at least one code length, got an empty mapping")
    out: dict[int, np.ndarray] = {}
    for key, w in weights.items():
        L = int(key) if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)) else None
        if L not in lengths:
            raise CtfreidError(f"{name} keys must be code lengths of the index {lengths}, got {key!r}")
        if L % (32 if L == lengths[0] else 64):
            raise CtfreidError(f"{name}[{L}]: a weighted {'first' if L == lengths[0] else 'later'} code must be a "
                               f"multiple of {32 if L == lengths[0] else 64} bits")
        out[L] = check_weights(w, nq, L, f"{name}[{L}]")
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class StageWeights:
    """Checked query weights in the kernels' form: ``first``, the planes of the shortest code (``uint32 [nq,
    WEIGHT_PLANES, L1 // 32]``) or None; ``later``, the kernels' ``Pr`` (``_kernels._later_dist``): the planes
    of the later stages (``uint64 [nq, WEIGHT_PLANES, words]``, in the columns of the later query words, a
    stage without weights at weight 1 on every bit) and which stages are weighted (``int64 [S]``), or None;
    ``maxima``, the largest distance of each weighted length."""

    first: np.ndarray | None
    later: tuple[np.ndarray, np.ndarray] | None
    maxima: dict[int, int]

    def rows(self, a: int, b: int) -> StageWeights:
        """The weights of queries ``a .. b - 1``."""
        return StageWeights(None if self.first is None else self.first[a:b],
                            None if self.later is None else (self.later[0][a:b], self.later[1]), self.maxima)

    def kernel_tail(self) -> tuple:
        """The kernels' trailing ``P1, Lw[, Pr]`` (no ``Pr`` without weighted later stages: the kernels compiled
        for a weighted stage 1 alone)."""
        lw = self.maxima[min(self.maxima)] if self.first is not None else 0
        return (self.first, lw) if self.later is None else (self.first, lw, self.later)

    def stage_maxima(self, lengths: list[int]) -> np.ndarray:
        """The kernels' ``Ls`` for weighted later stages: each stage's largest distance (the first stays its
        length: its largest distance travels as ``Lw``)."""
        return np.array([L if s == 0 else self.maxima.get(L, L) for s, L in enumerate(lengths)], np.int64)


def stage_weights(weights, nq: int, lengths: list[int], name: str = "query_weights") -> StageWeights | None:
    """:func:`check_query_weights`, then the planes of :class:`StageWeights` (None without weights)."""
    if weights is None:
        return None
    w = check_query_weights(weights, nq, lengths, name)
    w = {lengths[0]: w} if not isinstance(w, dict) else w
    first = weight_planes(w[lengths[0]], name) if lengths[0] in w else None
    later = None
    if len(w) > (lengths[0] in w):  # a later length is weighted (w's keys are lengths of the index)
        qoff = _kernels.stage_offsets(lengths)
        planes = np.zeros((nq, MAX_WEIGHT_BITS, int(qoff[-1])), np.uint64)
        for s, L in enumerate(lengths[1:]):
            cols = slice(int(qoff[s]), int(qoff[s + 1]))
            if L in w:
                planes[:, :, cols] = weight_planes(w[L], f"{name}[{L}]").view(np.uint64)
            else:  # weight 1 on every bit: the Hamming distance
                planes[:, 0, cols] = np.uint64(0xFFFFFFFFFFFFFFFF)
        later = (planes, np.array([0] + [L in w for L in lengths[1:]], np.int64))
    return StageWeights(first, later, {L: max_distance(L) for L in w})


def _prepare(queries: np.ndarray, weights: np.ndarray, gallery: np.ndarray):
    g = prepare_gallery(gallery, "gallery")
    q, single = prepare_queries(queries, g.shape[1], "queries")
    planes = query_planes(weights, q.shape[0], g.shape[1] * 8, "weights")
    return _kernels.words32(q), planes, _kernels.words32(_aligned(g)), single


def weighted_distances(queries: np.ndarray, weights: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``int32[nq, n]`` weighted distances ``sum_i w_i [q_i != g_i]`` between packed query codes
    ``uint8[nq, L // 8]`` with weights ``uint8[nq, L]`` and packed gallery codes ``uint8[n, L // 8]``
    (L a multiple of 32); 1-D query and weights give a 1-D row."""
    Q, P, G, single = _prepare(queries, weights, gallery)
    out = np.empty((Q.shape[0], G.shape[0]), np.int32)
    _kernels.weighted_distances(Q, P, G, out)
    return out[0] if single else out


def weighted_rank(queries: np.ndarray, weights: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full rankings by the weighted distance, ``(D int32[nq, n], I int64[nq, n])``: stable counting sort,
    ties keep gallery order (as :func:`ctfreid.search.hamming.hamming_rank`)."""
    Q, P, G, single = _prepare(queries, weights, gallery)
    D = np.empty((Q.shape[0], G.shape[0]), np.int32)
    I = np.empty((Q.shape[0], G.shape[0]), np.int64)
    _kernels.weighted_rank(Q, P, G, max_distance(G.shape[1] * 32), D, I)
    return (D[0], I[0]) if single else (D, I)
