"""The byte planes of the 32-bit codes that ``CtFIndex`` keeps on AVX2 hosts without AVX-512
(``index.keeps_planes``, ``_kernels.lay_planes``): their layout against a NumPy transpose through adds, removals,
compaction and loading; the stage-1 kernels that read them against the brute-force oracle of
tests/test_batch_scan.py and the weighted reference of tests/test_asymmetric.py. The index keeps them where
``_kernels.BYTE_PLANES`` is set; the tests set it, so that every host runs these paths (elsewhere the masks
compile to a slower lane-by-lane shuffle with the same answers)."""

import pickle

import numpy as np
import pytest

from ctfreid import CtFIndex
from ctfreid.search import _kernels
from ctfreid.search.asymmetric import weighted_distances
from ctfreid.search.coarse_to_fine import ctf_search
from ctfreid.search.index import keeps_planes
from tests.test_asymmetric import noisy_copies
from tests.test_batch_scan import oracle


@pytest.fixture
def planes_host(monkeypatch):
    monkeypatch.setattr(_kernels, "BYTE_PLANES", True)


def expected_planes(index: CtFIndex) -> np.ndarray:
    """Byte p of slot 64 b + j at 256 b + 64 p + j, for the full blocks of the index's slots (removed slots hold
    zero codes), by NumPy."""
    c = index._codes[32][: index._nslots]
    nb = c.shape[0] // 64
    return c[: 64 * nb].reshape(nb, 64, 4).transpose(0, 2, 1).reshape(-1)


