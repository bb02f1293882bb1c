"""``ShardedIndex``: a coarse-to-fine gallery split over ``N`` Ray actors, with exactly the answers of one
:class:`~ctfreid.search.index.CtFIndex` over the same items.

    from ctfreid.distributed import ShardedIndex
    index = ShardedIndex(shards=4, store="gallery/")     # address=None: start or join a local Ray
    index.add({32: c32, 128: c128, 512: c512, 2048: c2048})
    index.thresholds = {32: 9, 128: 41, 512: 190}
    hits = index.search_hits(query_codes, k=100)         # hits.partial == () when every shard answered
    D, I = index.search(query_codes, k=100)              # raises ShardsUnavailable rather than answer short
    index.weighted_thresholds, index.weighting = wthr, Weighting(scale=2.1)   # a weighted stage 1's defaults
    D, I = index.search(query_codes, k=100, query_weights=index.weighting.weights(values))

Why the answers are exact: coarse-to-fine search (Sec. 3.1) orders the gallery by a key each item has on its
own (stages reached, then the distances from the finest length down, then insertion order; see
:mod:`ctfreid.search.merge`). Items get global ids in insertion order and go to shard ``id % N``; every shard
returns its own first ``k`` with their keys, and :func:`~ctfreid.search.merge.merge_hits` keeps the first
``k`` of the union, ties broken by id = insertion order. Removing items does not change the others' keys.
With explicit ids the answers are exact when the ids increase with insertion (as the tie-break of one index
is insertion order and the merge's is the id).

Faults: with ``store=DIR`` each shard commits its writes to its own SQLite store (``DIR/shard-<i>/``) before
acknowledging them, and a dead shard actor is restarted by Ray (``max_restarts``) and reloads its items from
there. A search waits at most ``timeout`` seconds for the shards; shards that have not answered by then are
listed in ``Hits.partial`` (``search`` raises :class:`ShardsUnavailable` instead). Without a store nothing is
durable, so a dead shard is not restarted (it would come back empty): its items stay missing, flagged at once.
A shard that cannot start (its store directory gone or unreadable) makes every call raise a CtfreidError
naming the cause.

Concurrency: a shard answers up to ``READ_CALLS`` searches (and ``info`` calls) at once, in its own Ray
concurrency group ``"reads"``, beside its writes (add, remove, thresholds, save), which run one at a time and
in order in the actor's default group. So a search does not queue behind a write's store commit or erasure
checkpoint (a second or more for 1e5 items); the shard's ``CtFIndex`` orders the two (readers-writer lock).
Writes run in two rounds: every shard commits its part to its store, then every shard shows it in memory, so no
shard shows a write that another has not committed; ``lock=`` (a caller's readers-writer lock) is held for
writing during the second round only. ``ntotal`` is counted by the writes and asks no shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid._rwlock import RWLock, writing
from ctfreid.codes import check_code_set
from ctfreid.errors import CtfreidError
from ctfreid.search.asymmetric import Weighting, check_query_weights, max_distance
from ctfreid.search.hamming import check_k, check_radius, range_result
from ctfreid.search.index import CtFIndex, check_ids, default_thresholds, ids_to_remove, weighted_maxima
from ctfreid.search.merge import Hits, empty_hits, merge_hits
from ctfreid.search.parallel import check_threads
from ctfreid.search.thresholds import check_thresholds

CONFIG = "sharded.json"
INLINE_BYTES = 64 * 1024  # queries up to this size (times the shards) are sent inline, not via ray.put
READ_CALLS = 8  # searches (and info calls) a shard runs at once, on threads of its "reads" concurrency group
_READS = ("search_hits", "info", "ids")  # the Shard methods of that group; every other one runs in the default group
FORMAT = 1
_RETRY = "the write may be applied on the other shards: retry it with the same ids"
_HINTS = {  # what a caller of _call_all can do when a shard stays down
    **dict.fromkeys(("stage", "publish", "erase_stored", "remove_ids"), _RETRY),
    "set_thresholds": "the thresholds may be set on the other shards: set them again",
}


@dataclass(frozen=True)
class ShardedHits(Hits):
    """:class:`~ctfreid.search.merge.Hits` of a sharded search; ``partial`` lists the shards whose items
    are missing from the answer (empty tuple: the answer is exact)."""

    partial: tuple[int, ...] = ()


class ShardsUnavailable(CtfreidError):
    """Some shards did not answer within the timeout; ``missing`` lists them and ``hits`` holds the answer
    over the other shards."""

    def __init__(self, missing: tuple[int, ...], hits: ShardedHits, timeout: float) -> None:
        super().__init__(f"shards {list(missing)} are down or did not answer within {timeout:g} s: the answer "
                         "would miss their items (search_hits returns it, flagged partial)")
        self.missing, self.hits = missing, hits


def _ray():
    try:
        import ray
    except ImportError as e:  # the optional extra
        raise CtfreidError('ctfreid.distributed needs Ray: pip install "ctfreid[ray]"') from e
    return ray


def _timeout(value: Any) -> float:
    """``timeout`` as a positive, finite number of seconds, else a CtfreidError naming it."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not 0 < value < math.inf):
        raise CtfreidError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _crc(blob: bytes) -> int:
    """The CRC-32 trailer of a CtFIndex file (``to_bytes`` output): which file a snapshot's shard must be."""
    return int.from_bytes(blob[-4:], "little")


