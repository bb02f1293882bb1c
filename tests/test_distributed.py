"""ShardedIndex (ctfreid.distributed) against one CtFIndex over the same items (the oracle; CtFIndex itself is
checked against brute force in test_index.py): exact hits, ties included, before and after removals, with
1, 2 and 3 shards; a SIGKILLed shard restarted by Ray with its items; the partial flag while a shard is down;
acknowledged writes surviving a reopen; save / load with resharding; bad input refused as by one index;
concurrent adds; reads, settings and saves waiting for a restarting shard; a save that failed midway; an
unreadable or missing shard store (on a reopen and on a Ray restart); a shard Ray does not restart flagged at
once; writes in two rounds (no shard shows one before every shard store has committed it, the caller's lock
only for the second round, ntotal counted without asking the shards, a shard restarted between the rounds) and
the service's gallery searching while a shard store commits. One local Ray for the module."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ctfreid.distributed import ShardedIndex, ShardsUnavailable  # noqa: E402
from ctfreid.errors import CtfreidError  # noqa: E402
from ctfreid.search.asymmetric import Weighting  # noqa: E402
from ctfreid.search.index import CtFIndex  # noqa: E402

LENGTHS = (32, 128, 512)
THR = {32: 13, 128: 60}


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def tied_codes(rng: np.random.Generator, n: int, distinct: int = 40) -> dict[int, np.ndarray]:
    """Codes drawn from few distinct rows (many exact ties at every length), with near-duplicates."""
    base = {L: rng.integers(0, 256, (distinct, L // 8), dtype=np.uint8) for L in LENGTHS}
    pick = rng.integers(0, distinct, n)
    out = {L: base[L][pick].copy() for L in LENGTHS}
    flip = rng.random(n) < 0.3  # some items differ from their twin in one byte of one length
    for L in LENGTHS:
        rows = np.flatnonzero(flip & (rng.random(n) < 0.5))
        out[L][rows, 0] ^= np.uint8(1)
    return out


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait (bounded) until process ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs after {timeout} s")


def assert_same_hits(a, b) -> None:
    assert a.lengths == b.lengths
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.stages, b.stages)
    np.testing.assert_array_equal(a.distances, b.distances)


def durable_pair(store, codes, shards: int) -> tuple:
    """One in-process index and a durable sharded one (``store``) of the same ``codes``, thresholds ``THR``."""
    one = CtFIndex()
    one.add(codes)
    one.thresholds = dict(THR)
    sharded = ShardedIndex(shards=shards, store=store, timeout=60)
    try:
        sharded.add(codes)
        sharded.thresholds = dict(THR)
    except BaseException:
        sharded.close()
        raise
    return one, sharded


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_exact_equality_with_one_index_before_and_after_removals(local_ray, shards):
    rng = np.random.default_rng(shards)
    one, sharded = CtFIndex(), ShardedIndex(shards=shards)
    try:
        for n in (150, 90):  # two adds: ids continue globally
            c = tied_codes(rng, n)
            one.add(c)
            np.testing.assert_array_equal(sharded.add(c), one.ids[-n:])
        one.thresholds = dict(THR)
        sharded.thresholds = dict(THR)
        q = tied_codes(rng, 9)
        assert sharded.ntotal == one.ntotal == 240
        for k in (1, 7, 50, 1000):
            h = sharded.search_hits(q, k)
            assert h.partial == ()
            assert_same_hits(h, one.search_hits(q, k))
        for threads in (1, 2):  # each shard's search threads: the same answers
            assert_same_hits(sharded.search_hits(q, 50, threads=threads), one.search_hits(q, 50))
        with pytest.raises(CtfreidError, match="threads must be a positive integer, got 0"):
            sharded.search(q, 5, threads=0)
        D, I = sharded.search(q, 25)
        D1, I1 = one.search(q, 25)
        np.testing.assert_array_equal(D, D1)
        np.testing.assert_array_equal(I, I1)
        d, i = sharded.search({L: c[0] for L, c in q.items()}, 5)  # one 1-D query: 1-D results, as one index
        np.testing.assert_array_equal(i, one.search({L: c[0] for L, c in q.items()}, 5)[1])
        per_call = {32: 20, 128: 70}
        assert_same_hits(sharded.search_hits(q, 30, thresholds=per_call), one.search_hits(q, 30, thresholds=per_call))
        # a weighted stage 1 (ctfreid.search.asymmetric): the weights travel to every shard
        w = rng.integers(0, 8, (9, 32), dtype=np.uint8)
        weighted = {32: 60, 128: 70}
        for k in (5, 300):
            assert_same_hits(sharded.search_hits(q, k, thresholds=weighted, query_weights=w),
                             one.search_hits(q, k, thresholds=weighted, query_weights=w))
        with pytest.raises(CtfreidError, match="no thresholds for weighted stages"):
            sharded.search_hits(q, 5, query_weights=w)
        # weights at the later stages too (a mapping), with this call's thresholds
        later = {32: w, 512: rng.integers(0, 16, (9, 512), dtype=np.uint8)}
        for k in (5, 300):
            assert_same_hits(sharded.search_hits(q, k, thresholds=weighted, query_weights=later),
                             one.search_hits(q, k, thresholds=weighted, query_weights=later))
        with pytest.raises(CtfreidError, match="no thresholds for weighted stages"):
            sharded.search_hits(q, 5, query_weights=later)
        # the weighted default, beside the Hamming one (as one index keeps both)
        for index in (one, sharded):
            index.weighted_thresholds, index.weighting = dict(weighted), Weighting(scale=1.5, bits=3)
        assert sharded.weighted_thresholds == weighted and sharded.weighting == Weighting(scale=1.5, bits=3)
        for k in (5, 300):
            got = sharded.search_hits(q, k, query_weights=w)
            assert_same_hits(got, one.search_hits(q, k, query_weights=w))
            assert_same_hits(got, one.search_hits(q, k, thresholds=weighted, query_weights=w))
            assert_same_hits(sharded.search_hits(q, k), one.search_hits(q, k, thresholds=THR))
        # a default fitted with a weighted later stage too: weights of exactly those lengths use it
        wlater = Weighting(scale=1.5, bits=3, later={512: 1.1})
        for index in (one, sharded):
            index.weighted_thresholds, index.weighting = {32: 60, 128: 70}, wlater
        assert sharded.weighting == wlater
        both = {32: w, 512: later[512]}
        for k in (5, 300):
            got = sharded.search_hits(q, k, query_weights=both)
            assert_same_hits(got, one.search_hits(q, k, thresholds={32: 60, 128: 70}, query_weights=both))
        with pytest.raises(CtfreidError, match="fitted weighting \\[32, 512\\]"):
            sharded.search_hits(q, 5, query_weights=w)
        for index in (one, sharded):
            index.weighted_thresholds, index.weighting = dict(weighted), Weighting(scale=1.5, bits=3)

        gone = rng.choice(240, 70, replace=False)
        assert sharded.remove_ids(np.concatenate([gone, [10_000]])) == one.remove_ids(gone) == 70
        assert sharded.remove_ids(gone[:5]) == 0
        assert sharded.ntotal == one.ntotal == 170
        for k in (3, 40, 1000):
            assert_same_hits(sharded.search_hits(q, k), one.search_hits(q, k))
        c = tied_codes(rng, 30)  # adds after removals: fresh ids, never a removed one
        one.add(c)
        sharded.add(c)
        assert_same_hits(sharded.search_hits(q, 60), one.search_hits(q, 60))
    finally:
        sharded.close()


def test_errors_are_ctfreid_errors_and_a_refused_add_writes_nothing(local_ray):
    sharded = ShardedIndex(shards=2)
    try:
        c = tied_codes(np.random.default_rng(0), 10)
        sharded.add(c)
        with pytest.raises(CtfreidError, match="ids must be given on every add or on none"):
            sharded.add(c, ids=np.arange(100, 110))
        with pytest.raises(CtfreidError, match="shards must be a positive integer"):
            ShardedIndex(shards=0)
    finally:
        sharded.close()
    explicit, one = ShardedIndex(shards=3), CtFIndex()
    try:
        c = tied_codes(np.random.default_rng(1), 10)
        explicit.add(c, ids=np.arange(0, 100, 10))
        one.add(c, ids=np.arange(0, 100, 10))
        clash = np.array([101, 102, 30, 104, 105, 106, 107, 108, 109, 110])  # 30 (shard 0) is taken
        with pytest.raises(CtfreidError, match="id 30 is already in the index"):
            one.add(c, ids=clash)
        with pytest.raises(CtfreidError, match="id 30 is already in the index"):
            explicit.add(c, ids=clash)
        assert explicit.ntotal == one.ntotal == 10  # nothing written on any shard, as with one index
        one.thresholds = explicit.thresholds = dict(THR)
        assert_same_hits(explicit.search_hits(c, 10), one.search_hits(c, 10))
    finally:
        explicit.close()


def test_errors_on_a_durable_index(local_ray, tmp_path):
    sharded = ShardedIndex(shards=2, store=tmp_path / "g")
    try:
        c = tied_codes(np.random.default_rng(0), 10)
        sharded.add(c)
        with pytest.raises(CtfreidError, match="lengths"):
            sharded.add({32: c[32]})
        with pytest.raises(CtfreidError, match="thresholds|threshold"):
            sharded.search_hits(c, 3)  # no thresholds for a 3-length index
        with pytest.raises(CtfreidError, match=r"thresholds\[32\] must be an integer .* in \[0, 480\]"):
            sharded.weighted_thresholds = {32: 481, 128: 60}  # a weighted distance: up to 15 x 32
        with pytest.raises(CtfreidError, match="weighting must be a Weighting"):
            sharded.weighting = {"scale": 1.0}
        sharded.weighted_thresholds, sharded.weighting = {32: 200, 128: 60}, Weighting(scale=2.0)
    finally:
        sharded.close()
    with pytest.raises(CtfreidError, match="holds 2 shards, not 3"):
        ShardedIndex(shards=3, store=tmp_path / "g")
    reopened = ShardedIndex(shards=2, store=tmp_path / "g")  # the weighted defaults are kept with the store
    try:
        assert reopened.weighted_thresholds == {32: 200, 128: 60} and reopened.weighting == Weighting(scale=2.0)
        assert reopened.thresholds == {}
    finally:
        reopened.close()


def reads_within(lock, seconds: float) -> bool:
    """Whether another thread gets ``lock``'s read side within ``seconds`` (a daemon thread waits on otherwise)."""
    got = threading.Event()

    def reader() -> None:
        with lock.read():
            got.set()

    threading.Thread(target=reader, daemon=True).start()
    return got.wait(seconds)


