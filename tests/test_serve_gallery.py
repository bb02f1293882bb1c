"""The service's gallery in process: its filter fields (NumPy columns) against the stored rows, filters against
a Python loop over the items, and erasure clearing the fields from memory."""

from __future__ import annotations

import numpy as np
import pytest

from ctfreid.serve.gallery import Filter, Gallery
from ctfreid.serve.store import ItemMeta, Store

LENGTHS = [32, 64]


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(5)
    store = Store(tmp_path / "s", "test", LENGTHS)
    n = 300
    metas = [ItemMeta(pid=None if i % 7 == 0 else int(rng.integers(-5, 5)),
                      camera=None if i % 5 == 0 else int(rng.integers(1, 4)),
                      time=None if i % 3 == 0 else 1.7e9 + float(rng.integers(0, 100)),
                      source=None if i % 2 else f"c/{i}.jpg") for i in range(n)]
    base = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    store.add({32: base[:100, :4].copy(), 64: base[:100]}, metas[:100])
    g = Gallery(store, {32: 32})  # reopened below: the fields come from the store as well as from adds
    g.add({32: base[100:, :4].copy(), 64: base[100:]}, metas[100:])
    yield g, store, base
    store.close()


def test_fields_filters_and_answers_equal_the_stored_rows(gallery):
    g, store, base = gallery
    q = {32: base[:3, :4].copy(), 64: base[:3]}
    rows = {r["id"]: r for r in store.scroll(limit=1000)[0]}
    for flt in (None, Filter(camera=2), Filter(time_from=1.7e9 + 20, time_to=1.7e9 + 60),
                Filter(camera=1, time_to=1.7e9 + 50), Filter(camera=9)):
        hits, _, _ = g.search(q, 40, flt=flt)
        allh, _, _ = g.search(q, 300)
        for got, every in zip(hits, allh):
            def passes(r):
                if flt is None:
                    return True
                if flt.camera is not None and r["camera"] != flt.camera:
                    return False
                t = r["time"]
                if flt.time_from is not None and (t is None or t < flt.time_from):
                    return False
                return not (flt.time_to is not None and (t is None or t > flt.time_to))
            want = [h["id"] for h in every if passes(rows[h["id"]])][:40]
            assert [h["id"] for h in got] == want, flt
            for h in got:  # the answered fields are the stored ones
                assert {k: h[k] for k in ("pid", "camera", "time", "source")} == \
                    {k: rows[h["id"]][k] for k in ("pid", "camera", "time", "source")}


def test_update_and_erase_change_the_fields_in_memory(gallery):
    g, store, base = gallery
    i = 11  # ids start at 1: metas[10], with a source and a pid, camera null
    assert g.fields.source[i] == "c/10.jpg" and not g.fields.has_camera[i] and g.fields.has_pid[i]
    g.update(i, ItemMeta(camera=3), ["camera"])
    assert g.fields.has_camera[i] and g.fields.camera[i] == 3 and g.fields.source[i] == "c/10.jpg"
    g.erase([i, 7])
    assert i not in g.fields.source and not g.fields.has_pid[[i, 7]].any() and not g.fields.has_camera[i]
    assert np.isnan(g.fields.time[[i, 7]]).all()


def test_searches_go_on_while_an_add_grows_the_index(tmp_path, block_next_grow, search_during):
    """The service's add reserves the index's larger buffers before it takes its write lock: a search during
    the copy answers at once, with the items before the add (oracle: the same search on a gallery of those)."""
    rng = np.random.default_rng(9)
    base = rng.integers(0, 256, (1500, 8), dtype=np.uint8)
    codes = lambda a, b: {32: base[a:b, :4].copy(), 64: base[a:b].copy()}  # noqa: E731
    metas = [ItemMeta(camera=1 + i % 3) for i in range(1500)]
    g, oracle = (Gallery(Store(tmp_path / name, "test", LENGTHS), {32: 14}) for name in ("a", "b"))
    for x in (g, oracle):
        x.add(codes(0, 1024), metas[:1024])
    copying, release = block_next_grow()
    q = codes(0, 5)
    answer, _ = search_during(copying, release, lambda: g.add(codes(1024, 1500), metas[1024:]), lambda: g.search(q, 10))
    assert answer[0] == oracle.search(q, 10)[0] and len(answer[0][0]) == 10
    oracle.add(codes(1024, 1500), metas[1024:])
    assert g.search(q, 10)[0] == oracle.search(q, 10)[0]
    assert len(g) == 1500
    for x in (g, oracle):
        x.store.close()


