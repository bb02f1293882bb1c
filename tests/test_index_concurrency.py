"""CtFIndex under concurrency: threads searching while a thread adds and removes (every answer equals the
answer of one whole state, computed beforehand on a separately built index), and loads racing a process
that keeps replacing the file (every load is one of the two saved indexes, never an error)."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from reference import correlated_code_sets

from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.coarse_to_fine import ctf_search
from ctfreid.search.index import CtFIndex
from ctfreid.search.parallel import get_num_threads

LENGTHS = (32, 128, 512)
TH = {32: 11, 128: 48}


def test_searches_see_whole_writes():
    rng = np.random.default_rng(0)
    q, g = correlated_code_sets(rng, 4000, 4, LENGTHS)
    ids = np.arange(4000)
    # the plan: start with 2000 items, then alternately add 200 and remove 100 live ones
    live = list(range(2000))
    ops, states, nxt = [], [list(live)], 2000
    for step in range(14):
        if step % 2 == 0:
            ops.append(("add", np.arange(nxt, nxt + 200)))
            live += list(range(nxt, nxt + 200))
            nxt += 200
        else:
            gone = rng.choice(live, 100, replace=False)
            ops.append(("remove", gone))
            live = [i for i in live if i not in set(gone.tolist())]
        states.append(list(live))

    def answer(index):
        D, I = index.search(q, 30)
        return I.tolist()

    expected = []
    for rows in states:  # reference answers: a fresh index per state, single-threaded
        ref = CtFIndex()
        ref.add({L: c[rows] for L, c in g.items()}, ids=ids[rows])
        ref.thresholds = dict(TH)
        expected.append(answer(ref))

    index = CtFIndex()
    index.add({L: c[:2000] for L, c in g.items()}, ids=ids[:2000])
    index.thresholds = dict(TH)
    started, finished = [0], [0]
    failures, checked = [], [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            lo = finished[0]
            got = answer(index)
            hi = started[0]
            if not any(got == expected[v] for v in range(lo, hi + 1)):
                failures.append((lo, hi))
            checked[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for kind, arg in ops:
        started[0] += 1
        if kind == "add":
            index.add({L: c[arg] for L, c in g.items()}, ids=ids[arg])
        else:
            assert index.remove_ids(arg) == 100
        finished[0] += 1
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not failures, f"{len(failures)} of {checked[0]} searches saw half a write"
    assert checked[0] > 20 and answer(index) == expected[-1]


def test_threads_share_the_scratch_of_the_searches_that_ran_at_once(monkeypatch):
    """Search scratch belongs to a search while it runs, not to its thread: searches one after another on 12
    threads that stay alive leave one scratch set (a service's worker threads each kept tens of MB at 1e6
    items); 4 searches held inside the kernel at once take 4 sets, of which ``get_num_threads()`` are kept; and
    4 threads searching at once (one query and batches) get the answers of ``ctf_search`` (oracle) whichever
    set they took."""
    rng = np.random.default_rng(6)
    q, g = correlated_code_sets(rng, 6000, 32, LENGTHS)
    index = CtFIndex()
    index.add(g)
    index.thresholds = dict(TH)
    want = ctf_search(q, g, TH, 40)
    rows = [slice(i, i + 1) for i in range(32)] + [slice(0, 16), slice(16, 32), slice(0, 32)]
    failures = []

    def check(r):
        D, I = index.search({L: c[r] for L, c in q.items()}, 40, threads=1)
        if not (np.array_equal(D, want[0][r]) and np.array_equal(I, want[1][r])):
            failures.append(r)

    def run(target, args):
        threads = [threading.Thread(target=target, args=a) for a in args]
        for t in threads:
            t.start()
        return threads

    done = threading.Event()

    def one_after_another(i, go, finished):
        go.wait()
        check(rows[i])
        finished.set()
        done.wait()  # alive until every thread has searched

    signals = [(threading.Event(), threading.Event()) for _ in range(12)]
    threads = run(one_after_another, [(i, *s) for i, s in enumerate(signals)])
    for go, finished in signals:
        go.set()
        assert finished.wait(30)
    assert len(index._scratch) == 1
    done.set()

    kernel, met = _kernels.ctf_topk, threading.Barrier(4, timeout=30)

    def held(*args):  # every search waits inside the kernel call until all 4 are there: 4 sets taken at once
        met.wait()
        return kernel(*args)

    monkeypatch.setattr(_kernels, "ctf_topk", held)
    for t in run(check, [(rows[i],) for i in range(4)]):
        t.join(timeout=60)
    assert not failures and len(index._scratch) == min(4, get_num_threads())
    monkeypatch.setattr(_kernels, "ctf_topk", kernel)

    def at_once(seed):
        for r in np.random.default_rng(seed).permutation(len(rows) * 2) % len(rows):
            check(rows[r])

    for t in run(at_once, [(s,) for s in range(4)]):
        t.join(timeout=60)
    assert not failures and 1 <= len(index._scratch) <= min(4, get_num_threads())


SAVER = """
import sys, time
from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.coarse_to_fine import ctf_search
from ctfreid.search.index import CtFIndex
from ctfreid.search.parallel import get_num_threads
a, b, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
blobs = [CtFIndex.from_bytes(open(p, "rb").read()) for p in (a, b)]
end, i = time.time() + seconds, 0
print("ready", flush=True)
while time.time() < end:
    blobs[i % 2].save(path)
    i += 1