def blocked_store(path):
    """A connection of another process's kind holding ``path``'s SQLite write lock: the shard's commits wait
    (its busy timeout, 5 s) until ``ROLLBACK``."""
    import sqlite3

    from ctfreid.serve.store import DB_NAME

    other = sqlite3.connect(path / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_search_does_not_queue_behind_a_shards_write(local_ray, tmp_path):
    """A shard searches beside its writes (the "reads" concurrency group): while its add waits for its store
    (another process holds the SQLite write lock), a search answers at once, complete, with the items before
    the add (oracle: one index of those); once the lock is let go the add lands."""
    rng = np.random.default_rng(8)
    c, c2, q = tied_codes(rng, 200), tied_codes(rng, 50), tied_codes(rng, 6)
    one, sharded = durable_pair(tmp_path / "g", c, shards=1)
    try:
        sharded.search_hits(q, 50)  # warm: the shard's first search loads the compiled kernels
        other = blocked_store(tmp_path / "g" / "shard-0")
        added = []
        writer = threading.Thread(target=lambda: added.append(sharded.add(c2)))
        try:
            writer.start()
            time.sleep(1.0)  # the add is in the shard, waiting for the lock
            assert writer.is_alive()
            h = sharded.search_hits(q, 50, timeout=1.5)
            assert h.partial == ()  # answered, not queued behind the add
            assert_same_hits(h, one.search_hits(q, 50))
        finally:
            other.execute("ROLLBACK")
            other.close()
            writer.join(30)
        one.add(c2)
        np.testing.assert_array_equal(added[0], one.ids[-50:])
        assert_same_hits(sharded.search_hits(q, 50), one.search_hits(q, 50))
    finally:
        sharded.close()


@pytest.mark.parametrize("write", ["add", "remove"])
def test_a_write_becomes_visible_on_every_shard_at_once_after_every_store_committed(local_ray, tmp_path, write):
    """``add(lock=)`` / ``remove_ids(lock=)`` in two rounds: while one shard's store waits to commit, the caller's
    lock is free and searches answer with the items before the write (oracle: one index of those), on every
    shard (the other shard has committed but shows nothing); the write then waits for the caller's readers
    before it shows, and ``ntotal`` counts it afterwards, asking no shard."""
    from ctfreid._rwlock import RWLock

    rng = np.random.default_rng(17)
    c, c2, q = tied_codes(rng, 200), tied_codes(rng, 60), tied_codes(rng, 6)
    gone = np.arange(0, 200, 3)
    one, sharded = durable_pair(tmp_path / "g", c, shards=2)
    outer = RWLock()
    run = (lambda: sharded.add(c2, lock=outer)) if write == "add" else (lambda: sharded.remove_ids(gone, lock=outer))
    done = threading.Event()
    try:
        sharded.search_hits(q, 50)  # warm: the shards' first search loads the compiled kernels
        other = blocked_store(tmp_path / "g" / "shard-1")
        writer = threading.Thread(target=lambda: (run(), done.set()))
        try:
            writer.start()
            time.sleep(1.0)  # shard 0 has committed its part, shard 1 waits for its store's lock
            assert not done.is_set()
            assert reads_within(outer, 1.0)  # the caller's searches are not held up by the commits
            assert_same_hits(sharded.search_hits(q, 50, timeout=1.5), one.search_hits(q, 50))
            assert sharded.ntotal == 200
            with outer.read():  # a search of the caller's in progress
                other.execute("ROLLBACK")  # shard 1 commits: now the write waits for this reader only
                assert not done.wait(1.0)
                assert_same_hits(sharded.search_hits(q, 50), one.search_hits(q, 50))  # committed on both, shown on none
        finally:
            other.close()
            writer.join(30)
        assert done.is_set()
        if write == "add":
            one.add(c2)
        else:
            one.remove_ids(gone)
        assert_same_hits(sharded.search_hits(q, 50), one.search_hits(q, 50))
        counting = sharded.actors[:]
        sharded.actors[:] = [CountingActor(a) for a in counting]
        try:
            assert sharded.ntotal == one.ntotal
            assert all(a.calls == {} for a in sharded.actors)  # counted by the write, not asked
        finally:
            sharded.actors[:] = counting
        assert sum(i["ntotal"] for i in sharded.shard_info()) == one.ntotal
    finally:
        sharded.close()


def test_a_shard_restarted_between_the_rounds_of_a_write_shows_it_once(tmp_path):
    """Ray restarts a dead shard by constructing it again. Staged items are durable but not searched; a shard
    restarted before their publish reloads them from its store, and the publish then checks that it holds them
    (a publish of ids it never staged is an error); a retried stage stages nothing twice; ``erase_stored`` counts
    what the removal takes, also when a restart reloads the store before it."""
    from ctfreid.distributed.shard import Shard

    rng = np.random.default_rng(19)
    c, q = tied_codes(rng, 30), tied_codes(rng, 3)
    ids = np.arange(0, 60, 2)  # shard 0 of 2
    part = lambda a, b: {L: x[a:b] for L, x in c.items()}  # noqa: E731
    first = CtFIndex()
    first.add(part(0, 20), ids[:20])
    path = str(tmp_path / "shard-0")
    shard = Shard(0, 2, store=path)
    try:
        assert shard.stage(1, ids[:20], part(0, 20), 40) == 20
        assert shard.publish(1, ids[:20]) == 20
        assert shard.stage(2, ids[20:], part(20, 30), 60) == 10
        assert shard.index.ntotal == 20  # staged: not searched
        assert_same_hits(shard.search_hits(q, 30, THR), first.search_hits(q, 30, thresholds=THR))
    finally:
        shard.close()
    restarted = Shard(0, 2, store=path)  # the shard died before the publish
    try:
        assert restarted.index.ntotal == 30
        assert restarted.publish(2, ids[20:]) == 30
        with pytest.raises(CtfreidError, match=r"shard 0 has not staged ids \[100\]"):
            restarted.publish(3, np.array([100]))
        assert restarted.stage(4, ids[20:], part(20, 30), 60) == 0  # retried after the restart
        assert restarted.publish(4, ids[20:]) == 30
        assert restarted.erase_stored(np.array([0, 2, 4, 61])) == 3  # 61 is not held
    finally:
        restarted.close()
    again = Shard(0, 2, store=path)  # died before the removal's second round
    try:
        assert again.index.ntotal == 27 and again.remove_ids(np.array([0, 2, 4])) == 27
    finally:
        again.close()


def test_the_services_gallery_searches_while_a_shard_store_commits_an_add(local_ray, tmp_path):
    """``ctfreid serve --ray``'s gallery (a ShardedIndex under the service's store) holds its write lock only
    while the shards show the items: a search during a shard store's commit answers at once, with the items
    before the add (oracle: a gallery over one CtFIndex); afterwards with them, fields included."""
    from ctfreid.serve.gallery import Gallery
    from ctfreid.serve.store import ItemMeta, Store

    rng = np.random.default_rng(18)
    c, c2, q = tied_codes(rng, 150), tied_codes(rng, 40), tied_codes(rng, 4)
    metas = [ItemMeta(pid=i, camera=1 + i % 3, source=f"c/{i}.jpg") for i in range(190)]
    sharded = ShardedIndex(shards=2, store=tmp_path / "shards", timeout=60)
    g = oracle = None
    try:
        g = Gallery(Store(tmp_path / "a", "test", LENGTHS), THR, index=sharded)
        oracle = Gallery(Store(tmp_path / "b", "test", LENGTHS), THR)
        for x in (g, oracle):
            x.add(c, metas[:150])
        assert g.search(q, 20)[0] == oracle.search(q, 20)[0]
        other = blocked_store(tmp_path / "shards" / "shard-0")
        writer = threading.Thread(target=lambda: g.add(c2, metas[150:]))
        try:
            writer.start()
            time.sleep(1.0)  # the gallery's store has the items, a shard store waits for its lock
            assert writer.is_alive()
            answers: list = []
            searcher = threading.Thread(target=lambda: answers.append(g.search(q, 20)))
            searcher.start()
            searcher.join(1.5)
            assert answers and answers[0][0] == oracle.search(q, 20)[0]
        finally:
            other.execute("ROLLBACK")
            other.close()
            writer.join(30)
        oracle.add(c2, metas[150:])
        assert g.search(q, 20)[0] == oracle.search(q, 20)[0] and len(g) == 190
    finally:
        for x in (g, oracle):
            if x is not None:
                x.store.close()
        sharded.close()


def test_a_reopened_sharded_gallery_sends_only_what_its_shards_lack_and_removes_what_its_store_lost(local_ray,
                                                                                                   tmp_path):
    """The service's gallery over a sharded index reopened from its shard stores (``ctfreid serve --ray`` at a
    restart). A stop between the gallery's store and the shards leaves the store with adds the shards missed and
    an erasure they missed: the gallery sends the shards those adds alone, and removes the erased items, from the
    shard stores too; it reads the codes of those adds alone from its store. Its answers then equal those of a gallery
    over one CtFIndex of the same store."""
    import sqlite3

    from ctfreid.serve.gallery import Gallery
    from ctfreid.serve.store import DB_NAME, ItemMeta, Store

    rng = np.random.default_rng(20)
    c, q = tied_codes(rng, 160), tied_codes(rng, 5)
    part = lambda a, b: {L: x[a:b] for L, x in c.items()}  # noqa: E731
    metas = [ItemMeta(pid=i % 30, camera=1 + i % 3) for i in range(160)]
    sharded = ShardedIndex(shards=2, store=tmp_path / "shards", timeout=60)
    try:
        g = Gallery(Store(tmp_path / "a", "test", LENGTHS), THR, index=sharded)
        ids = g.add(part(0, 120), metas[:120])
        g.store.close()
    finally:
        sharded.close()
    store = Store(tmp_path / "a", "test", LENGTHS)  # what the stop left: the store went on without the shards
    late = store.add(part(120, 160), metas[120:])
    gone = store.delete(ids[::7])
    store.close()
    reopened = ShardedIndex(shards=2, store=tmp_path / "shards", timeout=60)
    sent: list = []
    add = reopened.add
    reopened.add = lambda codes, ids=None, lock=None: (sent.append(np.asarray(ids).tolist()), add(codes, ids, lock))[1]
    g = oracle = None
    store = Store(tmp_path / "a", "test", LENGTHS)
    unpacked: list = []  # how many items' codes the gallery reads from its store
    unpack = store.unpack
    store.unpack = lambda blobs: (unpacked.append(len(blobs)), unpack(blobs))[1]
    try:
        g = Gallery(store, THR, index=reopened)
        assert sum(sent, []) == late  # the shards' 120 items are not written again
        assert sum(unpacked) == len(late)  # nor read: only the 40 sent (the warm-up's query is one of them)
        oracle = Gallery(Store(tmp_path / "a", "test", LENGTHS), THR)
        assert g.search(q, 40)[0] == oracle.search(q, 40)[0] and len(g) == len(oracle) == 160 - len(gone)
        np.testing.assert_array_equal(reopened.ids, oracle.index.ids)
    finally:
        for x in (g, oracle):
            if x is not None:
                x.store.close()
        if g is None:
            store.close()
        reopened.close()
    for i in range(2):  # erased from the shard stores, not only from their indexes
        db = sqlite3.connect(tmp_path / "shards" / f"shard-{i}" / DB_NAME)
        held = {r[0] for r in db.execute("SELECT id FROM items")}
        db.close()
        assert not held & set(gone) and held == {j for j in oracle.index.ids.tolist() if j % 2 == i}


def test_killed_shard_is_restarted_with_its_items_and_writes_survive_a_reopen(local_ray, tmp_path):
    rng = np.random.default_rng(7)
    c = tied_codes(rng, 300)
    q = tied_codes(rng, 6)
    one, sharded = durable_pair(tmp_path / "g", c, shards=3)
    try:
        gone = np.arange(0, 300, 7)
        one.remove_ids(gone)
        sharded.remove_ids(gone)
        sharded.search_hits(q, 80)  # warm: the shards' first search loads the compiled kernels
        before = sharded.shard_info()[1]
        os.kill(before["pid"], signal.SIGKILL)  # shard 1 dies; Ray restarts it and it reloads its store
        t = time.monotonic()
        during = sharded.search_hits(q, 80, timeout=0.5)  # a restart takes seconds (a process, its imports)
        assert time.monotonic() - t < 5
        assert during.partial == (1,)
        others = CtFIndex()  # the flagged answer is exactly that of shards 0 and 2
        keep = np.setdiff1d(np.flatnonzero(np.arange(300) % 3 != 1), gone)
        others.add({L: x[keep] for L, x in c.items()}, ids=keep)
        assert_same_hits(during, others.search_hits(q, 80, thresholds=THR))
        h = sharded.search_hits(q, 80)  # waits (bounded) for the restarted shard: complete, exact
        assert h.partial == ()
        assert_same_hits(h, one.search_hits(q, 80))
        after = sharded.shard_info()[1]
        assert after["pid"] != before["pid"] and after["ntotal"] == before["ntotal"] > 0
        c2 = tied_codes(rng, 20)  # writes to the restarted shard are durable too
        one.add(c2)
        sharded.add(c2)
    finally:
        sharded.close()
    reopened = ShardedIndex(shards=3, store=tmp_path / "g")
    try:
        assert reopened.thresholds == THR and reopened.ntotal == one.ntotal
        assert_same_hits(reopened.search_hits(q, 100), one.search_hits(q, 100))
        c3 = tied_codes(rng, 5)
        one.add(c3)  # ids continue after the reopen (320 ..), none reused
        np.testing.assert_array_equal(reopened.add(c3), one.ids[-5:])
        assert_same_hits(reopened.search_hits(q, 100), one.search_hits(q, 100))
    finally:
        reopened.close()


def test_a_dead_shard_gives_an_answer_flagged_partial_never_silently_short(local_ray):
    rng = np.random.default_rng(3)
    c = tied_codes(rng, 120)
    q = tied_codes(rng, 4)
    sharded = ShardedIndex(shards=2)  # no store: a dead shard is not restarted (it would come back empty)
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
        # both shards answer first, so the live one has its search kernels loaded before the short timeouts
        # below (loading them from numba's cache took over a second on a busy 2-core machine)
        assert sharded.search_hits(q, 50).partial == ()
        pid = sharded.shard_info()[1]["pid"]
        ray.kill(sharded.actors[1], no_restart=True)
        wait_gone(pid)  # ray.kill returns at once: the old process could still answer the next call
        t = time.monotonic()
        h = sharded.search_hits(q, 50, timeout=1.0)
        assert time.monotonic() - t < 20
        assert h.partial == (1,)
        survivors = CtFIndex()  # the answer is exactly shard 0's part: the even ids
        even = np.arange(0, 120, 2)
        survivors.add({L: x[even] for L, x in c.items()}, ids=even)
        survivors.thresholds = dict(THR)
        assert_same_hits(h, survivors.search_hits(q, 50))
        with pytest.raises(ShardsUnavailable, match=r"shards \[1\]") as e:
            sharded.search(q, 50, timeout=0.5)
        assert e.value.missing == (1,)
        with pytest.raises(CtfreidError, match="retry it with the same ids"):
            sharded.timeout = 1.0
            sharded.add(tied_codes(rng, 4))
    finally:
        sharded.close()


def test_save_and_load_with_resharding(local_ray, tmp_path):
    rng = np.random.default_rng(11)
    c = tied_codes(rng, 200)
    q = tied_codes(rng, 5)
    one = CtFIndex()
    one.add(c)
    one.thresholds = dict(THR)
    one.remove_ids(np.arange(0, 200, 3))
    sharded = ShardedIndex(shards=3)
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
        sharded.remove_ids(np.arange(0, 200, 3))
        sharded.weighted_thresholds = {32: 150, 128: 60}
        with pytest.raises(CtfreidError, match="weighted_thresholds need index.weighting"):
            sharded.save(tmp_path / "saved")  # as one index: thresholds in units nobody could compute
        assert not (tmp_path / "saved").exists()
        sharded.weighting = Weighting(scale=3.0, bits=2)
        sharded.save(tmp_path / "saved")
    finally:
        sharded.close()
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "shard-0.ctf", "shard-1.ctf", "shard-2.ctf", "sharded.json"]
    loaded = ShardedIndex.load(tmp_path / "saved", shards=2)
    try:
        assert loaded.shards == 2 and loaded.thresholds == THR and loaded.ntotal == one.ntotal
        assert loaded.weighted_thresholds == {32: 150, 128: 60} and loaded.weighting == Weighting(scale=3.0, bits=2)
        assert_same_hits(loaded.search_hits(q, 150), one.search_hits(q, 150))
        c2 = tied_codes(rng, 10)
        one.add(c2)
        np.testing.assert_array_equal(loaded.add(c2), one.ids[-10:])  # default ids continue at 200
        assert_same_hits(loaded.search_hits(q, 150), one.search_hits(q, 150))
    finally:
        loaded.close()


