"""Files and bytes of a CtFIndex racing writers: a removal that slips in between the compaction that a save
does first and the writing itself must not reach the file as a live item (with zeroed codes). Paths: one
ending in a separator is refused (not written without it); bytes paths are read as the OS reads them."""

import os
import sys

import numpy as np
import pytest
from reference import correlated_code_sets

from ctfreid.errors import CtfreidError
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


def _same_index(a: CtFIndex, b: CtFIndex, q: dict) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    for L in LENGTHS:
        np.testing.assert_array_equal(a.codes(L), b.codes(L))
    assert a.thresholds == b.thresholds
    for x, y in zip(a.rank(q), b.rank(q)):
        np.testing.assert_array_equal(x, y)


def test_a_path_ending_in_a_separator_is_refused_not_used_without_it(tmp_path):
    q, g = correlated_code_sets(np.random.default_rng(3), 50, 2, LENGTHS)
    index = CtFIndex()
    index.add(g)
    (tmp_path / "dir").mkdir()
    target = tmp_path / "dir" / "file"
    for bad in (f"{target}{os.sep}", f"{target}{os.sep}.", os.fsencode(f"{target}{os.sep}"), ""):
        # was: "dir/file/" and "dir/file/." wrote dir/file (pathlib drops the separator and the dot)
        with pytest.raises(CtfreidError, match="cannot save index to .*a file path cannot be empty or end in a sep"):
            index.save(bad)
    assert list((tmp_path / "dir").iterdir()) == []
    index.save(target)
    with pytest.raises(CtfreidError, match=r"cannot load index '.*file/': a file path cannot"):
        CtFIndex.load(f"{target}/")  # was: read dir/file, where open() refuses "dir/file/" (not a directory)
    with pytest.raises(NotADirectoryError):
        open(f"{target}/", "rb")


def test_bytes_paths_are_read_as_the_os_reads_them(tmp_path):
    q, g = correlated_code_sets(np.random.default_rng(4), 80, 3, LENGTHS)
    index = CtFIndex()
    index.add(g)
    index.remove_ids([3])
    index.thresholds = {32: 11, 128: 48}
    path = tmp_path / "x.ctf"
    index.save(os.fsencode(path))  # was: TypeError from pathlib (open() and numpy.load take bytes paths)
    with open(os.fsencode(path), "rb") as f:  # the file open() finds under that name
        assert f.read() == index.to_bytes()
    _same_index(CtFIndex.load(os.fsencode(path)), index, q)
    _same_index(CtFIndex.load(os.fsencode(path), mmap=False), index, q)
    with pytest.raises(FileNotFoundError, match="index file .*nope.ctf does not exist"):
        CtFIndex.load(os.fsencode(tmp_path / "nope.ctf"))
    if sys.platform == "linux":  # a name that is not UTF-8: bytes kept exactly (surrogateescape), as by open()
        raw = os.fsencode(tmp_path) + b"/\xff.ctf"
        index.save(raw)
        assert b"\xff.ctf" in os.listdir(os.fsencode(tmp_path))
        _same_index(CtFIndex.load(raw), index, q)
