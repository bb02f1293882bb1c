"""The in-memory gallery of ``ctfreid serve``: a :class:`~ctfreid.search.index.CtFIndex` built from the store
(ids = store ids, added in id order, so the index's insertion-order tie-break is the id) and the few fields
that searches filter on and answer with.

Consistency: a write first commits to the store, then changes the index and the field cache under the
write side of a readers-writer lock; a search holds the read side for the index search and the field
look-ups. So every search sees the gallery before or after each whole write (a serial order of the
writes), and a write is acknowledged only once both the store and the index have it.

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


@dataclass
class Filter:
    """Exact search filter: camera equality and an inclusive capture-time range (items without a time
    never pass a time condition)."""

    camera: int | None = None
    time_from: float | None = None
    time_to: float | None = None

    def __bool__(self) -> bool:
        return not (self.camera is None and self.time_from is None and self.time_to is None)

    def passes(self, f: tuple) -> bool:
        _pid, camera, t = f[0], f[1], f[2]
        if self.camera is not None and camera != self.camera:
            return False
        if self.time_from is not None and (t is None or t < self.time_from):
            return False
        if self.time_to is not None and (t is None or t > self.time_to):
            return False
        return True


class Gallery:
    """Store + index, kept in step. ``fields[id] = (pid, camera, time, source)``."""

    def __init__(self, store: Store, thresholds: Mapping[int, int], index=None) -> None:
        self.store = store
        self.lengths = store.lengths
        self.thresholds = dict(thresholds)
        self.lock = RWLock()
        self._write = threading.Lock()  # one writer at a time, store commit and index change in the same order
        t0 = time.perf_counter()
        # a CtFIndex, or anything with its surface (ctfreid.distributed.ShardedIndex for --ray)
        self.index = CtFIndex() if index is None else index
        self.index.thresholds = dict(thresholds)
        self.fields: dict[int, tuple] = {}
        if isinstance(self.index, CtFIndex):  # lengths and explicit ids fixed before the first item
            self.index.add({L: np.empty((0, L // 8), np.uint8) for L in self.lengths}, np.empty(0, np.int64))
        for ids, codes, metas in store.iter_all():
            self.index.add(codes, ids)
            for m in metas:
                self.fields[m[0]] = tuple(m[1:5])
        self.load_seconds = time.perf_counter() - t0
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile the search kernels now (numba JIT), not in the first client's request."""
        rng = np.random.default_rng(0)
        tiny = CtFIndex()
        tiny.add({L: rng.integers(0, 256, (4, L // 8), dtype=np.uint8) for L in self.lengths}, np.arange(4))
        q = {L: tiny.codes(L)[:1].copy() for L in self.lengths}
        tiny.search_hits(q, 2, self.thresholds if len(self.lengths) > 1 else None)

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, codes: Mapping[int, np.ndarray], metas: Sequence[ItemMeta],
            thumbs: Sequence[bytes | None] | None = None) -> list[int]:
        with self._write:
            ids = self.store.add(codes, metas, thumbs)  # committed: durable before the index sees it
            with self.lock.write():
                self.index.add(codes, np.asarray(ids, np.int64))
                for i, m in zip(ids, metas):
                    self.fields[i] = (m.pid, m.camera, m.time, m.source)
        return ids

    def update(self, item_id: int, meta: ItemMeta, names: Sequence[str]) -> dict | None:
        """Set some metadata fields of one item (store first, then the fields searches filter on); the item
        as stored afterwards, None if there is no such item."""
        with self._write:
            if not self.store.update(item_id, meta, names):
                return None
            row = self.store.get(item_id)
            with self.lock.write():
                self.fields[item_id] = (row["pid"], row["camera"], row["time"], row["source"])
        return row

    def erase(self, ids: Sequence[int]) -> list[int]:
        """Erase from the store (rows deleted), from memory, then checkpoint the WAL; returns the ids erased."""
        return self.erase_where(lambda: list(ids))

    def erase_where(self, select: Callable[[], list[int]]) -> list[int]:
        """``erase`` of the ids ``select()`` returns, chosen under the writer lock."""
        with self._write:  # select and delete under the write lock: no add slips in between
            ids = select()
            gone = self.store.delete(ids, checkpoint=False)
            with self.lock.write():  # deleted (committed): out of every search, even if the checkpoint fails
                self.index.remove_ids(np.asarray(gone, np.int64))
                for i in gone:
                    self.fields.pop(i, None)
            try:
                self.store.checkpoint()  # erased bytes out of the files before the receipt (StoreBusy: retry)
            except StoreBusy as e:
                e.erased = gone  # deleted all the same: the caller may count them
                raise
        return gone

    def search(self, query: Mapping[int, np.ndarray], k: int, thresholds: Mapping[int, int] | None = None,
               flt: Filter | None = None) -> tuple[list[list[dict]], list[dict | None], tuple[int, ...]]:
        """Top-``k`` hits per query (coarse-to-fine order, exactly those of ``CtFIndex.search_hits`` on the
        items passing ``flt``); per query the number of items ranked at each stage (stage 1 = all; stage
        s + 1 = those within every threshold up to ``L_s``, Sec. 3.1; counted by the search kernels, summed
        over the shards of a sharded index; None where a shard did not answer); and the shards that did not
        answer (a sharded index; empty otherwise)."""
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
                hits = self.index.search_hits(sub, kk, thr if len(self.lengths) > 1 else None)
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
        got = []
        for j in range(hits.ids.shape[1]):
            i = int(hits.ids[row, j])
            if i < 0:  # padding
                continue
            f = self.fields[i]
            if flt and not flt.passes(f):
                continue
            s = int(hits.stages[row, j])
            got.append({"id": i, "distance": int(hits.distances[row, j, s - 1]), "stage_bits": self.lengths[s - 1],
                        "stage": s, "pid": f[0], "camera": f[1], "time": f[2], "source": f[3]})
            if len(got) == k:
                break
        return got
