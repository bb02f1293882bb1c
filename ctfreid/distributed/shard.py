"""One shard of a :class:`~ctfreid.distributed.sharded.ShardedIndex`: a :class:`CtFIndex` over the items whose
id is ``i (mod N)``, and (optionally) its durable store.

The class is plain Python; :mod:`ctfreid.distributed.sharded` runs it as a Ray actor. Ray restarts a dead
actor by calling ``__init__`` again with the same arguments, so the constructor is also the recovery path: it
rebuilds the index from the shard's store (the items the store has committed, hence every acknowledged one).
Once the store holds items, a marker ``shard-<i>.stored`` beside its directory records that, so a store
directory that is gone (deleted, disk not mounted) stops the shard instead of bringing it back empty.

The store is the service's SQLite store (:class:`ctfreid.serve.store.Store`: WAL, ``synchronous=FULL``,
``secure_delete``, erasure checkpoints), with one addition: items keep the global id the sharded index gave
them (the service's store numbers rows itself), written to the same schema under the store's own lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid._atomic import atomic_write, fsync_dir
from ctfreid.errors import CtfreidError
from ctfreid.search.index import CtFIndex
from ctfreid.search.merge import Hits
from ctfreid.serve.store import DB_NAME, Store


class ShardStore(Store):
    """The service's store, with items inserted under ids chosen by the caller (global ids of a sharded
    index), and the shard's ``next_id`` / ``thresholds`` kept in the ``meta`` table."""

    def put(self, ids: np.ndarray, codes: Mapping[int, np.ndarray], next_id: int) -> None:
        """Insert the items in one transaction (durable when this returns: WAL + ``synchronous=FULL``).
        Ids already stored are left as they are (a retried write is a no-op)."""
        blobs = self.pack(codes)
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO items (id, codes, added) VALUES (?, ?, ?)",
                           [(int(i), b, now) for i, b in zip(ids, blobs)])
            db.execute("INSERT INTO meta VALUES ('next_id', ?) ON CONFLICT(key) DO UPDATE SET value = "
                       "MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (str(int(next_id)),))


def stored_lengths(directory: Path) -> list[int] | None:
    """The code lengths recorded in the store under ``directory``, None when there is no store yet."""
    path = directory / DB_NAME
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None  # created, not yet initialised: holds nothing
        row = db.execute("SELECT value FROM meta WHERE key = 'lengths'").fetchone()
    except sqlite3.DatabaseError as e:  # unreadable: never come back empty, as if it held no items
        raise CtfreidError(f"shard store {path} cannot be read ({e})") from None
    finally:
        db.close()
    return None if row is None else [int(L) for L in json.loads(row[0])]


class Shard:
    """Shard ``index`` of ``count``: a :class:`CtFIndex` with explicit (global) ids and, with ``store``,
    the :class:`ShardStore` in ``store`` that makes its writes durable."""

    def __init__(self, index: int, count: int, store: str | None = None,
                 fingerprint: str = "ctfreid.distributed") -> None:
        self.shard, self.count = int(index), int(count)
        self.fingerprint = fingerprint
        self.dir = Path(store) if store else None
        self.store: ShardStore | None = None
        self.index = CtFIndex()
        self.next_id = 0
        self.started = time.time()
        # beside the store directory, not in it: it must outlive that directory to say it held items
        self.marker = self.dir.parent / f"{self.dir.name}.stored" if self.dir is not None else None
        self._marked = False
        self._staged: tuple | None = None  # (token, ids, codes) of the write between stage and publish
        if self.dir is not None:
            lengths = stored_lengths(self.dir)
            if lengths is None and self.marker.exists():  # never serve (or write into a new store) without them
                raise CtfreidError(
                    f"shard store {self.dir}/ is missing (or holds no store) but shard {self.shard} had stored "
                    f"items there ({self.marker} records it): restore or mount it; to give its items up and "
                    f"start this shard empty, delete {self.marker}")
            if lengths is not None:
                self._open(lengths)
                self._reload()
                self._mark()  # also for a store written before markers existed

    # ------------------------------------------------------------------------------------ persistence
    def _open(self, lengths: list[int]) -> None:
        self.store = ShardStore(self.dir, self.fingerprint, lengths)

    def _mark(self) -> None:
        """Write the marker (durably: file and directory fsynced) once the store has committed items; before
        the write is acknowledged, so every acknowledged item has it."""
        if self._marked:
            return
        if not self.marker.exists():
            fsync_dir(self.dir)  # the store's file names (SQLite syncs the files); atomic_write syncs the marker's
            with atomic_write(self.marker, "w") as f:
                f.write(f"shard {self.shard} of {self.count} keeps its items in {self.dir.name}/: "
                        "if that directory is missing, restore or mount it\n")
        self._marked = True

    def _reload(self) -> None:
        """Rebuild the index from the store, in id order (= insertion order for global ids)."""
        assert self.store is not None
        for ids, codes, _ in self.store.iter_all():
            self.index.add(codes, ids)
        thr = self.store.get_meta("thresholds")
        if thr:
            self.index.thresholds = {int(L): int(t) for L, t in json.loads(thr).items()}
        self.next_id = int(self.store.get_meta("next_id") or 0)

    # ------------------------------------------------------------------------------------------ calls
    def info(self) -> dict[str, Any]:
        """What the driver needs to check and monitor this shard."""
        return {"shard": self.shard, "pid": os.getpid(), "ntotal": self.index.ntotal,
                "lengths": self.index.lengths, "next_id": self.next_id, "started": self.started,
                "durable": self.store is not None}

    def ids(self) -> np.ndarray:
        """The ids this shard holds (live), in insertion order."""
        return self.index.ids

    def stage(self, token: int, ids: np.ndarray, codes: Mapping[int, np.ndarray], next_id: int) -> int:
        """The first half of an add (ids already routed here): commit the new items to the store (durable) and
        hold them for :meth:`publish`, which makes them searchable; returns how many are new. Searches meanwhile
        answer without them. A retried call (the same ids with the same codes, after a restart) stages nothing
        twice; an id held by an item with other codes is an error. Only the last staged write is held (the
        driver writes one at a time)."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids % self.count != self.shard).any():
            raise CtfreidError(f"shard {self.shard} of {self.count} got ids routed elsewhere")
        ids, codes = self._new_only(ids, codes)
        if self.dir is not None and ids.size:
            if self.store is None:
                self._open(sorted(int(L) for L in codes))
            self.store.put(ids, codes, next_id)
            self._mark()
        self.next_id = max(self.next_id, int(next_id))
        self._staged = (token, ids, codes)
        return int(ids.size)

    def publish(self, token: int, ids: np.ndarray) -> int:
        """The second half of an add: the items staged under ``token`` join the index (in memory, the time of a
        copy); returns the shard's live items after it. A shard restarted since the stage reloaded them from its
        store, so it checks that it holds ``ids`` instead."""
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == token:
            _, new, codes = staged
            if new.size or not self.index.lengths:  # (an empty first add fixes the lengths)
                self.index.add(codes, new)
        else:
            ids = np.asarray(ids, np.int64)
            missing = ids[~self.index.contains(ids)]
            if missing.size:
                raise CtfreidError(f"shard {self.shard} has not staged ids {missing[:5].tolist()}: stage them again")
        return self.index.ntotal

    def _new_only(self, ids: np.ndarray, codes: Mapping[int, np.ndarray]) -> tuple[np.ndarray, dict]:
        codes = {int(L): np.asarray(c) for L, c in codes.items()}
        live = self.index.ids
        if not ids.size or not live.size or ids.min() > live.max():  # the usual case: new, increasing ids
            return ids, codes
        seen = np.isin(ids, live)
        if not seen.any():
            return ids, codes
        where = np.searchsorted(live, ids[seen]) if (np.diff(live) > 0).all() else \
            np.array([int(np.flatnonzero(live == i)[0]) for i in ids[seen]])
        for L, c in codes.items():
            if not np.array_equal(self.index.codes(L)[where], c[seen]):
                raise CtfreidError(f"ids must be unique: id {int(ids[seen][0])} is already in the index")
        keep = ~seen
        return ids[keep], {L: c[keep] for L, c in codes.items()}

    def clash(self, ids: np.ndarray, codes: Mapping[int, np.ndarray]) -> str | None:
        """The error ``add`` would raise for these items, None when it would accept them (writes nothing)."""
        try:
            self._new_only(np.asarray(ids, np.int64), codes)
        except CtfreidError as e:
            return str(e)
        return None

    def erase_stored(self, ids: np.ndarray) -> int:
        """The first half of a removal: erase these ids from the store (committed, WAL checkpointed), while
        searches still find them in the index until :meth:`remove_ids`; returns how many of them the index
        holds (the count the removal will make, also when a restart reloads the store before it)."""
        ids = np.asarray(ids, np.int64)
        if self.store is not None and ids.size:
            self.store.delete(ids.tolist())
        return int(self.index.contains(ids).sum())

    def remove_ids(self, ids: np.ndarray) -> int:
        """The second half of a removal: remove these ids from the index (those held here); returns the shard's
        live items after it."""
        self.index.remove_ids(np.asarray(ids, np.int64))
        return self.index.ntotal

    def set_thresholds(self, thresholds: dict[int, int]) -> None:
        self.index.thresholds = {int(L): int(t) for L, t in thresholds.items()}
        if self.store is not None:
            self.store.set_meta("thresholds", json.dumps(self.index.thresholds))

    def search_hits(self, query_codes: Mapping[int, np.ndarray], k: int, thresholds: dict[int, int] | None,
                    query_weights: np.ndarray | None = None, threads: int | None = None) -> Hits | None:
        """This shard's first ``k`` hits (None while it holds no code lengths yet); ``query_weights``: weighted
        stages with weighted ``thresholds``; ``threads``: the search's threads (None: the process default)."""
        if not self.index.lengths:
            return None
        return self.index.search_hits(query_codes, k, thresholds=thresholds, threads=threads,
                                      query_weights=query_weights)

    def to_bytes(self) -> bytes:
        return self.index.to_bytes()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