"""


@pytest.mark.parametrize("mmap", [True, False])
def test_loads_racing_a_saver_process_never_mix_two_files(tmp_path, mmap):
    rng = np.random.default_rng(1)
    sets = [correlated_code_sets(rng, n, 1, LENGTHS)[1] for n in (3000, 2000)]
    paths = []
    for i, codes in enumerate(sets):
        index = CtFIndex()
        index.add(codes)
        index.thresholds = dict(TH)
        paths.append(tmp_path / f"{i}.ctf")
        index.save(paths[-1])
    target = tmp_path / "live.ctf"
    paths[0].rename(tmp_path / "a.ctf")
    a = CtFIndex.from_bytes((tmp_path / "a.ctf").read_bytes())
    a.save(target)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path / "a.ctf"), str(paths[1]), str(target), "2.5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen = {3000: 0, 2000: 0}
        end = time.time() + 2.0
        while time.time() < end:
            loaded = CtFIndex.load(target, mmap=mmap)  # must never raise: the file is always whole
            n = loaded.ntotal
            assert n in seen
            np.testing.assert_array_equal(loaded.codes(512), sets[0 if n == 3000 else 1][512])
            seen[n] += 1
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0 and min(seen.values()) > 0, seen


def test_searches_go_on_while_an_add_copies_into_larger_buffers(block_next_grow, search_during):
    """The doubling copy of a growing index holds only the read lock: a search during it answers at once, with
    the items before the add (oracle: an index built from them alone); after the add it has them all."""
    rng = np.random.default_rng(3)
    q, g = correlated_code_sets(rng, 3000, 4, LENGTHS)
    index, before, after = CtFIndex(), CtFIndex(), CtFIndex()
    for x, n in ((index, 1024), (before, 1024), (after, 3000)):
        x.add({L: c[:n] for L, c in g.items()})
    copying, release = block_next_grow()
    answer, _ = search_during(copying, release, lambda: index.add({L: c[1024:] for L, c in g.items()}),
                              lambda: index.search(q, 20, TH))
    for a, b in zip(answer, before.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(index.search(q, 20, TH), after.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    index.reserve(5000)  # room now: the next adds of up to 5000 items copy nothing
    assert index._ids.shape[0] >= 3000 + 5000
    buffers = [index._codes[L] for L in LENGTHS] + [index._ids]
    index.add({L: c[:100] for L, c in g.items()})
    assert all(a is b for a, b in zip(buffers, [index._codes[L] for L in LENGTHS] + [index._ids]))
    assert index.ntotal == 3100
    with pytest.raises(CtfreidError, match="reserve needs a number of items"):
        index.reserve(-1)


def test_searches_go_on_while_a_removal_compacts(block_next_compaction, search_during):
    """A removal past COMPACT_FRACTION compacts the index: the copy of the live items holds only the read
    lock. A search during it answers at once and without the removed items (oracle: an index built from the
    others alone); after it the index holds no dead slot and answers the same."""
    from ctfreid.search import index as index_mod

    rng = np.random.default_rng(4)
    q, g = correlated_code_sets(rng, 3000, 4, LENGTHS)
    gone = rng.choice(3000, 900, replace=False)  # 30 % > COMPACT_FRACTION
    assert gone.size > index_mod.COMPACT_FRACTION * 3000
    keep = np.setdiff1d(np.arange(3000), gone)
    index, oracle = CtFIndex(), CtFIndex()
    index.add(g)
    oracle.add({L: c[keep] for L, c in g.items()}, keep)
    copying, release = block_next_compaction()
    answer, ndead = search_during(copying, release, lambda: index.remove_ids(gone), lambda: index.search(q, 20, TH),
                                  lambda: index._ndead)
    assert ndead == 900  # still copying: the search ran during the copy
    for a, b in zip(answer, oracle.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    assert index._ndead == 0 and index.ntotal == 2100
    for a, b in zip(index.search(q, 20, TH), oracle.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(index.ids, keep)
    index.add({L: c[:5] for L, c in g.items()})  # default ids go on after the removed ones, never reused
    assert index.ntotal == 2105 and index.ids[-5:].tolist() == list(range(3000, 3005))
    # compact=False leaves the dead slots to compact(due=True), which compacts only past COMPACT_FRACTION
    index.remove_ids(np.arange(3000, 3005), compact=False)
    index.compact(due=True)
    assert index._ndead == 5
    index.remove_ids(index.ids[:1000], compact=False)
    assert index._ndead == 1005 and index.ntotal == 1100
    index.compact(due=True)
    assert index._ndead == 0 and index.ntotal == 1100


def test_searches_go_on_while_a_first_removal_copies_a_loaded_map(tmp_path, block_next_grow, search_during):
    """The first removal from an index loaded as a read-only map copies its buffers into memory under the read
    lock: a search during the copy answers at once, with every item (the removal comes after the copy); after
    the removal the items are gone (oracle: an index built without them) and the file is unchanged."""
    rng = np.random.default_rng(5)
    q, g = correlated_code_sets(rng, 2000, 4, LENGTHS)
    full, oracle = CtFIndex(), CtFIndex()
    full.add(g)
    gone = np.arange(0, 2000, 50)  # 40 items: no compaction
    keep = np.setdiff1d(np.arange(2000), gone)
    oracle.add({L: c[keep] for L, c in g.items()}, keep)
    full.save(tmp_path / "g.ctf")
    index = CtFIndex.load(tmp_path / "g.ctf", mmap=True)
    assert not index._codes[LENGTHS[0]].flags.writeable
    copying, release = block_next_grow()
    answer, _ = search_during(copying, release, lambda: index.remove_ids(gone), lambda: index.search(q, 20, TH))
    for a, b in zip(answer, full.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    assert index.ntotal == 1960 and all(index._codes[L].flags.writeable for L in LENGTHS)
    for a, b in zip(index.search(q, 20, TH), oracle.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    assert CtFIndex.load(tmp_path / "g.ctf").ntotal == 2000  # the map was copied, the file left alone


@pytest.mark.parametrize("phase", ["look-up", "erasure"])
def test_searches_go_on_while_a_removal_looks_up_and_erases(block_next_removal, search_during, phase):
    """A removal holds the write lock only to swap in the live bits: a search during its look-up of the ids
    answers at once with every item, and one during its erasure of their codes answers at once without them
    (oracles: indexes built with and without the items). After it, the removed codes are zeros in memory."""
    rng = np.random.default_rng(6)
    q, g = correlated_code_sets(rng, 3000, 4, LENGTHS)
    gone = rng.choice(3000, 200, replace=False)  # below COMPACT_FRACTION: the dead slots stay
    keep = np.setdiff1d(np.arange(3000), gone)
    index, full, oracle = CtFIndex(), CtFIndex(), CtFIndex()
    index.add(g)
    full.add(g)
    oracle.add({L: c[keep] for L, c in g.items()}, keep)
    before, after = block_next_removal
    copying, release = (before if phase == "look-up" else after)()
    answer, ntotal = search_during(copying, release, lambda: index.remove_ids(gone), lambda: index.search(q, 20, TH),
                                   lambda: index.ntotal)
    expected = full if phase == "look-up" else oracle
    assert ntotal == (3000 if phase == "look-up" else 2800)
    for a, b in zip(answer, expected.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    assert index.ntotal == 2800 and index._ndead == 200
    for L in LENGTHS:
        assert not index._codes[L][gone].any() and index._codes[L][keep].any()
    for a, b in zip(index.search(q, 20, TH), oracle.search(q, 20, TH)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(index.rank(q, TH), oracle.rank(q, TH)):  # full rankings read every slot
        np.testing.assert_array_equal(a, b)


def test_a_removal_holds_the_callers_lock_for_writing_only_while_it_becomes_visible():
    """``remove_ids(lock=)``: the removal waits for the caller's readers before it becomes visible (so the
    caller's searches see it as one write), and the index's own searches go on meanwhile, with every item."""
    from ctfreid._rwlock import RWLock

    rng = np.random.default_rng(7)
    q, g = correlated_code_sets(rng, 2000, 4, LENGTHS)
    index, full = CtFIndex(), CtFIndex()
    index.add(g)
    full.add(g)
    outer = RWLock()
    done = threading.Event()
    with outer.read():  # a search of the caller's in progress
        remover = threading.Thread(target=lambda: (index.remove_ids(np.arange(100), lock=outer), done.set()))
        remover.start()
        assert not done.wait(1.0)  # waits for the caller's reader
        assert index.ntotal == 2000
        for a, b in zip(index.search(q, 20, TH), full.search(q, 20, TH)):
            np.testing.assert_array_equal(a, b)
    assert done.wait(30)
    remover.join(30)
    assert index.ntotal == 1900 and not (np.isin(index.search(q, 20, TH)[1], np.arange(100))).any()
