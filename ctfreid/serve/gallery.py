"""The in-memory gallery of ``ctfreid serve``: a :class:`~ctfreid.search.index.CtFIndex` built from the store
(ids = store ids, added in id order, so the index's insertion-order tie-break is the id) and the few fields
that searches filter on and answer with.

Consistency: a write first commits to the store, then changes the index and the field cache under the
write side of a readers-writer lock; a search holds the read side for the index search and the field
look-ups. So every search sees the gallery before or after each whole write (a serial order of the
writes), and a write is acknowledged only once both the store and the index have it. A write holds the
write side only while the index makes it visible (``add(lock=)``, ``remove_ids(lock=)``: a ``CtFIndex`` copies
the items in or swaps its live bits; a sharded index adds or removes them in its shards' memory, once every
shard store has committed the change): the growth of buffers, the shard stores' commits, the look-ups, the
erasure of the bytes and the fields of items no search can return are done while searches go on.

Filters are exact: coarse-to-fine order is a per-item key (``ctfreid.search.merge``), so the filtered
ranking is the full ranking with the other items left out; the search asks for ``4 x`` more hits until
``k`` pass the filter or the gallery is exhausted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ctfreid._rwlock import RWLock
from ctfreid.search.index import CtFIndex
from ctfreid.serve.store import ItemMeta, Store, StoreBusy


@dataclass(frozen=True)  # hashable: concurrent searches with equal filters are searched together
class Filter:
    """Exact search filter: camera equality and an inclusive capture-time range (items without a time
    never pass a time condition)."""

    camera: int | None = None
    time_from: float | None = None
    time_to: float | None = None

    def __bool__(self) -> bool:
        return not (self.camera is None and self.time_from is None and self.time_to is None)

    def passes(self, fields: Fields, ids: np.ndarray) -> np.ndarray:
        """Which of the items ``ids`` pass (bool array)."""
        ok = np.ones(ids.shape, bool)
        if self.camera is not None:
            ok &= fields.has_camera[ids] & (fields.camera[ids] == self.camera)
        t = fields.time[ids]  # NaN (no time) fails every comparison
        if self.time_from is not None:
            ok &= t >= self.time_from
        if self.time_to is not None:
            ok &= t <= self.time_to
        return ok


class Fields:
    """The fields searches filter on and answer with, as NumPy columns indexed by item id (the store's ids
    are dense, from 1): pid, camera (with has_* for null), time (NaN for null); sources in a dict, only the
    items that have one. About 30 bytes an id, where a dict of tuples took about 250 bytes an item."""

    def __init__(self) -> None:
        self.pid = np.zeros(0, np.int64)
        self.camera = np.zeros(0, np.int64)
        self.has_pid = np.zeros(0, bool)
        self.has_camera = np.zeros(0, bool)
        self.time = np.zeros(0, np.float64)
        self.source: dict[int, str] = {}

    def set(self, ids: Sequence[int], pids: Sequence, cameras: Sequence, times: Sequence,
            sources: Sequence) -> None:
        """Set the fields of items ``ids`` (None: no value)."""
        ids = np.asarray(ids, np.int64)
        if not ids.size:
            return
        vars(self).update(self.grown(int(ids.max()) + 1))
        for col, has, values in ((self.pid, self.has_pid, pids), (self.camera, self.has_camera, cameras)):
            v = np.array(values, object)
            has[ids] = given = v != None  # noqa: E711 - elementwise
            col[ids] = np.where(given, v, 0).astype(np.int64)
        t = np.array(times, object)
        t = np.where(t == None, np.nan, t).astype(np.float64)  # noqa: E711 - elementwise
        t[~np.isfinite(t)] = np.nan  # rows of older versions may hold NaN or Infinity: answered as null
        self.time[ids] = t
        for i, src in zip(ids.tolist(), sources):
            if src is None:
                self.source.pop(i, None)
            else:
                self.source[i] = src

    def grown(self, need: int) -> dict[str, np.ndarray]:
        """Copies of the columns with room for ids below ``need`` (amortised doubling; empty when they have
        room), to swap in with ``vars(fields).update``: the service copies them before it takes its write
        lock, while searches read the current ones."""
        if need <= self.pid.shape[0]:
            return {}
        cap = max(need, 2 * self.pid.shape[0], 1024)
        out = {}
        for name, fill in (("pid", 0), ("camera", 0), ("has_pid", False), ("has_camera", False), ("time", np.nan)):
            old = getattr(self, name)
            out[name] = np.full(cap, fill, old.dtype)
            out[name][: old.shape[0]] = old
        return out

    def clear(self, ids: Sequence[int]) -> None:
        """Forget erased items (their metadata is personal data too): as ``set`` with None for every field,
        column-wise, where ``set``'s object arrays took 60 ms for 1e5 items."""
        ids = np.asarray(ids, np.int64)
        ids = ids[ids < self.pid.shape[0]]  # ids past the columns hold no value
        for col in (self.pid, self.camera, self.has_pid, self.has_camera):
            col[ids] = 0
        self.time[ids] = np.nan
        pop = self.source.pop
        for a in range(0, ids.size if self.source else 0, 4096):
            for i in ids[a : a + 4096].tolist():
                pop(i, None)
            time.sleep(0)  # hands the GIL to waiting searches: 1e5 pops from 1e6 sources take ~30 ms


