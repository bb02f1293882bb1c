"""CtFIndex: add/search/rank, ids, save/load (mmap or not), damaged files, atomic save, k clamping."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
from reference import correlated_code_sets

import ctfreid.search.index as index_module
from ctfreid.errors import CtfreidError
from ctfreid.search.coarse_to_fine import ctf_rank, ctf_search
from ctfreid.search.index import CtFIndex

LENGTHS = (32, 128, 512)
TH = {32: 10, 128: 45}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return correlated_code_sets(rng, 700, 6, LENGTHS)


def _built(g, ids=None, chunks=(0, 250, 700)):
    index = CtFIndex()
    for a, b in zip(chunks[:-1], chunks[1:]):
        index.add({L: c[a:b] for L, c in g.items()}, None if ids is None else ids[a:b])
    index.thresholds = dict(TH)
    return index


def test_search_and_rank_equal_the_functions(data):
    q, g = data
    index = _built(g)
    assert index.ntotal == 700 and index.lengths == list(LENGTHS)
    D, I = index.search(q, 25)
    rD, rI = ctf_search(q, g, TH, 25)
    np.testing.assert_array_equal(I, rI)
    np.testing.assert_array_equal(D, rD)
    D, I = index.rank(q)
    rD, rI = ctf_rank(q, g, TH)
    np.testing.assert_array_equal(I, rI)
    np.testing.assert_array_equal(D, rD)
    D, I = index.search({L: v[0] for L, v in q.items()}, 5)  # one 1-D query
    np.testing.assert_array_equal(I, rI[0, :5])
    D, I = index.search(q, 800)  # k > ntotal: clamped to ntotal (no padding), the whole ranking
    np.testing.assert_array_equal(I, ctf_rank(q, g, TH)[1])
    D, I = index.search(q, 10**9)  # no allocation of k-sized outputs
    assert I.shape == (6, 700)


def test_explicit_ids(data):
    q, g = data
    ids = np.arange(700, dtype=np.int64) * 10 + 3
    index = _built(g, ids)
    D, I = index.search(q, 800)
    rD, rI = ctf_search(q, g, TH, 700)
    np.testing.assert_array_equal(I, ids[rI])
    np.testing.assert_array_equal(D, rD)


@pytest.mark.parametrize("case", ["default", "arange", "from 1", "reversed", "removed", "compacted", "loaded"])
def test_results_map_slots_to_ids_unless_they_are_the_same(data, case, tmp_path):
    # the index skips mapping slots to ids when every slot's id is the slot (_slots_are_ids): checked against the
    # stored ids themselves, and every ranking against the functions over the live items mapped by hand
    q, g = data
    ids = {"arange": np.arange(700), "from 1": np.arange(1, 701), "reversed": np.arange(700)[::-1].copy()}.get(case)
    index = _built(g, ids)
    live = np.ones(700, bool)
    if case in ("removed", "compacted", "loaded"):
        gone = np.arange(0, 700, 7) if case == "removed" else np.arange(0, 700, 3)  # under / over COMPACT_FRACTION
        index.remove_ids(gone)
        live[gone] = False
    if case == "loaded":
        index.save(tmp_path / "i.ctf")
        index = CtFIndex.load(tmp_path / "i.ctf")
        index.thresholds = dict(TH)
    n = index._nslots
    assert index._slots_are_ids() == np.array_equal(index._ids[:n], np.arange(n))
    assert index._slots_are_ids() == (case in ("default", "arange", "removed"))
    stored = (np.arange(700) if ids is None else ids)[live]
    kept = {L: c[live] for L, c in g.items()}
    np.testing.assert_array_equal(index.rank(q)[1], stored[ctf_rank(q, kept, TH)[1]])
    want_D, want_I = ctf_search(q, kept, TH, 50)
    np.testing.assert_array_equal(index.search(q, 50)[1], stored[want_I])
    for i in range(q[32].shape[0]):  # one query at a time: CtFIndex._search_one
        D, I = index.search({L: c[i] for L, c in q.items()}, 50)
        np.testing.assert_array_equal(I, stored[want_I[i]])
        np.testing.assert_array_equal(D, want_D[i])


def test_one_query_takes_its_short_path_with_the_answers_of_the_general_one(data, monkeypatch):
    """``search`` of one query of several lengths skips ``_run`` (``_search_one``), 1-D or as a batch of one row,
    for any thresholds and k, with weights on the first or on later stages, and on the tile scan (here forced
    for one query); ``threads`` is still checked. Oracle: ``ctf_search`` on the same codes."""
    q, g = data
    index = _built(g)
    general = index._run
    calls = []
    monkeypatch.setattr(index, "_run", lambda *a, **kw: calls.append(1) or general(*a, **kw))
    rng = np.random.default_rng(1)
    w32, w128 = rng.integers(0, 16, (1, 32), dtype=np.uint8), rng.integers(0, 16, (1, 128), dtype=np.uint8)
    cases = [(5, None, None), (1, None, None), (700, TH, None), (10**9, {32: 3, 128: 40}, None),
             (40, {32: 32, 128: 0}, None), (9, {32: 60, 128: 45}, w32), (30, {32: 60, 128: 400}, {32: w32, 128: w128}),
             (30, {32: 10, 128: 400}, {128: w128})]
    for tile in (False, True):
        if tile:
            monkeypatch.setattr(index_module._kernels, "BATCH_MIN_QUERIES", 1)  # the tile scan for one query
        for i, (k, th, w) in enumerate(cases):
            one = {L: c[i % 6:i % 6 + 1] for L, c in q.items()}
            want_D, want_I = ctf_search(one, g, TH if th is None else th, min(k, 700), query_weights=w)
            for query, shape in (({L: c[0] for L, c in one.items()}, want_I.shape[1:]), (one, want_I.shape)):
                D, I = index.search(query, k, th, threads=2, query_weights=w)
                assert I.shape == D.shape == shape
                np.testing.assert_array_equal(I.reshape(-1), want_I[0])
                np.testing.assert_array_equal(D.reshape(-1), want_D[0])
    assert calls == []
    with pytest.raises(CtfreidError, match="threads must be a positive integer"):
        index.search({L: c[0] for L, c in q.items()}, 5, threads=0)


def test_add_errors(data):
    q, g = data
    index = CtFIndex()
    with pytest.raises(ValueError, match="empty"):
        index.search(q, 3)
    index.add({L: c[:10] for L, c in g.items()})
    with pytest.raises(ValueError, match="ids must be given on every add or on none"):
        index.add({L: c[10:20] for L, c in g.items()}, ids=np.arange(10))
    with pytest.raises(ValueError, match="lengths"):
        index.add({32: g[32][:5], 128: g[128][:5]})
    other = CtFIndex()
    other.add({L: c[:10] for L, c in g.items()}, ids=np.arange(10))
    with pytest.raises(ValueError, match="ids must be given"):
        other.add({L: c[10:20] for L, c in g.items()})
    with pytest.raises(ValueError, match="1-D integer array of length 5"):
        CtFIndex().add({L: c[:5] for L, c in g.items()}, ids=np.arange(4))
    with pytest.raises(ValueError, match=r"missing \[128\]"):
        index.thresholds = {32: 3}
        index.search(q, 3)
    index.thresholds = dict(TH)
    with pytest.raises(ValueError, match="code lengths"):
        index.search({32: q[32]}, 3)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip_and_add_after_load(data, tmp_path, mmap):
    q, g = data
    ids = np.arange(700, dtype=np.int64)[::-1].copy()
    index = _built(g, ids)
    index.metadata = {"model": "abc123", "paths": ["a.jpg", "b.jpg"]}
    path = tmp_path / "gallery.ctf"
    index.save(path)
    before = path.read_bytes()
    loaded = CtFIndex.load(path, mmap=mmap)
    assert loaded.ntotal == 700 and loaded.lengths == list(LENGTHS)
    assert loaded.thresholds == TH and loaded.metadata == index.metadata
    for a, b in zip(loaded.search(q, 30), index.search(q, 30)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.rank(q), index.rank(q)):
        np.testing.assert_array_equal(a, b)
    extra = {L: c[:5] for L, c in g.items()}
    loaded.add(extra, ids=np.arange(1000, 1005))
    index.add(extra, ids=np.arange(1000, 1005))
    assert loaded.ntotal == 705
    for a, b in zip(loaded.search(q, 710), index.search(q, 710)):
        np.testing.assert_array_equal(a, b)
    assert path.read_bytes() == before  # the file is never written through the map


def test_single_length_and_empty_index_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (50, 16), dtype=np.uint8)
    index = CtFIndex()
    index.add({128: codes})
    index.save(tmp_path / "one.ctf")
    loaded = CtFIndex.load(tmp_path / "one.ctf")
    D, I = loaded.search({128: codes[:2]}, 3)
    assert I[:, 0].tolist() == [0, 1] and D[:, 0].tolist() == [0, 0]
    CtFIndex().save(tmp_path / "empty.ctf")
    assert CtFIndex.load(tmp_path / "empty.ctf").ntotal == 0


@pytest.fixture
def saved(data, tmp_path):
    path = tmp_path / "g.ctf"
    _built(data[1]).save(path)
    return path


def test_truncated_file(saved):
    blob = saved.read_bytes()
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        saved.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=r"g\.ctf.*(truncated|magic)"):
            CtFIndex.load(saved)


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_flipped_byte(saved, where):
    blob = bytearray(saved.read_bytes())
    pos = {"header": 40, "payload": len(blob) // 2, "checksum": len(blob) - 2}[where]
    blob[pos] ^= 0x10
    saved.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"g\.ctf.*damaged"):
        CtFIndex.load(saved, mmap=True)


def test_wrong_magic_newer_version_missing_file(saved, tmp_path):
    blob = bytearray(saved.read_bytes())
    (tmp_path / "x.ctf").write_bytes(b"PK\x03\x04" + bytes(blob[4:]))
    with pytest.raises(ValueError, match="not a ctfreid index"):
        CtFIndex.load(tmp_path / "x.ctf")
    blob[8:12] = struct.pack("<I", 99)
    saved.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="version 99"):
        CtFIndex.load(saved)
    with pytest.raises(FileNotFoundError, match="nope.ctf"):
        CtFIndex.load(tmp_path / "nope.ctf")


def test_atomic_save_keeps_old_file_on_crash(data, saved, monkeypatch):
    before = saved.read_bytes()
    calls = {"n": 0}
    real = index_module.zlib.crc32

    def crashing_crc32(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of writing the arrays
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(index_module.zlib, "crc32", crashing_crc32)
    bigger = _built(data[1])
    bigger.add({L: c[:100] for L, c in data[1].items()})
    with pytest.raises(OSError, match="disk full"):
        bigger.save(saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]  # no temporary file left behind
    assert CtFIndex.load(saved).ntotal == 700


def test_metadata_must_be_json(saved):
    index = CtFIndex.load(saved)
    index.metadata = {"bad": object()}
    with pytest.raises(ValueError, match="JSON"):
        index.save(saved)


def test_stored_codes_and_ids_accessors(data):
    q, g = data
    ids = np.arange(700, dtype=np.int64) * 7 + 1
    index = _built(g, ids)
    for L in LENGTHS:
        np.testing.assert_array_equal(index.codes(L), g[L])
        assert not index.codes(L).flags.writeable
    np.testing.assert_array_equal(index.ids, ids)
    with pytest.raises(ValueError, match="2048"):
        index.codes(2048)


@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_contains_answers_as_a_set_of_the_live_ids(data, order):
    """``contains`` against a Python set of the live ids, through adds, removals and a compaction, for ids that
    increase with insertion and for ids that do not (the index then searches a sorted copy)."""
    q, g = data
    rng = np.random.default_rng(3)
    ids = np.arange(700, dtype=np.int64) * 3 + 2
    if order == "shuffled":
        ids = rng.permutation(ids)
    index = _built(g, ids)
    live = set(ids.tolist())
    probe = np.concatenate([ids[::5], np.arange(-2, 2200, 7), ids[3::11]])  # held, never held, repeated
    gone = ids[rng.choice(700, 500, replace=False)]
    for a, b in ((0, 0), (0, 40), (40, 500)):  # dead slots kept, then past the compaction fraction
        index.remove_ids(gone[a:b])
        live -= set(gone[a:b].tolist())
        np.testing.assert_array_equal(index.contains(probe), [int(i) in live for i in probe])
    assert index.contains(int(next(iter(live)))) is True and index.contains(int(gone[0])) is False
    big = np.array([2**63 + int(ids[0]), int(next(iter(live)))], np.uint64)  # past int64: never held
    np.testing.assert_array_equal(index.contains(big), [False, True])
    assert index.contains([]).shape == (0,)
    for bad in ([1.5], [[1]], [True]):
        with pytest.raises(CtfreidError, match="ids must be an integer or a 1-D integer array"):
            index.contains(bad)


def _with_header(blob: bytes, edit) -> bytes:
    """``blob`` with its JSON header changed by ``edit`` (padded to the same size) and a valid checksum."""
    (hsize,) = struct.unpack("<I", blob[12:16])
    header = json.loads(blob[16 : 16 + hsize])
    edit(header)
    text = json.dumps(header, sort_keys=True).encode()
    assert len(text) <= hsize
    body = blob[:16] + text.ljust(hsize) + blob[16 + hsize : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("edit", [
    lambda h: h.update(lengths=[128, 32, 512]),  # searched shortest-first: wrong rankings
    lambda h: h.update(lengths=[]),
    lambda h: h.update(next_id=5),  # the next add would give live ids 5, 6, ... again
    lambda h: h.update(next_id=-3),
    lambda h: h.update(next_id="x"),
    lambda h: h.update(default_ids="no"),
    lambda h: h.update(thresholds=[10, 45]),
    lambda h: h["arrays"][1].update(offset=h["arrays"][0]["offset"]),  # two arrays on the same bytes
], ids=["unsorted-lengths", "no-lengths", "next-id-below-ids", "negative-next-id", "next-id-text",
        "default-ids-text", "thresholds-list", "overlapping-arrays"])
@pytest.mark.parametrize("mmap", [False, True])
def test_a_checksummed_file_with_an_inconsistent_header_is_refused(saved, edit, mmap):
    saved.write_bytes(_with_header(saved.read_bytes(), edit))
    with pytest.raises(CtfreidError, match=r"g\.ctf: file is damaged \(inconsistent header\)"):
        CtFIndex.load(saved, mmap=mmap)


def test_save_refuses_thresholds_the_file_cannot_hold(data, tmp_path):
    index = _built(data[1])
    for bad in ({32: 10.5, 128: 45}, {32: "x", 128: 45}, [10, 45]):
        index.thresholds = bad  # 10.5 would come back as 10, the others raised raw errors
        with pytest.raises(CtfreidError, match="thresholds"):
            index.save(tmp_path / "t.ctf")
        with pytest.raises(CtfreidError, match="thresholds"):
            index.to_bytes()
    assert not (tmp_path / "t.ctf").exists()


def test_scratch_made_for_a_larger_k_serves_smaller_ones_with_the_same_answers(data):
    """The search scratch is reused when k shrinks (no fresh memory a call when requests vary k); the
    answers equal ``ctf_search``'s, whatever k the scratch was made for."""
    q, g = data
    index = _built(g)
    ws = None
    for k in (300, 5, 120, 1, 300, 64):
        D, I = index.search({L: c[:1] for L, c in q.items()}, k, threads=1)  # one query: the per-query kernel
        want_D, want_I = ctf_search({L: c[:1] for L, c in q.items()}, g, TH, k)
        np.testing.assert_array_equal(D, want_D)
        np.testing.assert_array_equal(I, want_I)
        assert len(index._scratch) == 1  # one search at a time: one scratch set
        if ws is None:
            ws = index._scratch[0].ws[1]
        assert index._scratch[0].ws[1] is ws  # made once, for k = 300
    index.search({L: c[:1] for L, c in q.items()}, 600, threads=1)
    assert index._scratch[0].ws[1] is not ws  # a larger k needs more


