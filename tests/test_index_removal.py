"""CtFIndex.remove_ids and compaction against an index built without the removed items; erasure checked
in the index's arrays and in the saved bytes; ids that would break removal are refused; copies that travel."""

import copy
import pickle

import numpy as np
import pytest
from reference import correlated_code_sets

from ctfreid.errors import CtfreidError
from ctfreid.search.index import CtFIndex

LENGTHS = (32, 128, 2048)
TH = {32: 11, 128: 50}


@pytest.fixture(scope="module")
def data():
    return correlated_code_sets(np.random.default_rng(5), 900, 7, LENGTHS)


def _index(g, rows, ids=None):
    index = CtFIndex()
    index.add({L: c[rows] for L, c in g.items()}, None if ids is None else ids[rows])
    index.thresholds = dict(TH)
    return index


def _same_answers(a, b, q):
    for k in (1, 10, 100, 5000):
        for x, y in zip(a.search(q, k), b.search(q, k)):
            np.testing.assert_array_equal(x, y)
        ha, hb = a.search_hits(q, k), b.search_hits(q, k)
        np.testing.assert_array_equal(ha.ids, hb.ids)
        np.testing.assert_array_equal(ha.distances, hb.distances)
    for x, y in zip(a.rank(q), b.rank(q)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("explicit", [False, True])
def test_removal_equals_an_index_built_without_the_items(data, explicit):
    q, g = data
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[:900] if explicit else None  # explicit ids in no particular order
    index = _index(g, np.arange(900), ids)
    gone = rng.choice(900, 150, replace=False)  # 17 %: below the automatic compaction
    gone_ids = gone if ids is None else ids[gone]
    assert index.remove_ids(np.concatenate([gone_ids, [10**9, 10**9 + 1]])) == 150  # unknown ids not counted
    assert index.remove_ids(gone_ids[:5]) == 0  # already removed
    assert index.ntotal == 750 and index._ndead == 150
    keep = np.setdiff1d(np.arange(900), gone)
    want = _index(g, keep, None if ids is None else ids)
    if ids is None:  # default ids stay those given at insertion
        want = CtFIndex()
        want.add({L: c[keep] for L, c in g.items()}, keep)
        want.thresholds = dict(TH)
    _same_answers(index, want, q)
    np.testing.assert_array_equal(index.ids, want.ids)
    for L in LENGTHS:
        np.testing.assert_array_equal(index.codes(L), want.codes(L))
        assert not index._codes[L][gone].any()  # overwritten in memory, not only flagged
    index.compact()
    assert index._ndead == 0 and index.ntotal == 750
    _same_answers(index, want, q)


def test_automatic_compaction_and_default_ids_after_removal(data):
    q, g = data
    index = _index(g, np.arange(500))
    index.remove_ids(np.arange(0, 500, 4))  # 25 % > COMPACT_FRACTION
    assert index._ndead == 0 and index._nslots == 375
    index.add({L: c[500:510] for L, c in g.items()})  # default ids continue after the largest, never reused
    assert index.ids[-10:].tolist() == list(range(500, 510))
    want = CtFIndex()
    rows = np.concatenate([np.setdiff1d(np.arange(500), np.arange(0, 500, 4)), np.arange(500, 510)])
    want.add({L: c[rows] for L, c in g.items()}, rows)
    want.thresholds = dict(TH)
    _same_answers(index, want, q)


def test_removed_codes_leave_no_bytes_in_files_or_pickles(data, tmp_path):
    q, g = data
    index = _index(g, np.arange(900))
    gone = [3, 400, 899]
    secrets = [g[2048][j].tobytes() for j in gone]  # 256 random bytes each: cannot occur by chance
    assert all(s in index.to_bytes() for s in secrets)
    index.remove_ids(gone)
    index.save(tmp_path / "g.ctf")
    for blob in ((tmp_path / "g.ctf").read_bytes(), index.to_bytes(), pickle.dumps(index)):
        assert not any(s in blob for s in secrets)
    loaded = CtFIndex.load(tmp_path / "g.ctf")
    assert loaded.ntotal == 897 and not set(gone) & set(loaded.ids.tolist())
    _same_answers(loaded, index, q)


@pytest.mark.parametrize("mmap", [True, False])
def test_removal_on_a_loaded_index(data, tmp_path, mmap):
    q, g = data
    index = _index(g, np.arange(900))
    index.save(tmp_path / "g.ctf")
    before = (tmp_path / "g.ctf").read_bytes()
    loaded = CtFIndex.load(tmp_path / "g.ctf", mmap=mmap)
    assert loaded.remove_ids(np.arange(100)) == 100
    index.remove_ids(np.arange(100))
    _same_answers(loaded, index, q)
    assert (tmp_path / "g.ctf").read_bytes() == before  # copy on write: the file is untouched


def test_readding_a_removed_id_and_id_errors(data):
    q, g = data
    index = _index(g, np.arange(20), ids=np.arange(20) * 2)
    with pytest.raises(CtfreidError, match="id 4 is already in the index"):
        index.add({L: c[20:21] for L, c in g.items()}, ids=[4])
    index.remove_ids([4])
    index.add({L: c[20:21] for L, c in g.items()}, ids=[4])  # a removed id may come back, as a new item
    D, I = index.search({L: c[20] for L, c in g.items()}, 1)
    assert I[0] == 4 and index.ntotal == 20
    one = {L: c[:1] for L, c in g.items()}
    two = {L: c[:2] for L, c in g.items()}
    with pytest.raises(CtfreidError, match="non-negative"):
        CtFIndex().add(one, ids=[-1])
    with pytest.raises(CtfreidError, match=r"below 2\*\*63"):
        CtFIndex().add(one, ids=np.array([2**63], np.uint64))
    with pytest.raises(CtfreidError, match="id 7 is given twice"):
        CtFIndex().add(two, ids=[7, 7])
    with pytest.raises(CtfreidError, match="1-D integer"):
        index.remove_ids(np.array([[1]]))


def test_empty_add_then_save_and_codes(tmp_path):
    index = CtFIndex()
    index.add({32: np.zeros((0, 4), np.uint8)})
    assert index.codes(32).shape == (0, 4) and index.ntotal == 0
    index.save(tmp_path / "e.ctf")
    loaded = CtFIndex.load(tmp_path / "e.ctf")
    assert loaded.lengths == [32] and loaded.ntotal == 0
    D, I = loaded.search({32: np.zeros((2, 4), np.uint8)}, 5)
    assert I.shape == (2, 0)


def test_copies_travel_and_do_not_share_buffers(data):
    q, g = data
    index = _index(g, np.arange(300))
    index.metadata = {"who": "test"}
    for other in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index), copy.copy(index),
                  CtFIndex.from_bytes(index.to_bytes())):
        assert other.metadata == index.metadata and other.thresholds == index.thresholds
        _same_answers(other, index, q)
    shallow = copy.copy(index)
    index.add({L: c[300:600] for L, c in g.items()})  # fills the original's spare capacity
    assert shallow.ntotal == 300
    _same_answers(shallow, _index(g, np.arange(300)), q)
    blob = bytearray(index.to_bytes())
    blob[len(blob) // 2] ^= 1
    with pytest.raises(CtfreidError, match="checksum mismatch"):
        CtFIndex.from_bytes(bytes(blob))


def test_per_call_thresholds_are_checked_and_leave_the_attribute(data):
    q, g = data
    index = _index(g, np.arange(900))
    other = _index(g, np.arange(900))
    other.thresholds = {32: 5, 128: 60}
    for a, b in zip(index.search(q, 50, thresholds={32: 5, 128: 60}), other.search(q, 50)):
        np.testing.assert_array_equal(a, b)
    assert index.thresholds == TH
    for bad in ({32: 5}, {32: 5, 128: 9.5}, {32: 33, 128: 5}):
        with pytest.raises(CtfreidError, match="thresholds"):
            index.search(q, 5, thresholds=bad)



def test_empty_id_lists_are_no_ids(data):
    """``[]`` is float64 to numpy: an empty list of ids removes nothing, and goes with an empty add."""
    q, g = data
    index = _index(g, np.arange(50), ids=np.arange(50))
    assert index.remove_ids([]) == 0 and index.remove_ids(()) == 0 and index.ntotal == 50
    index.add({L: c[:0] for L, c in g.items()}, ids=[])
    assert index.ntotal == 50
    with pytest.raises(CtfreidError, match="1-D integer"):
        index.remove_ids(np.zeros((1, 0)))
