"""The durable gallery of ``ctfreid serve``: one SQLite database, the record of every item.

Every item is a row: ``id`` (``INTEGER PRIMARY KEY AUTOINCREMENT``, so ids increase and are never reused,
even after the newest item is erased), the packed codes of every length (one blob, lengths shortest first),
``pid``, ``camera``, ``time`` (capture time, seconds since the epoch), ``source``, ``track``, ``extra``
(free JSON), ``added`` (server time) and an optional JPEG ``thumb``.

Durability and erasure rely on SQLite itself, no log format of our own:

- ``journal_mode=WAL`` + ``synchronous=FULL``: a transaction is on disk when ``commit`` returns, and a write
  is acknowledged only after that;
- ``secure_delete=ON``: deleted rows (and freed overflow pages) are overwritten with zeros;
- after a delete, ``wal_checkpoint(TRUNCATE)`` copies the zeroed pages into the main file and truncates the
  ``-wal`` file, so the erased bytes are in neither file when the erasure is acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid.codes import check_code_set
from ctfreid.errors import CtfreidError

DB_NAME = "gallery.sqlite"
SCHEMA_VERSION = 1
INT_MIN, INT_MAX = -2**63, 2**63 - 1  # SQLite's INTEGER

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    codes BLOB NOT NULL,
    pid INTEGER,
    camera INTEGER,
    time REAL,
    source TEXT,
    track TEXT,
    extra TEXT,
    added REAL NOT NULL,
    thumb BLOB
);
CREATE INDEX IF NOT EXISTS items_pid ON items(pid);
"""

META_FIELDS = ("pid", "camera", "time", "source", "track", "extra")


@dataclass
class ItemMeta:
    """What a client may say about a crop (every field optional)."""

    pid: int | None = None
    camera: int | None = None
    time: float | None = None
    source: str | None = None
    track: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str = "metadata") -> ItemMeta:
        """Validate one metadata object; errors name ``where`` and the field (the field alone for ``where=""``,
        a request's top-level fields)."""
        at = (lambda name: f"{where}.{name}") if where else (lambda name: name)
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise FieldError(where, f"must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - set(META_FIELDS)
        if unknown:
            raise FieldError(at(sorted(unknown)[0]), f"unknown field; expected some of {', '.join(META_FIELDS)}")
        out = cls()
        for name in ("pid", "camera"):
            v = obj.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not INT_MIN <= v <= INT_MAX):
                raise FieldError(at(name), f"must be an integer, got {v!r:.40}")
            setattr(out, name, v)
        v = obj.get("time")
        if v is not None:
            try:
                out.time = None if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)
            except OverflowError:
                out.time = None
            if out.time is None or not math.isfinite(out.time):  # NaN / Infinity: not JSON, not answerable
                raise FieldError(at("time"), f"must be seconds since the epoch (a finite number), got {v!r:.40}")
        for name in ("source", "track"):
            v = obj.get(name)
            if v is not None and not isinstance(v, (str, int)):
                raise FieldError(at(name), f"must be a string, got {type(v).__name__}")
            setattr(out, name, None if v is None else check_text(v, at(name)))
        v = obj.get("extra")
        if v is not None and not isinstance(v, Mapping):
            raise FieldError(at("extra"), f"must be a JSON object, got {type(v).__name__}")
        out.extra = dict(v or {})
        try:  # stored as JSON and answered as JSON: no NaN / Infinity, no lone surrogates
            json.dumps(out.extra, allow_nan=False, ensure_ascii=False).encode()
        except (ValueError, TypeError) as e:
            raise FieldError(at("extra"), f"must be plain JSON: {e}") from None
        return out


def check_text(v: str | int, where: str) -> str:
    """``v`` as a string that SQLite and JSON can hold (UTF-8: no lone surrogates)."""
    s = str(v)
    try:
        s.encode()
    except UnicodeEncodeError:
        raise FieldError(where, f"must be valid Unicode text, got {s!r:.40}") from None
    return s


