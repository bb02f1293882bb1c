"""Files and bytes of a CtFIndex racing writers: a removal that slips in between the compaction that a save
does first and the writing itself must not reach the file as a live item (with zeroed codes)."""

import numpy as np
import pytest
from reference import correlated_code_sets

from ctfreid.search.index import CtFIndex

LENGTHS = (32, 128, 512)


class _RemoveOnFirstRead:
    """The index's lock, but the first reader lets a writer remove ``ids`` just before it gets in (as a
    thread calling ``remove_ids`` at that moment would)."""

    def __init__(self, index: CtFIndex, ids: list[int]) -> None:
        self.inner, self.index, self.ids, self.fired = index._lock, index, ids, False

    def read(self):
        if not self.fired:
            self.fired = True
            self.index._lock = self.inner  # the removal takes the real lock
            assert self.index.remove_ids(self.ids) == len(self.ids)
            self.index._lock = self
        return self.inner.read()

    def write(self):
        return self.inner.write()


@pytest.mark.parametrize("how", ["to_bytes", "save"])
def test_a_removal_racing_a_save_never_reaches_the_file(tmp_path, how):
    q, g = correlated_code_sets(np.random.default_rng(2), 300, 3, LENGTHS)
    index = CtFIndex()
    index.add(g)
    index.thresholds = {32: 11, 128: 48}
    index.remove_ids([5])  # a removed slot: the save compacts first
    index._lock = _RemoveOnFirstRead(index, [7, 200])
    if how == "save":
        index.save(tmp_path / "g.ctf")
        loaded = CtFIndex.load(tmp_path / "g.ctf")
    else:
        loaded = CtFIndex.from_bytes(index.to_bytes())
    index._lock = index._lock.inner
    assert loaded.ntotal == 297 and not {5, 7, 200} & set(loaded.ids.tolist())
    rows = np.setdiff1d(np.arange(300), [5, 7, 200])
    ref = CtFIndex()
    ref.add({L: c[rows] for L, c in g.items()}, ids=rows)
    ref.thresholds = dict(index.thresholds)
    for a, b in zip(loaded.rank(q), ref.rank(q)):
        np.testing.assert_array_equal(a, b)