def test_searches_go_on_while_an_erasure_compacts_the_index(tmp_path, block_next_compaction, search_during):
    """An erasure past the index's COMPACT_FRACTION compacts it after the gallery's write lock: a search
    during the copy answers at once, without the erased items (oracle: a gallery of the others alone)."""

    rng = np.random.default_rng(10)
    base = rng.integers(0, 256, (1200, 8), dtype=np.uint8)
    codes = lambda rows: {32: base[rows, :4].copy(), 64: base[rows].copy()}  # noqa: E731
    metas = [ItemMeta(camera=1 + i % 3) for i in range(1200)]
    g, oracle = (Gallery(Store(tmp_path / name, "test", LENGTHS), {32: 14}) for name in ("a", "b"))
    ids = g.add(codes(np.arange(1200)), metas)
    gone = ids[::3]  # 400 of 1200: past COMPACT_FRACTION
    kept = [i for i in range(1200) if i % 3]
    oracle.add(codes(np.array(kept)), [metas[i] for i in kept])
    to_oracle = dict(zip(oracle.index.ids.tolist(), (ids[i] for i in kept)))
    copying, release = block_next_compaction()
    q = codes(np.arange(6))
    answer, ndead = search_during(copying, release, lambda: g.erase(gone), lambda: g.search(q, 10),
                                  lambda: g.index._ndead)
    assert ndead == 400
    want = [[to_oracle[h["id"]] for h in row] for row in oracle.search(q, 10)[0]]
    assert [[h["id"] for h in row] for row in answer[0]] == want
    assert g.index._ndead == 0 and len(g) == 800
    assert [[h["id"] for h in row] for row in g.search(q, 10)[0]] == want
    for x in (g, oracle):
        x.store.close()


@pytest.mark.parametrize("phase", ["look-up", "erasure"])
def test_searches_go_on_while_an_erasure_looks_up_and_erases(tmp_path, block_next_removal, search_during, phase):
    """An erasure holds the gallery's write lock only while the index swaps in its live bits: a search during
    the index's look-up of the ids answers at once with every item, one during the erasure of their codes at
    once without them (oracles: galleries with and without them); afterwards the answers' fields are the
    stored rows'."""
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (1200, 8), dtype=np.uint8)
    codes = lambda rows: {32: base[rows, :4].copy(), 64: base[rows].copy()}  # noqa: E731
    metas = [ItemMeta(pid=i % 40, camera=1 + i % 3, source=f"c/{i}.jpg") for i in range(1200)]
    g, full, oracle = (Gallery(Store(tmp_path / name, "test", LENGTHS), {32: 14}) for name in ("a", "b", "c"))
    ids = g.add(codes(np.arange(1200)), metas)
    full.add(codes(np.arange(1200)), metas)
    gone = ids[::12]  # 100 of 1200: no compaction
    kept = [i for i in range(1200) if i % 12]
    oracle.add(codes(np.array(kept)), [metas[i] for i in kept])
    to_oracle = dict(zip(oracle.index.ids.tolist(), (ids[i] for i in kept)))
    before, after = block_next_removal
    copying, release = (before if phase == "look-up" else after)()
    q = codes(np.arange(0, 60, 12))  # erased items among the queries: their own best hits
    answer, _ = search_during(copying, release, lambda: g.erase(gone), lambda: g.search(q, 10))
    want_full = [[h["id"] for h in row] for row in full.search(q, 10)[0]]
    want = [[to_oracle[h["id"]] for h in row] for row in oracle.search(q, 10)[0]]
    assert [[h["id"] for h in row] for row in answer[0]] == (want_full if phase == "look-up" else want)
    assert want != want_full and len(g) == 1100
    hits = g.search(q, 10)[0]
    assert [[h["id"] for h in row] for row in hits] == want
    rows = {r["id"]: r for r in g.store.scroll(limit=2000)[0]}
    for h in (h for row in hits for h in row):
        assert {k: h[k] for k in ("pid", "camera", "time", "source")} == \
            {k: rows[h["id"]][k] for k in ("pid", "camera", "time", "source")}
    assert not any(i in g.fields.source for i in gone) and not g.fields.has_pid[gone].any()
    assert g.fields.has_pid[[i for i in ids if i not in set(gone)]].all()
    for x in (g, full, oracle):
        x.store.close()


@pytest.mark.parametrize("max_batch", [1, 64])
def test_a_loaded_gallery_makes_its_search_scratch_before_the_first_request(tmp_path, max_batch):
    """A service's first search after a start paid the index's fresh scratch (page faults); the gallery searches
    a stored item once when it loads, alone and as a batch as large as the service's, so that the first
    requests find the scratch made (a set whose batch buffers are made only when batches are searched)."""
    rng = np.random.default_rng(2)
    store = Store(tmp_path / "s", "test", LENGTHS)
    base = rng.integers(0, 256, (300, 8), dtype=np.uint8)
    store.add({32: base[:, :4].copy(), 64: base}, [ItemMeta() for _ in range(300)])
    g = Gallery(store, {32: 12}, max_batch=max_batch)
    sets = list(g.index._scratch)
    assert sets and all(s.ws is not None for s in sets)
    assert any(s.batch is not None for s in sets) == (max_batch > 1)
    g.search({32: base[5:6, :4].copy(), 64: base[5:6]}, 10)
    assert all(any(s is t for t in g.index._scratch) for s in sets)  # the first request took a set made at load
    store.close()
    empty = Store(tmp_path / "e", "test", LENGTHS)
    assert not Gallery(empty, {32: 12}, max_batch=max_batch).index._scratch  # nothing to search yet
    empty.close()