class Gallery:
    """Store + index, kept in step, and the fields searches filter on and answer with (:class:`Fields`)."""

    def __init__(self, store: Store, thresholds: Mapping[int, int], index=None, max_batch: int = 64) -> None:
        self.store = store
        self.lengths = store.lengths
        self.thresholds = dict(thresholds)
        self.lock = RWLock()
        self._write = threading.Lock()  # one writer at a time, store commit and index change in the same order
        t0 = time.perf_counter()
        # a CtFIndex, or anything with its surface (ctfreid.distributed.ShardedIndex for --ray)
        self.index = CtFIndex() if index is None else index
        self.index.thresholds = dict(thresholds)
        self.fields = Fields()
        if isinstance(self.index, CtFIndex):  # lengths and explicit ids fixed before the first item
            self.index.add({L: np.empty((0, L // 8), np.uint8) for L in self.lengths}, np.empty(0, np.int64))
            held = np.empty(0, np.int64)
        else:  # a sharded index reopened from its shard stores holds what it held when the service stopped
            held = np.asarray(self.index.ids, np.int64)  # sorted
        first = None  # a stored item's codes, the warm-up's query
        unlisted = np.ones(held.size, bool)  # held items the store has not listed (so far)
        # codes are read only for what the index lacks: a reopened sharded index holds the rest in its shard stores
        for ids, codes, cols in store.iter_all(codes=not held.size):
            at = np.minimum(np.searchsorted(held, ids), max(held.size - 1, 0))
            has = held[at] == ids if held.size else np.zeros(ids.shape, bool)
            unlisted[at[has]] = False
            if not has.all():  # only what the index lacks: a reopened shard store is not written again
                new = ids[~has]
                if codes is None:
                    codes = store.codes(new)[0]
                elif has.any():
                    codes = {L: c[~has] for L, c in codes.items()}
                self.index.add(codes, new)
            self.fields.set(ids, cols["pid"], cols["camera"], cols["time"], cols["source"])
            if first is None and len(ids):
                first = {L: c[:1].copy() for L, c in codes.items()} if codes is not None else store.codes(ids[:1])[0]
        if unlisted.any():  # items the store no longer has (an erasure the service committed before it stopped, but
            self.index.remove_ids(held[unlisted])  # the shards missed): removed, erased from the shard stores too
        self.load_seconds = time.perf_counter() - t0
        self._warm_up(first, max_batch)

    def _warm_up(self, first: dict[int, np.ndarray] | None, max_batch: int) -> None:
        """Compile the search and erasure kernels now (numba JIT), not in the first client's request; then search
        the gallery once with a stored item (``first``), alone and as a batch of ``max_batch`` queries, so that the
        index makes its search scratch now: fresh memory's page faults made the first search after a start take
        2.7-19 ms at 1e6 items, against about 1 ms for the next ones (benchmarks/README.md, twenty-first session)."""
        rng = np.random.default_rng(0)
        tiny = CtFIndex()
        tiny.add({L: rng.integers(0, 256, (4, L // 8), dtype=np.uint8) for L in self.lengths}, np.arange(4))
        q = {L: tiny.codes(L)[:1].copy() for L in self.lengths}
        thresholds = self.thresholds if len(self.lengths) > 1 else None
        tiny.search_hits(q, 2, thresholds)
        tiny.remove_ids(np.arange(1))  # and the erasure's kernel: compiled in an erasure, it held the GIL ~0.1 s
        if first is not None:  # (a sharded index: every shard makes its own)
            self.index.search_hits(first, 100, thresholds)
            if max_batch > 1:
                self.index.search_hits({L: np.repeat(c, max_batch, axis=0) for L, c in first.items()}, 100, thresholds)

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, codes: Mapping[int, np.ndarray], metas: Sequence[ItemMeta],
            thumbs: Sequence[bytes | None] | None = None) -> list[int]:
        with self._write:
            ids = self.store.add(codes, metas, thumbs)  # committed: durable before the index sees it
            # the fields first: no search returns these ids before the index has them (grown columns hold the
            # same values as the ones searches read, and this is the only writer)
            vars(self.fields).update(self.fields.grown(max(ids) + 1) if ids else {})
            self.fields.set(ids, [m.pid for m in metas], [m.camera for m in metas], [m.time for m in metas],
                            [m.source for m in metas])
            # the index holds this lock for writing only while the items become visible, as one write (a CtFIndex:
            # the copy into its buffers, grown before it; a ShardedIndex: the shards' in-memory adds, after every
            # shard store has committed them)
            self.index.add(codes, np.asarray(ids, np.int64), lock=self.lock)
        return ids

    def update(self, item_id: int, meta: ItemMeta, names: Sequence[str]) -> dict | None:
        """Set some metadata fields of one item (store first, then the fields searches filter on); the item
        as stored afterwards, None if there is no such item."""
        with self._write:
            if not self.store.update(item_id, meta, names):
                return None
            row = self.store.get(item_id)
            with self.lock.write():
                self.fields.set([item_id], [row["pid"]], [row["camera"]], [row["time"]], [row["source"]])
        return row

    def erase(self, ids: Sequence[int]) -> list[int]:
        """Erase from the store (rows deleted), from memory, then checkpoint the WAL; returns the ids erased."""
        return self.erase_where(lambda: list(ids))

    def erase_where(self, select: Callable[[], list[int]]) -> list[int]:
        """``erase`` of the ids ``select()`` returns, chosen under the writer lock."""
        with self._write:  # select and delete under the write lock: no add slips in between
            ids = select()
            gone = self.store.delete(ids, checkpoint=False)
            # deleted (committed): out of every search from here on, even if the checkpoint fails. The index holds
            # this lock for writing only while the removal becomes visible, as one write (a CtFIndex: the swap of its
            # live bits; its look-ups, erasure of the codes and compaction run while searches go on; a ShardedIndex:
            # the shards' in-memory removals, after every shard store has erased the items)
            self.index.remove_ids(np.asarray(gone, np.int64), lock=self.lock)
            self.fields.clear(gone)  # no search returns these items any more: their fields are unread
            try:
                self.store.checkpoint()  # erased bytes out of the files before the receipt (StoreBusy: retry)
            except StoreBusy as e:
                e.erased = gone  # deleted all the same: the caller may count them
                raise
        return gone

    def search(self, query: Mapping[int, np.ndarray], k: int, thresholds: Mapping[int, int] | None = None,
               flt: Filter | None = None, query_weights: np.ndarray | Mapping[int, np.ndarray] | None = None,
               threads: int | None = None) -> tuple[list[list[dict]], list[dict | None], tuple[int, ...]]:
        """Top-``k`` hits per query (coarse-to-fine order, exactly those of ``CtFIndex.search_hits`` on the
        items passing ``flt``); per query the number of items ranked at each stage (stage 1 = all; stage
        s + 1 = those within every threshold up to ``L_s``, Sec. 3.1; counted by the search kernels, summed
        over the shards of a sharded index; None where a shard did not answer); and the shards that did not
        answer (a sharded index; empty otherwise). ``query_weights``: weighted stages (an array: stage 1; a
        mapping ``{length: weights}``: those lengths; their ``thresholds`` must then be weighted ones). ``threads``:
        the search threads (``CtFIndex.search``; of each shard, for a sharded index)."""
        thr = dict(thresholds) if thresholds is not None else self.thresholds
        nq = next(iter(query.values())).shape[0]
        partial: set[int] = set()
        results: dict[int, list] = {}
        counts: list[dict | None] = [{str(L): 0 for L in self.lengths} for _ in range(nq)]
        with self.lock.read():
            n = self.index.ntotal
            kk = min(k, n)
            pending = list(range(nq)) if kk else []
            first = True
            while pending:
                sub = {L: q[pending] for L, q in query.items()}
                hits = self.index.search_hits(sub, kk, thr if len(self.lengths) > 1 else None,
                                              query_weights=_rows(query_weights, pending), threads=threads)
                partial.update(getattr(hits, "partial", ()))
                if first:  # the counts do not depend on k: the first round (every query) has them
                    good = hits.candidates is not None and not getattr(hits, "partial", ())
                    counts = [{str(L): int(c) for L, c in zip(self.lengths, row)} if good else None
                              for row in (hits.candidates if good else [None] * nq)]
                    first = False
                still = []
                for row, qi in enumerate(pending):
                    results[qi] = self._passing(hits, row, k, flt)
                    if len(results[qi]) < k and kk < n:
                        still.append(qi)
                pending = still
                kk = min(n, kk * 4)
        return [results.get(qi, []) for qi in range(nq)], counts, tuple(sorted(partial))

    def _passing(self, hits, row: int, k: int, flt: Filter | None) -> list[dict]:
        """The first ``k`` hits of row ``row`` that pass ``flt``, as answered (id, distance, stage, fields)."""
        ids = hits.ids[row]
        ok = ids >= 0  # not padding
        if flt:
            ok &= flt.passes(self.fields, np.where(ok, ids, 0))
        sel = np.flatnonzero(ok)[:k]
        i = ids[sel]
        stages = hits.stages[row, sel].astype(np.int64)
        dist = hits.distances[row, sel, stages - 1]
        f = self.fields
        return [{"id": a, "distance": d, "stage_bits": self.lengths[s - 1], "stage": s,
                 "pid": p if hp else None, "camera": c if hc else None, "time": None if t != t else t,
                 "source": f.source.get(a)}
                for a, d, s, p, hp, c, hc, t in zip(i.tolist(), dist.tolist(), stages.tolist(), f.pid[i].tolist(),
                                                    f.has_pid[i].tolist(), f.camera[i].tolist(),
                                                    f.has_camera[i].tolist(), f.time[i].tolist())]


def _rows(query_weights, rows: list[int]):
    """The query weights (an array or ``{length: array}``) of the queries ``rows``."""
    if query_weights is None:
        return None
    if isinstance(query_weights, Mapping):
        return {L: w[rows] for L, w in query_weights.items()}
    return query_weights[rows]