@pytest.mark.parametrize("tile", [False, True])
def test_scratch_serves_an_index_that_grows_by_adds(monkeypatch, tile):
    """A gallery that changes gets adds between searches: the scratch (the per-query workspace, or the tile
    scan's candidate buffers) made for one size keeps serving the next adds, laid out for the new size, with
    the answers of ``ctf_search`` on the grown gallery; one much larger is made anew."""
    if tile:
        monkeypatch.setattr(index_module._kernels, "BATCH_MIN_QUERIES", 1)  # the tile scan for these queries
    q, g = correlated_code_sets(np.random.default_rng(5), 4000, 4, LENGTHS)
    index = CtFIndex()
    index.add({L: c[:2000] for L, c in g.items()})
    index.thresholds = dict(TH)
    part = "batch" if tile else "ws"

    def check(n):
        D, I = index.search(q, 30, threads=1)
        want_D, want_I = ctf_search(q, {L: c[:n] for L, c in g.items()}, TH, 30)
        np.testing.assert_array_equal(I, want_I)
        np.testing.assert_array_equal(D, want_D)
        assert len(index._scratch) == 1
        return getattr(index._scratch[0], part)

    made = check(2000)
    for n in (2001, 2010, 2100, 2200):  # within an eighth more
        index.add({L: c[index.ntotal : n] for L, c in g.items()})
        assert check(n) is made
    index.add({L: c[2200:] for L, c in g.items()})  # twice as large: made anew
    assert check(4000) is not made