def _cannot_start(i: int, e: Exception) -> CtfreidError | None:
    """Shard ``i``'s own error when Ray reports (``e``) that its constructor raised: Ray does not restart it,
    so asking again is useless until the cause (a missing or unreadable store) is fixed. None otherwise."""
    if not getattr(e, "actor_init_failed", False):
        return None
    line = str(e).rstrip().splitlines()[-1]  # Ray's message ends with the constructor's exception
    return CtfreidError(f"shard {i} cannot start: {line.removeprefix('ctfreid.errors.CtfreidError: ')}")


def _code_set(codes: Mapping[int, np.ndarray], name: str) -> dict[int, np.ndarray]:
    """Queries as 2-D code sets (one 1-D query code per length is one query, as in CtFIndex)."""
    if isinstance(codes, Mapping):
        codes = {L: (c[None] if isinstance(c, np.ndarray) and c.ndim == 1 else c) for L, c in codes.items()}
    return check_code_set(codes, name)


class ShardedIndex:
    """A :class:`CtFIndex` surface (``add``, ``search``, ``search_hits``, ``range_search``, ``remove_ids``,
    ``ntotal``, ``lengths``, ``thresholds``, ``weighted_thresholds`` and ``weighting``, ``save`` / ``load``) over
    ``shards`` Ray actors (Sec. 3.1 search, split by item). The defaults of searches (``thresholds`` without
    ``query_weights``, ``weighted_thresholds`` with them) are kept here, with the store's configuration and
    in ``save``; every search passes them to the shards.

    - ``address``: None starts a local Ray (or uses the one this process already joined); ``"auto"`` or
      ``"ray://host:port"`` joins a cluster;
    - ``store``: a directory; shard ``i`` keeps its durable store in ``store/shard-<i>/``. An existing
      directory is reopened (its items, ids and shard count);
    - ``timeout``: seconds a search waits for the shards before answering without the missing ones;
    - ``max_restarts``: how often Ray restarts a dead shard (only with a store; -1: always);
    - ``actor_options``: extra Ray actor options (e.g. ``{"num_cpus": 4}``; default ``num_cpus=0`` and the
      SPREAD scheduling strategy, one shard per node where possible; ``concurrency_groups`` may resize
      ``"reads"``, the searches a shard runs at once, ``READ_CALLS`` by default).
    """

    def __init__(self, shards: int = 1, address: str | None = None, store: str | Path | None = None,
                 timeout: float = 30.0, max_restarts: int = -1, fingerprint: str = "ctfreid.distributed",
                 actor_options: Mapping[str, Any] | None = None) -> None:
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise CtfreidError(f"shards must be a positive integer, got {shards!r}")
        ray = _ray()
        self._ray = ray
        self.timeout = _timeout(timeout)
        self.store = Path(store) if store is not None else None
        self._lengths: list[int] | None = None
        self._thresholds: dict[int, int] = {}
        self._weighted_thresholds: dict[int, int] | None = None
        self._weighting: Weighting | None = None
        self._next_id = 0
        self._default_ids: bool | None = None
        self._write = threading.Lock()  # one write at a time (as one index): default ids are assigned once each
        self._token = 0  # numbers the writes, so that a shard publishes only what it staged for this one
        # ntotal, counted by the writes (each shard returns its count with the write's last call), so that a
        # search's ntotal asks no shard: None after a write that failed, until asked of the shards again
        self._count = threading.Lock()
        self._ntotal: int | None = None
        self._epoch = 0  # writes begun + ended: a count asked of the shards is kept only if none ran meanwhile
        n = int(shards)
        if self.store is not None:
            cfg = self._read_config()
            if cfg is not None:
                if cfg["shards"] != n:
                    raise CtfreidError(f"store {self.store} holds {cfg['shards']} shards, not {n}: open it with "
                                       f"shards={cfg['shards']} (or save and load to reshard)")
                self._lengths = cfg["lengths"]
                self._thresholds = {int(L): int(t) for L, t in cfg["thresholds"].items()}
                self._weighted_thresholds, self._weighting = _weighted_of(cfg, self.store / CONFIG)
                self._default_ids = cfg["default_ids"]
                self._next_id = int(cfg["next_id"])
                fingerprint = cfg["fingerprint"]
            self.store.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        from ctfreid.distributed.shard import Shard

        opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": "SPREAD",
                                "max_restarts": int(max_restarts) if self.store is not None else 0}
        opts.update(actor_options or {})
        groups = {"reads": READ_CALLS, **(opts.pop("concurrency_groups", None) or {})}  # ray.remote's, not options'
        self._max_restarts = int(opts["max_restarts"])
        remote = ray.remote(concurrency_groups=groups)(Shard)
        self.actors = [remote.options(**opts).remote(i, n, None if self.store is None else
                                                     str(self.store / f"shard-{i}"), fingerprint)
                       for i in range(n)]
        infos = []
        for i, ref in enumerate([_method(a, "info").remote() for a in self.actors]):
            try:
                infos.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                err = _cannot_start(i, e)
                if err is None:
                    raise
                for a in self.actors:  # the others would serve an index without shard i's items
                    ray.kill(a, no_restart=True)
                self.actors = []
                raise err from None
        self._next_id = max([self._next_id] + [int(i["next_id"]) for i in infos])
        self._ntotal = sum(int(i["ntotal"]) for i in infos)
        if self._lengths is None:
            self._lengths = next((i["lengths"] for i in infos if i["lengths"]), None)

    # ------------------------------------------------------------------------------------------ state
    @property
    def shards(self) -> int:
        return len(self.actors)

    @property
    def lengths(self) -> list[int]:
        return list(self._lengths or [])

    @property
    def ntotal(self) -> int:
        """Live items over all shards, as of the last write through this index (asks no shard; after a write
        that failed, asks every shard once)."""
        with self._count:
            n, epoch = self._ntotal, self._epoch
        if n is not None:
            return n
        n = sum(int(i["ntotal"]) for i in self.shard_info())
        with self._count:
            if self._epoch == epoch and epoch % 2 == 0:  # no write began or ended meanwhile, none in flight
                self._ntotal = n
        return n

    @property
    def ids(self) -> np.ndarray:
        """Every shard's live ids, ``int64[ntotal]`` in increasing order (= insertion order for default ids); asks
        every shard."""
        return np.sort(np.concatenate([np.asarray(p, np.int64) for p in self._call_all("ids", [()] * self.shards)]))

    def _forget_count(self) -> None:
        """A shard failed or restarted: ``ntotal`` asks the shards next time (and raises for one that cannot
        start), rather than trust the count of the last write."""
        with self._count:
            self._ntotal = None

    @contextlib.contextmanager
    def _counting(self):
        """Around a write: ``ntotal`` keeps its count until the write calls ``done(counts)`` (the shards' counts
        after it, while its change becomes visible); a write that ends without that (it failed) leaves the count
        to be asked of the shards."""
        with self._count:
            self._epoch += 1  # odd while a write is in flight (one at a time: ``_write``)

        def done(counts: list) -> None:
            with self._count:
                self._epoch += 1
                self._ntotal = sum(int(c) for c in counts)

        try:
            yield done
        finally:
            with self._count:
                if self._epoch % 2:  # ended without done(): failed
                    self._epoch += 1
                    self._ntotal = None

    @property
    def thresholds(self) -> dict[int, int]:
        return dict(self._thresholds)

    @thresholds.setter
    def thresholds(self, value: Mapping[int, int]) -> None:
        """Validated against the lengths (once known), pushed to every shard (and their stores); searches
        also pass them per call, so a restarted shard answers with them too."""
        thr = self._checked(value)
        with self._write:
            self._call_all("set_thresholds", [(thr,)] * self.shards)
            self._thresholds = thr
            self._write_config()

    @property
    def weighted_thresholds(self) -> dict[int, int] | None:
        return None if self._weighted_thresholds is None else dict(self._weighted_thresholds)

    @weighted_thresholds.setter
    def weighted_thresholds(self, value: Mapping[int, int] | None) -> None:
        """The default of searches with ``query_weights`` (as :attr:`CtFIndex.weighted_thresholds`: the first
        a weighted distance), validated against the lengths once known and kept in the store's
        configuration; searches pass them to the shards."""
        thr = None if value is None else self._checked(value, weighted=True)
        with self._write:
            self._weighted_thresholds = thr
            self._write_config()

    @property
    def weighting(self) -> Weighting | None:
        """How queries' ``bn(v_1)`` values become the weights of ``weighted_thresholds`` (as
        :attr:`CtFIndex.weighting`)."""
        return self._weighting

    @weighting.setter
    def weighting(self, value: Weighting | None) -> None:
        if value is not None and not isinstance(value, Weighting):
            raise CtfreidError(f"index weighting must be a Weighting or None, got {type(value).__name__}")
        with self._write:
            self._weighting = value
            self._write_config()

    def _checked(self, value: Mapping[int, int], weighted: bool = False) -> dict[int, int]:
        """Thresholds as the one index checks them (9.7 or True is an error, not 9 or 1) once the lengths
        are known; before the first add only their keys and values as integers."""
        if self._lengths:
            # any length may be weighted (its bound then checked against the weighting at search and save)
            return check_thresholds(value, self._lengths,
                                    maxima={L: max_distance(L) for L in self._lengths} if weighted else None)
        if not isinstance(value, Mapping):
            raise CtfreidError(f"thresholds must be a dict {{length: int}}, got {type(value).__name__}")
        return {int(L): int(t) for L, t in value.items()}

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={self.shards}, lengths={self.lengths}, store={self.store})"

    def shard_info(self) -> list[dict]:
        """Per shard: pid, live items, next id, start time (changes when Ray restarted it), durability."""
        return self._call_all("info", [()] * self.shards)

    # ---------------------------------------------------------------------------------------- config
    def _read_config(self) -> dict | None:
        path = self.store / CONFIG
        if not path.exists():
            return None
        try:
            cfg = json.loads(path.read_text())
            if cfg.get("format") != FORMAT:
                raise ValueError(f"format {cfg.get('format')!r}")
            return cfg
        except (ValueError, KeyError) as e:
            raise CtfreidError(f"{path} is not a sharded-index configuration ({e})") from None

    def _config(self) -> dict:
        return {"format": FORMAT, "shards": self.shards, "lengths": self._lengths,
                "thresholds": {str(L): t for L, t in self._thresholds.items()},
                "weighted_thresholds": None if self._weighted_thresholds is None
                else {str(L): t for L, t in self._weighted_thresholds.items()},
                "weights": None if self._weighting is None else self._weighting.to_dict(),
                "default_ids": self._default_ids, "next_id": self._next_id, "fingerprint": self.fingerprint}

    def _write_config(self) -> None:
        if self.store is not None:
            with atomic_write(self.store / CONFIG, "w") as f:
                json.dump(self._config(), f)

    # ------------------------------------------------------------------------------------------ writes
    def add(self, codes: Mapping[int, np.ndarray], ids: np.ndarray | None = None,
            lock: RWLock | None = None) -> np.ndarray:
        """Add a code set ``{length: uint8[n, length // 8]}``; ``ids`` unique non-negative int64, or None for
        global ids ``next_id, next_id + 1, ...`` (never reused). Items go to shard ``id % N``; returns the
        ids. An id already held by another item is refused before any shard writes.

        In two rounds: every shard commits its part to its store (durable) and holds it; then every shard adds
        it to its index, the time of a copy in memory. Searches go on during the first round and answer without
        the items; from the second on they find them, on each shard once it has added its part. ``lock``: a
        readers-writer lock of the caller's (the service's gallery lock), held for writing during the second
        round only, so that the caller's searches see the add as one write. A call that fails because a shard
        stayed down may have been applied on the others, and retrying it with the same ids is safe."""
        with self._write:
            return self._add(codes, ids, lock)

    def _add(self, codes: Mapping[int, np.ndarray], ids: np.ndarray | None, lock: RWLock | None) -> np.ndarray:
        cs = check_code_set(codes, "codes")
        lengths = list(cs)
        n = next(iter(cs.values())).shape[0]
        if self._lengths is not None and lengths != self._lengths:
            raise CtfreidError(f"codes have lengths {lengths} but the index holds lengths {self._lengths}")
        given = ids is not None
        if self._default_ids is not None and self._default_ids == given:
            raise CtfreidError("ids must be given on every add or on none: the index was built "
                               + ("with default ids (0, 1, 2, ...)" if self._default_ids else "with explicit ids"))
        if given:
            ids_arr = check_ids(ids, n)  # the one index's checks: 1-D, integer, unique, non-negative
        else:
            ids_arr = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        next_id = max(self._next_id, int(ids_arr.max()) + 1) if n else self._next_id
        self._lengths, self._default_ids = lengths, (not given)
        self._write_config()
        shard_of = ids_arr % self.shards
        args = []
        for i in range(self.shards):
            sel = np.flatnonzero(shard_of == i)
            args.append((ids_arr[sel], {L: c[sel] for L, c in cs.items()}, next_id))
        if given:  # refuse an id held by another item on any shard before any shard writes (as one index)
            errors = [e for e in self._call_all("clash", [a[:2] for a in args]) if e]
            if errors:
                raise CtfreidError(errors[0])
        self._token += 1
        token = self._token
        with self._counting() as done:
            # durable on every shard (with a store) before any shard shows them: searches go on meanwhile
            self._call_all("stage", [(token, *a) for a in args])
            with writing(lock):
                done(self._call_all("publish", [(token, a[0]) for a in args]))
        self._next_id = next_id
        self._write_config()
        return ids_arr

    def remove_ids(self, ids: Any, lock: RWLock | None = None) -> int:
        """Remove the items with these ids from their shards; returns how many were removed. In two rounds, as
        :meth:`add`: every shard erases them from its store (committed, WAL checkpointed) while searches still
        find them, then every shard removes them from its index. ``lock``: as :meth:`CtFIndex.remove_ids`, a
        caller's readers-writer lock, held for writing during the second round only."""
        arr = ids_to_remove(ids)  # read as one index reads them
        if arr.size == 0:
            return 0
        shard_of = arr % self.shards
        parts = [(arr[shard_of == i],) for i in range(self.shards)]
        with self._write, self._counting() as done:
            removed = sum(self._call_all("erase_stored", parts))
            with writing(lock):
                done(self._call_all("remove_ids", parts))
        return int(removed)

    def _dead(self, e: Exception) -> bool:
        """Whether Ray's error ``e`` means the shard is dead for good: ActorDiedError is also raised for calls in
        flight when a restartable shard dies, so only without restarts (no store) is it final."""
        return self._max_restarts == 0 and isinstance(e, self._ray.exceptions.ActorDiedError)

    def _call_all(self, method: str, args: list[tuple], timeout: float | None = None) -> list:
        """``method(*args[i])`` on every shard ``i``, concurrently; the results once all have acknowledged.
        A shard that died mid-call is asked again once Ray has restarted it (the shards' writes are
        idempotent), for at most ``timeout`` seconds (default: the index's; writes never return without
        every shard)."""
        ray = self._ray
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        hint = _HINTS.get(method, "retry once it is back")
        out: list = [None] * self.shards
        pending = {_method(a, method).remote(*args[i]): i for i, a in enumerate(self.actors)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                raise CtfreidError(
                    f"{method}: shards {sorted(pending.values())} did not acknowledge within {timeout:g} s; {hint}")
            for ref in ready:
                i = pending.pop(ref)
                try:
                    out[i] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    self._forget_count()
                    err = _cannot_start(i, e)
                    if err is not None:
                        raise CtfreidError(f"{method}: {err}; {hint}") from None
                    if self._dead(e):
                        raise CtfreidError(f"{method}: shard {i} is dead and Ray does not restart it "
                                           f"(max_restarts=0); {hint}") from None
                    if deadline - time.monotonic() <= 0:
                        raise CtfreidError(f"{method}: shard {i} is down; {hint}") from None
                    time.sleep(0.05)
                    pending[_method(self.actors[i], method).remote(*args[i])] = i
        return out

    # ------------------------------------------------------------------------------------------ search
    def search_hits(self, query_codes: Mapping[int, np.ndarray], k: int,
                    thresholds: Mapping[int, int] | None = None, timeout: float | None = None,
                    query_weights: np.ndarray | None = None, threads: int | None = None) -> ShardedHits:
        """First ``k`` results over every shard with their coarse-to-fine keys, equal to one
        :class:`CtFIndex`'s ``search_hits`` over the same items (Sec. 3.1; exact merge, ties included).

        Every shard searches the queries concurrently (a large batch is put in the object store once). Shards that
        have not answered within ``timeout`` (default: the index's) are retried while time is left (a
        restarting shard), then listed in ``partial``: the answer then misses their items. A shard that Ray
        does not restart (``max_restarts=0``) is listed at once; one that cannot start (its store gone or
        unreadable) raises a CtfreidError naming the cause. ``query_weights``: weighted stages (as
        :meth:`CtFIndex.search_hits`), with this call's ``thresholds`` or else ``weighted_thresholds`` (for
        weights of exactly ``weighting``'s lengths). ``threads``: each shard's search threads, as
        :meth:`CtFIndex.search` (default: the shard's ``set_num_threads``, all the cores of its node)."""
        k = check_k(k)
        if threads is not None:
            threads = check_threads(threads)
        qs = _code_set(query_codes, "query codes")
        if not self._lengths:
            return ShardedHits(*_fields(empty_hits(next(iter(qs.values())).shape[0], list(qs))), partial=())
        if list(qs) != self._lengths:
            raise CtfreidError(f"query codes have lengths {list(qs)} but the index holds lengths {self._lengths}")
        nq = next(iter(qs.values())).shape[0]
        weighted: list[int] = []  # the weighted lengths
        if query_weights is not None:  # checked here (as the shards check them): one clear error, not one a shard
            query_weights = check_query_weights(query_weights, nq, self._lengths)
            weighted = list(query_weights) if isinstance(query_weights, dict) else [self._lengths[0]]
        if thresholds is None:
            thresholds = default_thresholds(self._lengths, self._thresholds, self._weighted_thresholds,
                                            self._weighting, weighted)
        thr = check_thresholds(thresholds, self._lengths, maxima={L: max_distance(L) for L in weighted})
        parts, missing = self._fan_out(qs, k, thr, self.timeout if timeout is None else _timeout(timeout),
                                       query_weights, threads)
        if not parts:
            merged = empty_hits(nq, self._lengths)
        else:
            merged = merge_hits(parts, k)
        return ShardedHits(*_fields(merged), partial=tuple(missing))

    def _fan_out(self, qs: dict, k: int, thr: dict, timeout: float, weights: np.ndarray | None = None,
                 threads: int | None = None) -> tuple[list[Hits], list[int]]:
        ray = self._ray
        # Large batches go to the object store once for all shards; a few queries travel inside the task
        # (a put plus a fetch by every shard costs ~2 ms more per call than inlining 340 bytes).
        nbytes = sum(c.nbytes for c in qs.values())
        qref = ray.put(qs) if nbytes * len(self.actors) > INLINE_BYTES else qs
        deadline = time.monotonic() + timeout
        search = [_method(a, "search_hits") for a in self.actors]
        pending = {s.remote(qref, k, thr, weights, threads): i for i, s in enumerate(search)}
        parts: list[Hits] = []
        dead: list[int] = []
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=left, fetch_local=True)
            if not ready:
                break
            for ref in ready:
                i = pending.pop(ref)
                try:
                    h = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    self._forget_count()
                    err = _cannot_start(i, e)
                    if err is not None:  # never an answer without its items, flagged or not: the operator must act
                        raise err from None
                    if self._dead(e):  # not restarted: missing now, rather than after the timeout
                        dead.append(i)
                    elif deadline - time.monotonic() > 0.05:  # restarting: ask again once it is back
                        time.sleep(0.05)
                        pending[search[i].remote(qref, k, thr, weights, threads)] = i
                    else:
                        pending[ref] = i
                    continue
                if h is not None:
                    parts.append(h)
        return parts, sorted([*pending.values(), *dead])

    def search(self, query_codes: Mapping[int, np.ndarray], k: int,
               thresholds: Mapping[int, int] | None = None, timeout: float | None = None,
               query_weights: np.ndarray | None = None, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(D int32[nq, m], I int64[nq, m])`` as :meth:`CtFIndex.search` (1-D queries give 1-D results);
        raises :class:`ShardsUnavailable` (with the partial answer) rather than answer without a shard.
        ``threads``: as :meth:`search_hits`."""
        h = self.search_hits(query_codes, k, thresholds, timeout, query_weights, threads)  # checks query_codes first
        single = all(isinstance(c, np.ndarray) and c.ndim == 1 for c in query_codes.values())
        if h.partial:
            raise ShardsUnavailable(h.partial, h, self.timeout if timeout is None else _timeout(timeout))
        D, I = h.finest_distances, h.ids
        return (D[0], I[0]) if single else (D, I)

    def range_search(self, query_codes: Mapping[int, np.ndarray], radius: int,
                     thresholds: Mapping[int, int] | None = None, timeout: float | None = None,
                     query_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``lims, D, I`` as :meth:`CtFIndex.range_search` over every shard's items (the items that pass every
        threshold and lie within ``radius`` at the longest length, in ranking order; ``query_weights``:
        weighted stages, as :meth:`search_hits`). The shards count the items that pass, then a merged top-k of
        that many returns them. Raises :class:`ShardsUnavailable` rather than answer without a shard. An add or
        removal during the call may be seen in part."""
        radius = check_radius(radius)
        t = self.timeout if timeout is None else _timeout(timeout)
        counted = self.search_hits(query_codes, 1, thresholds, timeout, query_weights)  # checks the queries first
        if counted.partial:
            raise ShardsUnavailable(counted.partial, counted, t)
        S = len(counted.lengths)
        if counted.candidates is None or not counted.ids.size:  # nothing stored
            empty = np.zeros((counted.ids.shape[0], 0), np.int64)
            return range_result(empty.astype(bool), empty, empty)
        h = self.search_hits(query_codes, max(1, int(counted.candidates[:, S - 1].max())), thresholds, timeout,
                             query_weights)
        if h.partial:
            raise ShardsUnavailable(h.partial, h, t)
        D = h.finest_distances
        return range_result((h.stages == S) & (D <= radius), D, h.ids)  # those passing every threshold lead

    # ------------------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> None:
        """Write every shard's index (``shard-<i>.ctf``, CtFIndex format) and ``sharded.json`` into
        ``directory`` (created), each file atomically, ``sharded.json`` last with the checksum of every shard
        file: ``load`` refuses a snapshot that a failed save left half-replaced."""
        if self._weighted_thresholds is not None and self._weighting is None:  # as CtFIndex.save
            raise CtfreidError("index weighted_thresholds need index.weighting (their Weighting)")
        if self._weighted_thresholds is not None and self._lengths:
            check_thresholds(self._weighted_thresholds, self._lengths,
                             maxima=weighted_maxima(self._weighting, self._lengths))
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        blobs = self._call_all("to_bytes", [()] * self.shards, timeout=max(self.timeout, 600))
        for i, b in enumerate(blobs):
            with atomic_write(d / f"shard-{i}.ctf") as f:
                f.write(b)
        with atomic_write(d / CONFIG, "w") as f:
            json.dump({**self._config(), "crc32": [_crc(b) for b in blobs]}, f)

    @classmethod
    def load(cls, directory: str | Path, shards: int | None = None, address: str | None = None,
             store: str | Path | None = None, **kwargs: Any) -> "ShardedIndex":
        """A sharded index holding what :meth:`save` wrote (``shards``: the saved count, or another count to
        reshard; items keep their ids)."""
        d = Path(directory)
        path = d / CONFIG
        try:
            cfg = json.loads(path.read_text())
            nsaved = int(cfg["shards"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CtfreidError(f"{d} does not hold a saved sharded index ({e})") from None
        weighted = _weighted_of(cfg, path)  # a bad entry is refused before any shard starts
        parts = []
        for i in range(nsaved):
            path = d / f"shard-{i}.ctf"
            parts.append(CtFIndex.load(path, mmap=False))
            with open(path, "rb") as f:
                f.seek(-4, 2)
                crc = _crc(f.read())
            if "crc32" in cfg and crc != cfg["crc32"][i]:  # saves before this check have no checksums
                raise CtfreidError(f"{path} is not the file {CONFIG} was saved with (a save into {d} failed "
                                   "midway?): save the index again")
        out = cls(shards=nsaved if shards is None else shards, address=address, store=store, **kwargs)
        if out._lengths and out.ntotal:
            raise CtfreidError(f"store {store} already holds items: load into an empty store")
        ids = np.concatenate([p.ids for p in parts]) if parts else np.empty(0, np.int64)
        order = np.argsort(ids, kind="stable")  # global ids = insertion order
        lengths = cfg["lengths"]
        if lengths:
            codes = {L: np.concatenate([p.codes(L) for p in parts])[order] for L in lengths}
            out._default_ids = None
            out.add(codes, ids[order])
        out._default_ids = cfg["default_ids"]
        out._next_id = max(out._next_id, int(cfg["next_id"]))
        if cfg["thresholds"]:
            out.thresholds = {int(L): int(t) for L, t in cfg["thresholds"].items()}
        out._weighted_thresholds, out._weighting = weighted
        out._write_config()
        return out

    def close(self) -> None:
        """Stop the shard actors (their stores stay on disk)."""
        for a in self.actors:
            try:
                self._ray.get(a.close.remote(), timeout=10)
            except Exception:  # a dead shard has nothing to close
                pass
            self._ray.kill(a, no_restart=True)
        self.actors = []


def _method(actor, name: str):
    """The remote method ``name`` of a shard actor, in its concurrency group (``_READS``: ``"reads"``)."""
    m = getattr(actor, name)
    return m.options(concurrency_group="reads") if name in _READS else m


def _weighted_of(cfg: Mapping, path: Path) -> tuple[dict[int, int] | None, Weighting | None]:
    """The weighted defaults in a configuration (absent in those written before it had them)."""
    thr, w = cfg.get("weighted_thresholds"), cfg.get("weights")
    weighting = None if w is None else Weighting.from_dict(w, f"{path}: weights")
    try:
        return None if thr is None else {int(L): int(t) for L, t in dict(thr).items()}, weighting
    except (ValueError, TypeError) as e:
        raise CtfreidError(f"{path}: weighted_thresholds must map code lengths to integers ({e})") from None


def _fields(h: Hits) -> tuple:
    return h.ids, h.stages, h.distances, h.lengths, h.candidates
