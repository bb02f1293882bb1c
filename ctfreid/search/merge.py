"""Hits with their coarse-to-fine sort key, and the exact merge of several indexes' hits (shards).

Coarse-to-fine search (Sec. 3.1, Fig. 1) ranks the gallery by the shortest code, then re-ranks, stably, the
candidates within each threshold by the next longer code. The final order is therefore a total order by a
key that each item has on its own:

1. more stages first: ``stages`` is the number of code lengths the item was ranked with (stage ``s + 1``
   is reached iff its distance at every earlier length ``L_r`` is ``<= t_r``);
2. then the distances from the finest length reached down to the shortest, each ascending;
3. then insertion order (the stable sorts keep gallery order).

:class:`Hits` carries that key (``stages`` and the per-length ``distances``) next to the ids, so the hits of
several indexes can be merged into exactly the hits of one index holding their union, ties included,
provided that the items carry global ids assigned in insertion order (the ids then are the tie-break).
Because an item's key does not depend on the other items, removing items never reorders the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctfreid.errors import CtfreidError


@dataclass(frozen=True)
class Hits:
    """The first ``k`` results of coarse-to-fine searches, with their sort key.

    - ``ids``: ``int64 [nq, k]``, the stored ids, ``-1`` for padding;
    - ``stages``: ``int8 [nq, k]``, how many code lengths each hit was ranked with (1 .. S), 0 for padding;
    - ``distances``: ``int32 [nq, k, S]``, the Hamming distance at each length (shortest first) up to the
      finest the hit reached, ``-1`` beyond it and for padding;
    - ``lengths``: the code lengths, shortest first;
    - ``candidates``: ``int64 [nq, S]`` or None, the number of items ranked at each stage (stage 1 ranks
      them all; stage ``s + 1`` those within every threshold up to ``L_s``): what pruning each query got.
    """

    ids: np.ndarray
    stages: np.ndarray
    distances: np.ndarray
    lengths: tuple[int, ...]
    candidates: np.ndarray | None = None

    @property
    def finest_distances(self) -> np.ndarray:
        """``int32 [nq, k]``: the distance at the finest stage each hit reached (the ``D`` of ``search``);
        ``int32`` max for padding."""
        S = np.maximum(self.stages.astype(np.int64) - 1, 0)
        d = np.take_along_axis(self.distances, S[..., None], axis=2)[..., 0]
        return np.where(self.ids >= 0, d, np.iinfo(np.int32).max).astype(np.int32)

    @property
    def stage_bits(self) -> np.ndarray:
        """``int64 [nq, k]``: the code length of the finest stage each hit reached, ``-1`` for padding."""
        L = np.asarray(self.lengths, np.int64)
        return np.where(self.stages > 0, L[np.maximum(self.stages.astype(np.int64) - 1, 0)], -1)

    def __len__(self) -> int:
        return self.ids.shape[0]


def empty_hits(nq: int, lengths: Sequence[int]) -> Hits:
    """Hits of ``nq`` queries with no results (``k = 0``)."""
    S = len(lengths)
    return Hits(np.empty((nq, 0), np.int64), np.empty((nq, 0), np.int8), np.empty((nq, 0, S), np.int32),
                tuple(int(L) for L in lengths))


def sort_key(hits: Hits) -> list[np.ndarray]:
    """The coarse-to-fine order as ``np.lexsort`` keys (last key = primary) for each row of ``hits``:
    padding last, then more stages, then the distances from the finest reached length down to the
    shortest, then the id."""
    S = hits.distances.shape[2]
    big = np.int64(1) << 40  # beyond any distance: "not reached" never decides between equal stage counts
    keys = [hits.ids]
    for s in range(S):  # shortest length first = least significant of the distance keys
        keys.append(np.where(hits.distances[:, :, s] >= 0, hits.distances[:, :, s], big).astype(np.int64))
    keys.append(-hits.stages.astype(np.int64))
    keys.append((hits.ids < 0).astype(np.int64))
    return keys


def merge_hits(parts: Sequence[Hits], k: int) -> Hits:
    """Merge the hits of several indexes (shards) into the first ``k`` of their union, per query.

    Exact — equal to the hits of one index holding every shard's items, ties included — when the items
    carry global ids assigned in insertion order (ids break ties, as insertion order does in one index)
    and each shard returned its own first ``k`` (fewer when it holds fewer items). Vectorised: one
    ``np.lexsort`` over the concatenated hits.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CtfreidError(f"k must be a positive integer, got {k!r}")
    parts = list(parts)
    if not parts:
        raise CtfreidError("merge_hits needs at least one Hits")
    lengths, nq = parts[0].lengths, parts[0].ids.shape[0]
    for p in parts:
        if not isinstance(p, Hits):
            raise CtfreidError(f"merge_hits takes Hits, got {type(p).__name__}")
        if p.lengths != lengths or p.ids.shape[0] != nq:
            raise CtfreidError(f"hits to merge must share code lengths and queries: {p.lengths} x {p.ids.shape[0]} "
                               f"queries vs {lengths} x {nq}")
    allh = Hits(np.concatenate([p.ids for p in parts], axis=1),
                np.concatenate([p.stages for p in parts], axis=1),
                np.concatenate([p.distances for p in parts], axis=1), lengths)
    # items ranked at each stage add up over disjoint shards
    counts = np.sum([p.candidates for p in parts], axis=0) if all(p.candidates is not None for p in parts) else None
    width = allh.ids.shape[1]
    if width == 0:
        return dataclasses.replace(empty_hits(nq, lengths), candidates=counts)
    order = np.lexsort(sort_key(allh), axis=-1)[:, : min(int(k), width)]
    ids = np.take_along_axis(allh.ids, order, axis=1)
    keep = int((ids >= 0).sum(axis=1).max(initial=0))  # drop columns that are padding in every row
    order = order[:, :keep]
    return Hits(np.take_along_axis(allh.ids, order, axis=1), np.take_along_axis(allh.stages, order, axis=1),
                np.take_along_axis(allh.distances, order[..., None], axis=1), lengths, counts)