@pytest.mark.parametrize("lengths", [(32, 128, 512), (64, 128, 512), (96, 128, 256), (32, 96, 160), (64,)])
def test_query_rows_at_any_offset_give_the_answers_of_aligned_copies(lengths):
    """A 1-D query sliced from a batch of 32-bit codes is 4- but not always 8-byte aligned, and a code may sit
    at any byte offset in a caller's buffer: ``search`` reads the first in place and copies the second, with
    the answers of an aligned copy (``ctf_search`` on it: the oracle) either way. The lengths cover one query's
    packed bytes (``_one_query``) with and without a gap after stage 1's words, and padded later stages (96 and 160
    bits: the general path)."""
    rng = np.random.default_rng(5)
    q, g = correlated_code_sets(rng, 300, 5, lengths)
    index = CtFIndex()
    index.add(g)
    th = {L: L // 4 for L in lengths[:-1]}
    index.thresholds = th
    for i in range(5):
        raw = {}
        for L, c in q.items():
            buf = np.zeros(c.shape[1] + 1 + 8, np.uint8)
            start = 1 if i % 2 else 8 - buf.ctypes.data % 8  # odd queries: 1 byte past an aligned address
            raw[L] = buf[start:start + c.shape[1]]
            raw[L][:] = c[i]
        rows = {L: c[i] for L, c in q.items()}  # views into the batch: 4-byte offsets for 32-bit codes
        if len(lengths) > 1:
            eD, eI = (x[0] for x in ctf_search({L: c[i:i + 1].copy() for L, c in q.items()}, g, th, 20))
        else:  # one length: NumPy's bit counts, ties by position
            L = lengths[0]
            d = np.unpackbits(g[L] ^ q[L][i], axis=1).sum(axis=1)
            eI = np.argsort(d, kind="stable")[:20]
            eD = d[eI]
        one_row = {L: c[i:i + 1] for L, c in q.items()}  # and as batches of one row
        for query in (raw, rows, one_row, {L: c[None] for L, c in raw.items()}):
            D, I = index.search(query, 20)
            np.testing.assert_array_equal(D.reshape(-1), eD)
            np.testing.assert_array_equal(I.reshape(-1), eI)


def test_thresholds_passed_per_call_are_checked_whenever_they_change(data):
    """The index remembers checked threshold dicts (a service passes the same ones in every request): each new
    content must still be checked and searched with, a mutated dict must not answer with its old contents, a
    bool must be refused even after the int it equals was remembered, and other lengths' or weights' thresholds
    must not be served from another call's entry. Oracle: ctf_search with the same thresholds."""
    q, g = data
    index = _built(g)
    th = {32: 10, 128: 45}
    for t32 in (10, 4, 1, 10):
        th[32] = t32  # the same dict object, mutated between calls
        D, I = index.search(q, 20, th)
        rD, rI = ctf_search(q, g, th, 20)
        np.testing.assert_array_equal(I, rI)
        np.testing.assert_array_equal(D, rD)
    th = {32: np.int64(4), 128: np.int32(45)}  # NumPy integers are remembered too
    for _ in range(2):
        np.testing.assert_array_equal(index.search(q, 20, th)[1], ctf_search(q, g, th, 20)[1])
    for bad in (True, np.bool_(True)):  # True == 1, and {32: 1, 128: 45} was checked above
        with pytest.raises(CtfreidError, match=r"thresholds\[32\] must be an integer"):
            index.search(q, 20, {32: bad, 128: 45})
    with pytest.raises(CtfreidError, match=r"thresholds\[128\] must be an integer Hamming distance in \[0, 128\]"):
        index.search(q, 20, {32: 10, 128: 129})
    with pytest.raises(CtfreidError, match=r"missing \[128\]"):
        index.search(q, 20, {32: 10})
    for t in range(40):  # more distinct dicts than it remembers: answers stay those of their own thresholds
        th = {32: t % 33, 128: 30 + t}
        np.testing.assert_array_equal(index.search(q, 5, th)[1], ctf_search(q, g, th, 5)[1])
    # a weighted stage 1 bounds the first threshold by the weighted maximum (480), a Hamming one by 32
    w = np.random.default_rng(3).integers(0, 16, (q[32].shape[0], 32), dtype=np.uint8)
    np.testing.assert_array_equal(index.search(q, 20, {32: 100, 128: 45}, query_weights=w)[1],
                                  ctf_search(q, g, {32: 100, 128: 45}, 20, query_weights=w)[1])
    with pytest.raises(CtfreidError, match=r"thresholds\[32\] must be an integer Hamming distance in \[0, 32\]"):
        index.search(q, 20, {32: 100, 128: 45})