class FieldError(CtfreidError):
    """A user error about one named field of a request."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
        self.status = status


class StoreBusy(CtfreidError):
    """The store cannot finish a write now (another process holds its WAL); the client may retry.
    ``erased``: the ids an erasure deleted before its checkpoint failed (committed, out of search)."""

    erased: Sequence[int] = ()


class Store:
    """The SQLite store in ``directory`` (created on first use) bound to one model fingerprint and code lengths.

    Thread-safe: one connection, every call under a lock (SQLite serialises writers anyway).
    """

    def __init__(self, directory: str | Path, fingerprint: str, lengths: Sequence[int]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_NAME
        self.lengths = sorted(int(L) for L in lengths)
        self._widths = [L // 8 for L in self.lengths]
        self._row_bytes = sum(self._widths)
        self._lock = threading.Lock()
        self._unchecked = False  # rows deleted since the last checkpoint that succeeded
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA wal_autocheckpoint=1000")
        with self.transaction():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                for k, v in {"schema": str(SCHEMA_VERSION), "fingerprint": fingerprint,
                             "lengths": json.dumps(self.lengths), "erased": "0",
                             "created": repr(time.time())}.items():
                    db.execute("INSERT INTO meta VALUES (?, ?)", (k, v))
        if meta:
            if meta.get("fingerprint") != fingerprint:
                self.close()
                raise CtfreidError(
                    f"store {self.directory} belongs to the model with fingerprint {meta.get('fingerprint')}, "
                    f"not {fingerprint}: serve it with its own model, or use another --store"
                )
            if json.loads(meta["lengths"]) != self.lengths:
                self.close()
                raise CtfreidError(f"store {self.directory} holds codes of lengths {meta['lengths']}, "
                                   f"the model writes {self.lengths}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------ meta values
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ---------------------------------------------------------------------------------------- codes
    def pack(self, codes: Mapping[int, np.ndarray]) -> list[bytes]:
        cs = check_code_set(codes, "codes")
        if list(cs) != self.lengths:
            raise FieldError("codes", f"lengths {list(cs)} given, the gallery holds {self.lengths}")
        rows = np.concatenate([cs[L] for L in self.lengths], axis=1)
        return [r.tobytes() for r in rows]

    def unpack(self, blobs: Sequence[bytes]) -> dict[int, np.ndarray]:
        buf = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), self._row_bytes)
        out, at = {}, 0
        for L, w in zip(self.lengths, self._widths):
            out[L] = np.ascontiguousarray(buf[:, at:at + w])
            at += w
        return out

    # ---------------------------------------------------------------------------------------- writes
    @contextlib.contextmanager
    def transaction(self, locked: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error), under the
        store's lock unless the caller holds it (``locked=True``). Durable when the block exits: WAL +
        ``synchronous=FULL``."""
        with contextlib.nullcontext() if locked else self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add(self, codes: Mapping[int, np.ndarray], metas: Sequence[ItemMeta],
            thumbs: Sequence[bytes | None] | None = None) -> list[int]:
        """Insert items in one transaction; returns their ids once it has committed (durable)."""
        blobs = self.pack(codes)
        if len(blobs) != len(metas):
            raise FieldError("metadata", f"{len(metas)} objects for {len(blobs)} items")
        thumbs = thumbs or [None] * len(blobs)
        now = time.time()
        ids = []
        with self.transaction() as db:
            for blob, m, th in zip(blobs, metas, thumbs):
                cur = db.execute(
                    "INSERT INTO items (codes, pid, camera, time, source, track, extra, added, thumb) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (blob, m.pid, m.camera, m.time, m.source, m.track,
                     json.dumps(m.extra) if m.extra else None, now, th))
                ids.append(int(cur.lastrowid))
        return ids

    def update(self, item_id: int, meta: ItemMeta, names: Iterable[str]) -> bool:
        """Set the metadata fields ``names`` of item ``item_id`` to ``meta``'s values (None or ``{}`` clears
        one), in one transaction (durable when this returns); False if there is no such item."""
        names = [n for n in META_FIELDS if n in set(names)]
        row = {n: getattr(meta, n) for n in names}
        if "extra" in row:
            row["extra"] = json.dumps(meta.extra) if meta.extra else None  # as add stores it
        with self.transaction() as db:
            cur = db.execute(f"UPDATE items SET {', '.join(f'{n} = ?' for n in row)} WHERE id = ?",
                             [*row.values(), int(item_id)])
            return cur.rowcount == 1

    def delete(self, ids: Iterable[int], checkpoint: bool = True) -> list[int]:
        """Delete these rows (those that exist), then checkpoint the WAL with TRUNCATE: when this returns,
        the rows' bytes are in neither the database file nor the ``-wal`` file. Returns the ids deleted.
        ``checkpoint=False``: the caller calls :meth:`checkpoint` (the rows are deleted, committed, either way)."""
        ids = np.unique(np.asarray(list(ids), np.int64)).tolist()  # 1e5 ids: 5 ms, where sorted(set) took 20
        with self._lock:
            with self.transaction(locked=True) as db:
                found = []
                for chunk in _chunks(ids, 500):
                    q = ",".join("?" * len(chunk))
                    found += [r[0] for r in db.execute(f"SELECT id FROM items WHERE id IN ({q})", chunk)]
                    db.execute(f"DELETE FROM items WHERE id IN ({q})", chunk)
                if found:
                    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'erased'", (len(found),))
                    self._unchecked = True
            if found and checkpoint:
                self._checkpoint_locked()
        return sorted(found)

    def checkpoint(self) -> None:
        """Checkpoint the WAL with TRUNCATE if a delete has not been (``StoreBusy`` if it cannot be now)."""
        with self._lock:
            if self._unchecked:
                self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        # each try returns at once (no busy wait of the connection's timeout while the store's lock is held)
        wait_ms = self._db.execute("PRAGMA busy_timeout").fetchone()[0]
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            for _ in range(50):  # another connection (a reader outside the service) holds the WAL: retry briefly
                if not busy:
                    break
                time.sleep(0.02)
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        self._unchecked = bool(busy)
        if busy:
            raise StoreBusy(f"could not checkpoint {self.path}-wal: another process keeps it open; the rows are "
                            "deleted, but their bytes may stay in the -wal file until a retry succeeds")

    # ---------------------------------------------------------------------------------------- reads
    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def erased(self) -> int:
        return int(self.get_meta("erased") or 0)

    def iter_all(self, batch: int = 50_000, codes: bool = True):
        """Yield ``(ids int64[m], codes {L: [m, L//8]}, fields)`` in id order, in batches; ``fields``: the
        columns ``pid``, ``camera``, ``time``, ``source`` as tuples of the stored values (None for null).
        ``codes=False``: ``codes`` is None (the codes are neither read into Python nor unpacked)."""
        last = -1
        cols = "id, codes, pid, camera, time, source" if codes else "id, pid, camera, time, source"
        while True:
            with self._lock:
                rows = self._db.execute(f"SELECT {cols} FROM items WHERE id > ? ORDER BY id LIMIT ?",
                                        (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            if codes:
                ids, blobs, pid, camera, t, source = zip(*rows)
            else:
                (ids, pid, camera, t, source), blobs = zip(*rows), None
            yield (np.array(ids, np.int64), None if blobs is None else self.unpack(blobs),
                   {"pid": pid, "camera": camera, "time": t, "source": source})

    def get(self, item_id: int) -> dict | None:
        with self._lock:
            return self._get_locked(item_id)

    def _get_locked(self, item_id: int) -> dict | None:
        row = self._db.execute(
            "SELECT id, pid, camera, time, source, track, extra, added, thumb IS NOT NULL FROM items WHERE id = ?",
            (int(item_id),)).fetchone()
        if row is None:
            return None
        row = tuple(map(_finite, row))
        extra = json.loads(row[6], parse_constant=lambda _: None,  # NaN, Infinity, 1e400: null
                           parse_float=lambda s: _finite(float(s))) if row[6] else {}
        return {"id": row[0], "pid": row[1], "camera": row[2], "time": row[3], "source": row[4], "track": row[5],
                "extra": extra, "added": row[7], "thumbnail": bool(row[8])}

    def thumbnail(self, item_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT thumb FROM items WHERE id = ?", (int(item_id),)).fetchone()
        return None if row is None else row[0]

    def codes(self, ids: Sequence[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        """The codes of the stored items among ``ids``, in the order given, and the ids not stored."""
        ids = [int(i) for i in ids]
        with self._lock:
            found = dict(r for chunk in _chunks(ids, 500) for r in self._db.execute(
                f"SELECT id, codes FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return self.unpack([found[i] for i in ids if i in found]), [i for i in ids if i not in found]

    def select_ids(self, pid: int | None = None, camera: int | None = None, track: str | None = None,
                   time_from: float | None = None, time_to: float | None = None,
                   added_before: float | None = None) -> list[int]:
        """Ids of the items matching every given condition (time: capture time, inclusive range)."""
        where, args = _where(pid, camera, track, time_from, time_to, added_before)
        if not args:
            raise CtfreidError("an erasure filter needs at least one condition")
        with self._lock:
            return [r[0] for r in self._db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", args)]

    def scroll(self, offset: int | None = None, limit: int = 100, pid: int | None = None,
               camera: int | None = None, track: str | None = None, time_from: float | None = None,
               time_to: float | None = None) -> tuple[list[dict], int | None]:
        """One page of the items matching every given condition (none: all), in id order from id ``offset``
        on, as :meth:`get` gives them; and the id the next page starts at (None after the last page)."""
        where, args = _where(pid, camera, track, time_from, time_to, None)
        if offset is not None:
            where += " AND id >= ?"
            args.append(int(offset))
        with self._lock:
            ids = [r[0] for r in self._db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id LIMIT ?",
                                                  [*args, int(limit) + 1])]
            rows = [self._get_locked(i) for i in ids[:limit]]
        return rows, (ids[limit] if len(ids) > limit else None)


def _where(pid: int | None, camera: int | None, track: str | None, time_from: float | None,
           time_to: float | None, added_before: float | None) -> tuple[str, list]:
    """SQL condition (and its arguments) for items matching every given condition ("1" and [] for none)."""
    conds, args = [], []
    for col, v in (("pid", pid), ("camera", camera), ("track", track)):
        if v is not None:
            conds.append(f"{col} = ?")
            args.append(v)
    if time_from is not None:
        conds.append("time >= ?")
        args.append(time_from)
    if time_to is not None:
        conds.append("time <= ?")
        args.append(time_to)
    if added_before is not None:  # retention: by capture time, else by the time the item was added
        conds.append("COALESCE(time, added) < ?")
        args.append(added_before)
    return " AND ".join(conds) or "1", args


def _finite(v: Any) -> Any:
    """``v``, or None for a float JSON cannot answer (NaN, Infinity), which rows written by older versions
    may hold."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield list(seq[i:i + n])