def test_bad_input_is_refused_as_by_one_index(local_ray):
    c = tied_codes(np.random.default_rng(5), 20)
    q = {L: x[:2] for L, x in c.items()}
    one, sharded = CtFIndex(), ShardedIndex(shards=2)
    try:
        one.add(c)
        sharded.add(c)
        one.thresholds = sharded.thresholds = dict(THR)
        for bad in ({32: 9.7, 128: 60}, {32: True, 128: 60}):  # were truncated to 9 and 1
            with pytest.raises(CtfreidError, match=r"thresholds\[32\] must be an integer"):
                sharded.thresholds = bad
        assert sharded.thresholds == THR
        with pytest.raises(CtfreidError, match="thresholds must be a dict"):
            sharded.thresholds = [13, 60]
        with pytest.raises(CtfreidError, match="thresholds must be a dict"):
            sharded.search_hits(q, 3, thresholds=[13, 60])
        with pytest.raises(CtfreidError, match="query codes must be a non-empty dict"):
            sharded.search([1, 2], 3)  # was an AttributeError
        assert sharded.remove_ids([]) == one.remove_ids([]) == 0  # [] is float64 to numpy
        mixed = {32: c[32][0], 128: c[128][:1], 512: c[512][:1]}  # one query, 1-D and 2-D: 2-D results
        assert sharded.search(mixed, 3)[1].shape == one.search(mixed, 3)[1].shape == (1, 3)
        for t in (0, -1.0, float("nan"), "5"):
            with pytest.raises(CtfreidError, match="timeout must be a positive number"):
                sharded.search_hits(q, 3, timeout=t)  # 0 or -1 flagged every shard missing, nan raised in Ray
        with pytest.raises(CtfreidError, match="timeout must be a positive number"):
            ShardedIndex(shards=1, timeout=None)
    finally:
        sharded.close()