def check_planes(index: CtFIndex) -> None:
    want = expected_planes(index)
    assert index._planes is not None and index._planes.shape[0] >= 256 * -(-index._codes[32].shape[0] // 64)
    np.testing.assert_array_equal(index._planes[: want.shape[0]], want)


def test_which_indexes_keep_planes(monkeypatch):
    monkeypatch.setattr(_kernels, "BYTE_PLANES", True)
    assert keeps_planes([32, 128]) and keeps_planes([32, 128, 512, 2048])
    assert not keeps_planes([32]) and not keeps_planes([64, 128]) and not keeps_planes(None)
    monkeypatch.setattr(_kernels, "BYTE_PLANES", False)
    assert not keeps_planes([32, 128])
    index = CtFIndex()
    index.add({32: np.zeros((70, 4), np.uint8), 128: np.zeros((70, 16), np.uint8)})
    assert index._planes is None


def test_planes_follow_adds_removals_compaction_and_loads(planes_host, tmp_path):
    rng = np.random.default_rng(5)
    g = {L: rng.integers(0, 256, (3000, L // 8), dtype=np.uint8) for L in (32, 128)}
    index = CtFIndex()
    start = 0
    for size in (1, 62, 2, 100, 7, 1400, 1428):  # partial blocks filled by later adds; buffers that double
        index.add({L: c[start : start + size] for L, c in g.items()})
        start += size
        check_planes(index)
    gone = rng.choice(3000, 200, replace=False)  # under COMPACT_FRACTION: the slots stay
    index.remove_ids(gone)
    assert index._nslots == 3000
    check_planes(index)
    slots = gone[gone < 64 * (3000 // 64)]
    at = 256 * (slots // 64) + slots % 64
    for p in range(4):  # erasure: the removed codes' copy is zeroed too
        assert not index._planes[at + 64 * p].any()
    index.remove_ids(np.arange(0, 3000, 3))  # past COMPACT_FRACTION: compacted
    assert index._nslots < 3000
    check_planes(index)
    path = tmp_path / "g.ctf"
    index.save(path)
    for loaded in (CtFIndex.load(path), CtFIndex.load(path, mmap=False), CtFIndex.from_bytes(index.to_bytes()),
                   pickle.loads(pickle.dumps(index))):
        check_planes(loaded)
        top = loaded._next_id
        loaded.add({L: c[:70] for L, c in g.items()})  # grows a read-only map
        check_planes(loaded)
        loaded.remove_ids(np.arange(top, top + 5))
        check_planes(loaded)


@pytest.mark.parametrize("weighted", [False, True])
def test_search_with_planes_equals_the_oracle(planes_host, weighted):
    # a gallery in three adds (its last block partial) with removals, one query at a time (ctf_topk, stage 1 from
    # the planes) and a batch (the tile scan, which lays out its own), against the brute-force oracle (Hamming) or
    # ctf_search (weighted: a path without planes, checked against the reference in tests/test_asymmetric.py);
    # thresholds 0 to 254 read the planes, 300 the weighted masks
    rng = np.random.default_rng(9 + weighted)
    n, nq, k = 20_000 + 37, 24, 50
    g, q, src = noisy_copies(rng, n, nq, (32, 128, 512))
    w = rng.integers(0, 16, (nq, 32), dtype=np.uint8) if weighted else None
    index = CtFIndex()
    for a, b in ((0, 9_000), (9_000, 9_001), (9_001, n)):  # blocks laid out by each add
        index.add({L: c[a:b] for L, c in g.items()})
    assert index._planes is not None
    gone = np.concatenate([src[::4], rng.choice(n, n // 10, replace=False)])
    index.remove_ids(gone, compact=False)
    live = np.ones(n, bool)
    live[gone] = False
    kept = {L: c[live] for L, c in g.items()}
    d1 = weighted_distances(q[32], w, g[32]) if weighted else None
    for t1 in ((0, int(np.quantile(d1, 0.03)), 254, 300) if weighted else (0, 9, 12)):
        th = {32: t1, 128: 50}
        if weighted:
            want_D, want = ctf_search(q, kept, th, k, query_weights=w)
            want = np.flatnonzero(live)[want]
        else:
            want, _, dist, _ = oracle(q, g, live, th, k)
        for batch in (False, True):
            if batch:
                D, I = index.search(q, k, th, threads=1, query_weights=w)
            else:
                one = [index.search({L: c[i] for L, c in q.items()}, k, th, threads=1,
                                    query_weights=None if w is None else w[i]) for i in range(nq)]
                D, I = np.stack([x[0] for x in one]), np.stack([x[1] for x in one])
            np.testing.assert_array_equal(I, want)
            if weighted:
                np.testing.assert_array_equal(D, want_D)
            else:
                stages = (dist >= 0).sum(axis=2)
                np.testing.assert_array_equal(D, np.take_along_axis(dist, stages[..., None] - 1, axis=2)[..., 0])


def test_tile_rule_with_planes(planes_host):
    # with planes, a weighted stage 1 that the byte-plane masks take follows the Hamming rule from
    # PLANES_WEIGHTED_TILE_MIN_N codes on and runs query by query below (worked by hand at the constants: 16
    # queries, a quarter as many from BATCH_LARGE_N codes on); without planes, its own rule
    big, least = _kernels.BATCH_LARGE_N, _kernels.PLANES_WEIGHTED_TILE_MIN_N
    for n, nq in ((least, 16), (least, 15), (big, 4), (big, 3), (least - 1, 64), (10_000, 1 << 20)):
        hamming = _kernels.tile_scan(nq, 32, n)
        assert hamming == (nq >= (4 if n >= big else 16))
        assert _kernels.tile_scan(nq, 32, n, True, 20, planes=True) == (hamming and n >= least)
        assert _kernels.tile_scan(nq, 32, n, planes=True) == hamming
    assert _kernels.tile_scan(14, 32, 10_000, True, 20) and not _kernels.tile_scan(14, 32, 10_000, True, 20, True)
    # a threshold beyond the byte planes keeps the weighted rule either way
    assert _kernels.tile_scan(64, 32, 10_000, True, 300, planes=True) == _kernels.tile_scan(64, 32, 10_000, True, 300)