def test_concurrent_adds_get_distinct_default_ids(local_ray):
    sharded, got, errors = ShardedIndex(shards=3), [], []

    def adder(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(8):
            c = tied_codes(rng, 5)
            try:
                got.append((sharded.add(c), c))
            except Exception as e:  # noqa: BLE001 - two adds took the same default ids
                errors.append(e)

    try:
        threads = [threading.Thread(target=adder, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        ids = np.concatenate([i for i, _ in got])
        np.testing.assert_array_equal(np.sort(ids), np.arange(80))
        one = CtFIndex()  # the same items, in id order, in one index
        order = np.argsort([i[0] for i, _ in got])
        one.add({L: np.concatenate([got[j][1][L] for j in order]) for L in LENGTHS})
        one.thresholds = sharded.thresholds = dict(THR)
        q = tied_codes(np.random.default_rng(9), 4)
        assert_same_hits(sharded.search_hits(q, 60), one.search_hits(q, 60))
    finally:
        sharded.close()


def test_a_restarting_shard_delays_counts_settings_and_saves_instead_of_failing(local_ray, tmp_path):
    rng = np.random.default_rng(8)
    c, q = tied_codes(rng, 40), tied_codes(rng, 3)
    one = CtFIndex()
    one.add(c)
    sharded = ShardedIndex(shards=2, store=tmp_path / "g", timeout=60)
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
        # each call right after a SIGKILL raised Ray's ActorUnavailableError / ActorDiedError: the service
        # asked ntotal on every search, so a restart failed its searches instead of delaying them
        os.kill(sharded.shard_info()[1]["pid"], signal.SIGKILL)
        assert sum(i["ntotal"] for i in sharded.shard_info()) == 40
        os.kill(sharded.shard_info()[1]["pid"], signal.SIGKILL)
        sharded.thresholds = one.thresholds = {32: 20, 128: 70}
        os.kill(sharded.shard_info()[0]["pid"], signal.SIGKILL)
        sharded.save(tmp_path / "snap")
        assert_same_hits(sharded.search_hits(q, 50), one.search_hits(q, 50))
    finally:
        sharded.close()
    loaded = ShardedIndex.load(tmp_path / "snap")
    try:
        assert loaded.thresholds == one.thresholds
        assert_same_hits(loaded.search_hits(q, 50), one.search_hits(q, 50))
    finally:
        loaded.close()


def test_a_save_that_failed_midway_is_refused_on_load(local_ray, tmp_path, monkeypatch):
    import ctfreid.distributed.sharded as sharded_mod

    rng = np.random.default_rng(12)
    sharded = ShardedIndex(shards=2)
    try:
        sharded.add(tied_codes(rng, 20))
        sharded.save(tmp_path / "snap")
        sharded.add(tied_codes(rng, 10))
        sharded.remove_ids(np.arange(20))
        real, calls = sharded_mod.atomic_write, []

        def full_disk(*args, **kwargs):
            calls.append(args[0])
            if len(calls) == 2:  # shard-0.ctf is replaced, shard-1.ctf and sharded.json are not
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(sharded_mod, "atomic_write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            sharded.save(tmp_path / "snap")
    finally:
        sharded.close()
    # loaded before: shard 0 of the second save (ids 20, 22, ..) with shard 1 of the first (1, 3, .., 19)
    with pytest.raises(CtfreidError, match="shard-0.ctf is not the file sharded.json was saved with"):
        ShardedIndex.load(tmp_path / "snap")


def test_an_unreadable_shard_store_is_an_error_not_an_empty_shard(local_ray, tmp_path):
    sharded = ShardedIndex(shards=2, store=tmp_path / "g")
    try:
        sharded.add(tied_codes(np.random.default_rng(13), 20))
    finally:
        sharded.close()
    for f in (tmp_path / "g" / "shard-1").iterdir():
        f.unlink()
    (tmp_path / "g" / "shard-1" / "gallery.sqlite").write_bytes(b"not a database" * 512)
    # was: shard 1 came up empty and every answer missed its items, flagged complete (partial == ())
    with pytest.raises(CtfreidError, match="shard 1 cannot start: shard store .*shard-1/gallery.sqlite cannot be read"):
        ShardedIndex(shards=2, store=tmp_path / "g")


def test_a_missing_shard_store_is_an_error_on_reopen_not_an_empty_shard(local_ray, tmp_path):
    rng = np.random.default_rng(14)
    c, q = tied_codes(rng, 30), tied_codes(rng, 4)
    one = CtFIndex()
    one.add(c)
    one.thresholds = dict(THR)
    sharded = ShardedIndex(shards=2, store=tmp_path / "g")
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
    finally:
        sharded.close()
    shard1 = tmp_path / "g" / "shard-1"
    shard1.rename(tmp_path / "elsewhere")  # deleted, or its disk not mounted
    # was: shard 1 came up empty, answers missed its items flagged complete, and writes began a new store there
    with pytest.raises(CtfreidError, match=r"shard 1 cannot start: shard store \S*shard-1/ is missing .*restore or"):
        ShardedIndex(shards=2, store=tmp_path / "g")
    assert not shard1.exists()
    shard1.mkdir()  # the empty mount point of a disk that is not mounted
    with pytest.raises(CtfreidError, match=r"shard-1/ is missing"):
        ShardedIndex(shards=2, store=tmp_path / "g")
    assert list(shard1.iterdir()) == []
    shard1.rmdir()
    (tmp_path / "elsewhere").rename(shard1)  # mounted again: every item is back
    reopened = ShardedIndex(shards=2, store=tmp_path / "g")
    try:
        assert reopened.ntotal == one.ntotal == 30
        assert_same_hits(reopened.search_hits(q, 30), one.search_hits(q, 30))
    finally:
        reopened.close()

    few = ShardedIndex(shards=3, store=tmp_path / "f")  # fewer items than shards: shard 2 never stored any
    try:
        few.add({L: x[:2] for L, x in c.items()})
    finally:
        few.close()
    assert not (tmp_path / "f" / "shard-2").exists()
    again = ShardedIndex(shards=3, store=tmp_path / "f")  # starts normally, and shard 2 takes items later
    try:
        assert again.ntotal == 2
        np.testing.assert_array_equal(again.add({L: x[2:6] for L, x in c.items()}), [2, 3, 4, 5])
        assert again.ntotal == 6
    finally:
        again.close()


def test_a_shard_restarted_after_its_store_vanished_raises_instead_of_answering_empty(local_ray, tmp_path):
    rng = np.random.default_rng(15)
    c, q = tied_codes(rng, 40), tied_codes(rng, 3)
    sharded = ShardedIndex(shards=2, store=tmp_path / "g", timeout=120)
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
        assert sharded.search_hits(q, 40).partial == ()
        pid = sharded.shard_info()[1]["pid"]
        shutil.rmtree(tmp_path / "g" / "shard-1")
        ray.kill(sharded.actors[1], no_restart=False)  # Ray restarts it with the same arguments: store gone
        wait_gone(pid)  # ray.kill returns at once: the old process could still answer the next call
        # was: it came back empty; searches answered without its items (partial == ()) and ntotal said 20
        with pytest.raises(CtfreidError, match=r"shard 1 cannot start: shard store \S*shard-1/ is missing"):
            sharded.search_hits(q, 40)
        with pytest.raises(CtfreidError, match="shard-1/ is missing"):
            sharded.search(q, 40)
        with pytest.raises(CtfreidError, match="shard-1/ is missing"):
            sharded.ntotal
        with pytest.raises(CtfreidError, match="shard-1/ is missing"):
            sharded.add(tied_codes(rng, 4))
        assert not (tmp_path / "g" / "shard-1").exists()  # no new, empty store in its place
    finally:
        sharded.close()


class CountingActor:
    """An actor handle that counts the calls made through it (method lookups)."""

    def __init__(self, actor) -> None:
        self.actor, self.calls = actor, {}

    def __getattr__(self, name: str):
        self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(self.actor, name)


def test_a_shard_that_is_not_restarted_is_missing_at_once_not_asked_until_the_timeout(local_ray):
    rng = np.random.default_rng(16)
    c, q = tied_codes(rng, 60), tied_codes(rng, 3)
    sharded = ShardedIndex(shards=2, timeout=3)  # no store: Ray does not restart a dead shard
    dead = sharded.actors[1]
    try:
        sharded.add(c)
        sharded.thresholds = dict(THR)
        assert sharded.search_hits(q, 30).partial == ()
        ray.kill(dead, no_restart=True)
        for _ in range(600):  # until Ray reports it dead
            try:
                ray.get(dead.info.remote())
            except ray.exceptions.ActorDiedError:
                break
            time.sleep(0.05)
        sharded.actors[1] = counting = CountingActor(dead)
        h = sharded.search_hits(q, 30)
        # was: asked again every 50 ms until the timeout (each search and ntotal waited it in full)
        assert counting.calls == {"search_hits": 1}
        assert h.partial == (1,)
        survivors = CtFIndex()  # the answer is exactly shard 0's part: the even ids
        even = np.arange(0, 60, 2)
        survivors.add({L: x[even] for L, x in c.items()}, ids=even)
        assert_same_hits(h, survivors.search_hits(q, 30, thresholds=THR))
        with pytest.raises(CtfreidError, match="info: shard 1 is dead and Ray does not restart it"):
            sharded.ntotal
        assert counting.calls == {"search_hits": 1, "info": 1}
    finally:
        sharded.actors[1] = dead
        sharded.close()


@pytest.mark.parametrize("shards", [1, 3])
def test_range_search_equals_one_index(local_ray, shards):
    rng = np.random.default_rng(10 + shards)
    one, sharded = CtFIndex(), ShardedIndex(shards=shards)
    try:
        q = tied_codes(rng, 6)
        lims, D, I = sharded.range_search(q, 100)  # empty: nothing stored yet
        assert lims.tolist() == [0] * 7 and D.size == I.size == 0
        c = tied_codes(rng, 200)
        one.add(c)
        sharded.add(c)
        q = {L: v[:6].copy() for L, v in c.items()}  # gallery rows: their twins pass the thresholds
        for index in (one, sharded):
            index.thresholds = dict(THR)
        gone = rng.choice(200, 40, replace=False)
        one.remove_ids(gone)
        sharded.remove_ids(gone)
        found = []
        for radius, thr in ((512, None), (200, None), (240, {32: 20, 128: 70}), (0, None)):
            got, want = sharded.range_search(q, radius, thr), one.range_search(q, radius, thr)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
            found.append(int(want[0][-1]))
        assert found[0] > found[1] > 0  # not vacuous: results, fewer with a smaller radius
        w = rng.integers(0, 16, (6, 32), dtype=np.uint8)  # a weighted stage 1: per call, then the default
        for index in (one, sharded):
            index.weighted_thresholds, index.weighting = {32: 90, 128: 70}, Weighting(scale=1.0)
        for radius, thr in ((512, {32: 150, 128: 70}), (512, None), (200, None)):
            got = sharded.range_search(q, radius, thr, query_weights=w)
            want = one.range_search(q, radius, thr, query_weights=w)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
            assert want[0][-1] > 0
        with pytest.raises(CtfreidError, match="radius"):
            sharded.range_search(q, -1)
    finally:
        sharded.close()
