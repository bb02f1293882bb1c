"""``CtFIndex``: a faiss-style index for coarse-to-fine search over multi-length binary codes (Sec. 3.1).

    index = CtFIndex()
    index.add({32: c32, 128: c128, 512: c512, 2048: c2048})   # lengths fixed by the first add
    index.thresholds = {32: 9, 128: 41, 512: 190}               # e.g. from DTO (Sec. 3.3)
    D, I = index.search(query_codes, k=100)                     # int32 / int64 [nq, min(k, ntotal)]
    hits = index.search_hits(query_codes, k=100)                # ids, stages, per-length distances
    index.remove_ids(np.array([3, 17]))                         # erasure: the codes are overwritten
    index.save("gallery.ctf"); index = CtFIndex.load("gallery.ctf", mmap=True)

Results are exactly those of ``ctf_search`` / ``ctf_rank`` over the live items (``I`` holds the stored
ids). The order is the coarse-to-fine key of ``ctfreid.search.merge``: more stages first, then the distances
from the finest length reached down to the shortest, then insertion order. ``k`` larger than ``ntotal`` is
clamped: results have ``min(k, ntotal)`` columns (no padding; a faiss index would pad with -1). An index with
a single length is a plain Hamming index (no thresholds).

Removal (``remove_ids``) clears the items' bits in a live mask that the scans AND into their block masks
(one word per 64 codes) and overwrites their codes with zeros at once: O(removed). On AVX2 hosts without
AVX-512 an index whose first length is 32 bits also keeps those codes as byte planes (``keeps_planes``; 4 bytes
a code, rebuilt on load, never saved), and zeroes that copy too. Dead slots are compacted
away when they pass ``COMPACT_FRACTION`` of the slots (as Qdrant's vacuum) or on ``compact()``; ``save`` and
``to_bytes`` compact first, so a file never holds a removed item.

Concurrency: any number of threads may search while one adds, removes or compacts; a readers-writer lock
makes each search see the index before or after a whole write, never half of one (the kernels release the
GIL, so searches run in parallel). Writes run one at a time; the long copies of a write (an add's buffers
doubling, a compaction, the first removal from a loaded map) run under the read lock, searches going on,
and only the swap of the copies takes the write lock.

File format (version 1, little-endian)::

    b"CTFREID\\0" | uint32 version | uint32 header size | header (UTF-8 JSON) | arrays | uint32 crc32

The JSON header holds ``lengths``, ``ntotal``, ``thresholds``, ``metadata``, ``file_size`` and, per array
(``codes_<L>`` uint8 [n, L // 8] and ``ids`` int64 [n]), its dtype, shape and offset; arrays start at
64-byte aligned offsets so they can be memory-mapped. The trailing CRC-32 covers every byte before it.
``load`` opens the file once, checks the magic, the version, the header, the size and the checksum on that
descriptor and maps or reads every array from the same descriptor, so a file replaced meanwhile by another
process cannot mix two files. With ``mmap=True`` the checksum is still verified (one sequential read, ~1 s
per GB); the arrays are then read-only maps and the first ``add`` / ``remove_ids`` copies them into memory.
Caveat of memory maps: another program that overwrites the file *in place* (not by replacing it, as
``save`` does) changes what a mapped index reads, or raises SIGBUS if it truncates it; load with
``mmap=False`` when files may be rewritten in place. ``save`` is atomic: a crash mid-save leaves any
previous file intact. ``to_bytes`` / ``from_bytes`` and pickling use the same format.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import mmap as _mmap
import os
import stat
import struct
import threading
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid._rwlock import RWLock, writing
from ctfreid.codes import check_code_set, check_length
from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.asymmetric import StageWeights, Weighting, max_distance, stage_weights
from ctfreid.search.coarse_to_fine import batched, weight_tail
from ctfreid.search.hamming import check_k, check_radius, prepare_queries, range_result
from ctfreid.search.merge import Hits, empty_hits
from ctfreid.search.parallel import check_threads, get_num_threads, run_chunks
from ctfreid.search.thresholds import check_thresholds, threshold_array

MAGIC = b"CTFREID\x00"
FORMAT_VERSION = 1
COMPACT_FRACTION = 0.2  # dead slots beyond this share of the slots are compacted away
_ALIGN = 64
_PREFIX = struct.Struct("<8sII")  # magic, version, header size
_CRC = struct.Struct("<I")
_CHUNK = 16 << 20
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def _align(x: int) -> int:
    return -(-x // _ALIGN) * _ALIGN


def _empty_aligned(shape: tuple, dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary, so that 512- and 2048-bit codes do not
    straddle an extra cache line (fewer memory reads when gathering candidates)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = -raw.ctypes.data % _ALIGN
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def _file_path(path: str | bytes | os.PathLike, what: str) -> Path:
    """``path`` (str, bytes or path-like, decoded as ``open`` decodes bytes) as a Path. One that ends in a
    separator, ``.`` or ``..`` is refused: Path() drops those, and would use the file before them."""
    raw = os.fsdecode(path)
    if os.path.basename(raw) in ("", ".", ".."):
        raise CtfreidError(f"cannot {what} {raw!r}: a file path cannot be empty or end in a separator, "
                           "'.' or '..'")
    return Path(raw)


def _as_ids(ids: Any) -> np.ndarray:
    """Ids to look up (one id or a 1-D integer array; ``[]`` too, which numpy makes float64) as int64 [m] in the
    given order, those that cannot be stored (negative ones, uint64 past int64, which wrap to negative) as
    negatives; else a CtfreidError naming the problem."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim == 1 and arr.size == 0:
        return np.empty(0, np.int64)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise CtfreidError(f"ids must be an integer or a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def ids_to_remove(ids: Any) -> np.ndarray:
    """The argument of ``remove_ids`` (as ``_as_ids`` reads it) as the sorted unique ids that can be stored."""
    arr = _as_ids(ids)
    return np.unique(arr[arr >= 0])


def check_ids(ids: Any, n: int) -> np.ndarray:
    """``ids`` as unique non-negative int64 [n], else a CtfreidError naming the problem."""
    arr = np.asarray(ids)
    if arr.ndim == 1 and arr.size == 0:
        arr = np.empty(0, np.int64)  # numpy makes [] float64
    if arr.ndim != 1 or arr.shape[0] != n or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise CtfreidError(f"ids must be a 1-D integer array of length {n}, got {arr.dtype} {arr.shape}")
    if arr.dtype == np.uint64 and n and int(arr.max()) > np.iinfo(np.int64).max:
        raise CtfreidError(f"ids must be below 2**63 (int64), got {int(arr.max())}")
    out = arr.astype(np.int64)
    if n and int(out.min()) < 0:
        raise CtfreidError(f"ids must be non-negative (-1 marks padding), got {int(out.min())}")
    if n > 1 and not (np.diff(out) > 0).all():
        s = np.sort(out)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise CtfreidError(f"ids must be unique: id {int(dup[0])} is given twice")
    return out


_UINT8 = np.dtype(np.uint8)  # (an identity test is 0.1 us faster than ==; other uint8 dtypes take the slow path)


class _Queries(NamedTuple):
    """A call's validated query codes and the kernels' views of them, made once a call (not once a chunk of
    queries or a kernel call): ``codes``, ``uint8 [nq, L // 8]`` per length, shortest first; ``first``, stage 1's
    read-only words (``_kernels.words32``; ``_kernels.words`` with one length, whose Hamming kernels take them);
    ``later``, the later stages' words (``_kernels.later_queries``; None with one length). ``codes`` is None for
    one query of several lengths read from one copy of its bytes (``_one_query``): its kernels read ``first`` and
    ``later`` only."""

    codes: tuple[np.ndarray, ...] | None
    first: np.ndarray
    later: np.ndarray | None

    def rows(self, a: int, b: int) -> "_Queries":
        """Queries ``a .. b - 1``."""
        later = None if self.later is None else self.later[a:b]
        return _Queries(None if self.codes is None else tuple(q[a:b] for q in self.codes), self.first[a:b], later)


def _word_aligned(codes: np.ndarray) -> bool:
    """Whether the kernels can read the C-contiguous ``uint8 [n, w]`` codes in place as the words they use
    (``_kernels.words`` / ``words32``: 64-bit when w % 8 == 0, else 32-bit). A query row sliced from a batch
    of 32-bit codes is 4- but not always 8-byte aligned; ``ctypes.data`` would cost 2 us a search."""
    w = codes.shape[1]
    return w % 4 == 0 and codes.view(np.uint64 if w % 8 == 0 else np.uint32).flags.aligned


@functools.lru_cache(maxsize=64)
def _query_layout(lengths: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """``qoff`` of a pyramid of code ``lengths`` (``_kernels.stage_offsets``; shared: never written) and whether its
    later query codes need zero padding (``_kernels.later_queries``)."""
    qoff = _kernels.stage_offsets(list(lengths))
    return qoff, 8 * int(qoff[-1]) != sum(L // 8 for L in lengths[1:])


def _query_views(qs: tuple[np.ndarray, ...], lengths: list[int]) -> _Queries:
    """``_Queries`` of validated ``uint8 [nq, L // 8]`` codes (stage 1's word-aligned), one array per length."""
    if len(qs) == 1:
        return _Queries(qs, _kernels.words(qs[0]), None)
    qoff, padded = _query_layout(tuple(lengths))
    return _Queries(qs, _kernels.words32(qs[0]), _kernels.later_queries(qs, qoff, padded))


def _plain_queries(query_codes: Any, lengths: list[int]) -> tuple[_Queries, bool] | None:
    """``CtFIndex._queries`` for the common case, checked with a few identity tests (a search's Python is most of
    one query's time on small galleries): a dict of C-contiguous ``uint8`` arrays of the index's lengths, all 1-D
    or all of one number of rows (at least one), stage 1's word-aligned where they are read in place (one query's
    bytes are copied: any). None for anything else: the general path then validates, copies where needed and
    explains any problem."""
    if type(query_codes) is not dict or len(query_codes) != len(lengths):
        return None
    arrays = [query_codes.get(L) for L in lengths]
    v = arrays[0]
    if type(v) is not np.ndarray:
        return None
    single = v.ndim == 1
    rows = () if single else v.shape[:1]
    for L, a in zip(lengths, arrays):
        if not (type(a) is np.ndarray and a.dtype is _UINT8 and a.shape == (*rows, L // 8) and a.flags.c_contiguous):
            return None
    q = _one_query(arrays, lengths) if single or v.shape[0] == 1 else None
    if q is None:
        codes = tuple(a[None] for a in arrays) if single else tuple(arrays)
        if codes[0].shape[0] == 0 or not _word_aligned(codes[0]):
            return None
        q = _query_views(codes, lengths)
    return q, single


def _one_query(codes: list[np.ndarray], lengths: list[int]) -> _Queries | None:
    """``_query_views`` of one query's valid codes (``uint8 [L // 8]`` or ``[1, L // 8]`` each, C-contiguous), read
    from one copy of its bytes (stage 1's words, zero bytes up to a multiple of 8, then the later stages' words):
    ~2.5 us faster a search than ``_query_views``' NumPy calls, read-only and aligned as those (a bytes object's
    data are 16-byte aligned); ``codes`` None (the kernels read the words only). None for one code length or
    padded later words, which take ``_query_views``."""
    qoff, padded = _query_layout(tuple(lengths))
    if len(lengths) == 1 or padded:
        return None
    w1 = lengths[0] // 8
    gap = -w1 % 8
    buf = b"".join((codes[0], bytes(gap), *codes[1:])) if gap else b"".join(codes)
    later = np.ndarray((1, int(qoff[-1])), np.uint64, buf, w1 + gap)
    return _Queries(None, np.ndarray((1, w1 // 4), np.uint32, buf), later) if later.flags.aligned else None


def keeps_planes(lengths: Sequence[int] | None) -> bool:
    """Whether an index of these code lengths keeps its 32-bit codes also as byte planes (``_kernels.lay_planes``):
    on hosts whose stage-1 masks read them (``_kernels.BYTE_PLANES``: AVX2 without AVX-512), for a pyramid whose
    first length is 32 bits. 4 bytes more a code; one query's stage 1 then reads them in place of the codes
    (weighted: 1.6x faster a query at 1e6, ``benchmarks/bench_byte_planes.py``)."""
    return bool(_kernels.BYTE_PLANES) and lengths is not None and len(lengths) > 1 and lengths[0] == 32


def _planes_bytes(rows: int) -> int:
    """Bytes of byte planes with room for ``rows`` codes: 256 a block of ``_kernels.BLOCK`` (64) codes."""
    return 256 * -(-rows // _kernels.BLOCK)


def _laid_planes(codes: np.ndarray, n: int, old: np.ndarray | None = None) -> np.ndarray:
    """Byte planes with room for every block of the first length's buffer ``codes``, holding the full blocks of
    its first ``n`` rows: copied from ``old`` (planes of the same rows) when given, else laid out from the codes."""
    out = _empty_aligned((_planes_bytes(codes.shape[0]),), np.uint8)
    full = n // _kernels.BLOCK
    if old is not None:
        out[: 256 * full] = old[: 256 * full]
    else:
        _kernels.lay_planes(_kernels.words32(codes[:n]).reshape(-1), 0, full, out)
    return out


def default_thresholds(lengths: Sequence[int], thresholds: Mapping[int, int],
                       weighted_thresholds: Mapping[int, int] | None, weighting: Weighting | None,
                       weighted: Sequence[int] = ()) -> Mapping[int, int]:
    """The thresholds of a search that passes none: an index's ``weighted_thresholds`` for a search that
    weights the lengths its ``weighting`` weights (``weighted``: the lengths the call weights), else its
    Hamming ``thresholds`` (unchecked; ``{}`` with one code length). A CtfreidError when the index has none
    of the kind the call needs."""
    if len(lengths) < 2:
        return {}  # one code length: nothing to threshold
    if not weighted:
        if not thresholds and weighted_thresholds is not None:
            raise CtfreidError("the index has thresholds for weighted stages only: pass query_weights="
                               "index.weighting.query_weights(values, later_values), or Hamming thresholds "
                               "for this call")
        return thresholds
    if weighted_thresholds is None:
        raise CtfreidError("query_weights given, but the index has no thresholds for weighted stages "
                           "(index.weighted_thresholds is None): pass thresholds fitted for them "
                           "('ctfreid calibrate' writes them beside the Hamming ones)")
    fitted = weighting.lengths(lengths[0]) if weighting is not None else [lengths[0]]
    if list(weighted) != fitted:
        raise CtfreidError(f"query_weights weight the lengths {list(weighted)}, the index's weighted thresholds "
                           f"were fitted weighting {fitted}: pass query_weights=index.weighting.query_weights("
                           "values, later_values), or thresholds for this call")
    return weighted_thresholds


def weighted_maxima(weighting: Weighting | None, lengths: Sequence[int]) -> dict[int, int]:
    """The bounds of weighted thresholds (``check_thresholds``' ``maxima``) for ``weighting``'s lengths (the
    shortest alone without one)."""
    return weighting.maxima(lengths[0]) if weighting is not None else {lengths[0]: max_distance(lengths[0])}


_GROW_MIN = 1024  # room a scratch array is made with beyond an eighth more (small indexes)


def _room(need: int) -> int:
    """The size a scratch array is made with for ``need`` codes (or candidates): an eighth more, so that an index
    growing by adds keeps it for its next need / 8 codes."""
    return need + need // 8 + _GROW_MIN


def _fits(have: int, need: int) -> bool:
    """Whether a scratch array made for ``have`` serves ``need``: large enough, and not more than twice as large
    (an index that shrank makes a smaller one)."""
    return need <= have <= 2 * need + _GROW_MIN


class _Scratch:
    """One search's scratch: ``ctf_topk``'s workspace and ``ctf_topk_batch``'s candidate buffers, reused by
    later searches while they fit (fresh memory costs its page faults: 25-35 ms at 1e6 items, 4 stages), also
    after adds: each is made with room for an eighth more codes. Made for the exact size, a gallery that takes
    adds between searches made them anew after every add (at 1e6 items one query took 1.3-1.6 ms after an add
    against 0.5 without, in three runs of five; benchmarks/README.md, twenty-first session)."""

    __slots__ = ("ws", "batch")

    def __init__(self) -> None:
        self.ws: tuple | None = None  # ((n, k, S) it was made for, its arrays)
        self.batch: tuple[np.ndarray, np.ndarray] | None = None

    def workspace(self, n: int, k: int, S: int) -> tuple[np.ndarray, np.ndarray]:
        """``ctf_workspace`` for ``n`` codes, top-``k``, ``S`` stages, made for ``_room(n)`` codes and kept while it
        ``_fits`` (the kernels lay it out by the n they are given, so it only needs to be large enough), or for a
        larger k (alternating k = 10 and 100 would otherwise fault on every call)."""
        ws = self.ws
        if ws is None or not _fits(ws[0][0], n) or ws[0][2] != S or ws[0][1] < min(k, n):
            made = (_room(n), max(k, ws[0][1] if ws is not None else 0), S)
            ws = self.ws = (made, _kernels.ctf_workspace(*made))
        return ws[1]

    def batch_buffers(self, n: int, nq: int, S: int, room: int) -> tuple[np.ndarray, np.ndarray]:
        """``ctf_topk_batch``'s candidate buffers for ``nq`` queries, ``room`` kept candidates a query: kept while
        they hold enough queries and their candidates ``_fits`` (the kernel reads both from their shape), made
        with ``_room`` for more candidates, as ``workspace``."""
        G, cap = _kernels.batch_shape(n, nq, S, room=room)
        bufs = self.batch
        if bufs is None or bufs[0].shape[0] < G or bufs[1].shape[1] != S or not _fits(bufs[0].shape[1], cap):
            bufs = self.batch = _kernels.batch_buffers(G, _room(cap), S)
        return bufs


class CtFIndex:
    """Coarse-to-fine index over ``{length: packed codes}`` code sets with int64 ids (faiss-style).

    Attributes: ``thresholds`` (Hamming thresholds, dict length -> int for every length but the longest:
    the default of searches without ``query_weights``; checked when searching; a call may pass its own),
    ``weighted_thresholds`` and ``weighting`` (the default of searches with ``query_weights`` =
    ``weighting.query_weights(values, later_values)``: thresholds fitted with weighted stages, a weighted
    distance at each length the :class:`~ctfreid.search.asymmetric.Weighting` weights; None when not fitted),
    ``metadata`` (JSON-serialisable dict saved with the index), ``ntotal`` (live items), ``lengths``
    (shortest first).
    """

    def __init__(self) -> None:
        self.thresholds: dict[int, int] = {}
        self.weighted_thresholds: dict[int, int] | None = None
        self.weighting: Weighting | None = None
        self.metadata: dict[str, Any] = {}
        self._lengths: list[int] | None = None
        self._codes: dict[int, np.ndarray] = {}  # capacity-sized buffers (or read-only maps after load)
        self._ids: np.ndarray = np.empty(0, np.int64)  # id of every slot (dead slots keep theirs)
        self._live: np.ndarray = _kernels.all_live(0)  # bit j of word b: slot 64 b + j is live
        # the 32-bit codes' full blocks as byte planes (keeps_planes), room for every block of their buffer; or None
        self._planes: np.ndarray | None = None
        self._nslots = 0  # slots in use, live or dead
        self._ndead = 0
        self._next_id = 0  # next default id (default ids are never reused)
        self._default_ids: bool | None = None  # fixed by the first add
        self._increasing = True  # ids strictly increase with the slot: lookups by binary search
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (argsort of ids, sorted ids) otherwise
        self._views: tuple | None = None
        self._thr_cache: dict[tuple, np.ndarray] = {}  # checked thresholds (_thresholds); lengths never change
        self._lock = RWLock()
        # one write at a time (add, remove_ids, compact): an add can then copy its grown buffers under the read
        # lock, with searches going on, and hold the write lock only to swap them in
        self._writing = threading.Lock()
        # search scratch, one set per search running at once, at most get_num_threads() kept (not per thread: a
        # service's dozens of worker threads would each keep tens of MB at 1e6 items); deque append / pop are atomic
        self._scratch: deque[_Scratch] = deque()
        self._batch_room_seen = 0  # kept candidates a query of any batch needed (_note_batch_keep)

    # ---------------------------------------------------------------------------------------- state
    @property
    def ntotal(self) -> int:
        """Number of live (stored, not removed) items."""
        return self._nslots - self._ndead

    @property
    def lengths(self) -> list[int]:
        """Code lengths (bits), shortest first; empty before the first ``add``."""
        return list(self._lengths or [])

    def __repr__(self) -> str:
        return f"CtFIndex(lengths={self.lengths}, ntotal={self.ntotal}, thresholds={self.thresholds})"

    def _slots_are_ids(self) -> bool:
        """Whether every slot's id is the slot itself (default ids and no compaction yet: ids 0 .. n - 1 in
        order), so that results need no mapping (a full ranking maps every item: 1.4 million per call for 600
        queries on a 2,276-item gallery). Strictly increasing ids from 0 to n - 1 over n slots are exactly those."""
        n = self._nslots
        return self._increasing and (n == 0 or (int(self._ids[0]) == 0 and int(self._ids[n - 1]) == n - 1))

    def _slot_ids(self, P: np.ndarray) -> np.ndarray:
        """The stored ids of slots ``P`` (``P`` itself when the slots are the ids). Call with the read lock held."""
        return P if self._slots_are_ids() else self._ids[P]

    def _live_slots(self) -> np.ndarray:
        """Boolean [nslots]: which slots are live."""
        bits = np.unpackbits(self._live.view(np.uint8), bitorder="little")
        return bits[: self._nslots].astype(bool)

    def codes(self, length: int) -> np.ndarray:
        """The stored ``length``-bit codes of the live items, ``uint8[ntotal, length // 8]`` in insertion
        order (read-only). While no item is removed this is a view of the index's buffer, so an item
        removed later reads as zeros in it too, as long as the index keeps that buffer (an ``add`` that grows
        it, a compaction or the first write to a memory-mapped index moves the codes, and the view keeps the
        old bytes); copy it to keep the codes."""
        if length not in (self._lengths or []):
            raise CtfreidError(f"this index holds code lengths {self.lengths}, not {length!r}")
        with self._lock.read():
            view = self._codes[length][: self._nslots]
            if self._ndead:
                view = view[self._live_slots()]
            view = view.view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """The live ids, ``int64[ntotal]`` in insertion order (read-only)."""
        with self._lock.read():
            view = self._ids[: self._nslots]
            if self._ndead:
                view = view[self._live_slots()]
            view = view.view()
        view.flags.writeable = False
        return view

    def contains(self, ids: Any) -> np.ndarray | bool:
        """Which of ``ids`` (one integer, or a 1-D integer array) are live items here: ``bool[len(ids)]``, or a
        bool for one id (as usearch's ``contains``); a binary search per id."""
        wide = _as_ids(ids)
        with self._lock.read():
            found = (self._lookup(wide) >= 0) & (wide >= 0)
        return bool(found[0]) if np.ndim(ids) == 0 else found

    # ------------------------------------------------------------------------------------------ add
    def add(self, codes: Mapping[int, np.ndarray], ids: np.ndarray | None = None, lock: RWLock | None = None) -> None:
        """Append a code set ``{length: uint8[n, length // 8]}``; ``ids``: unique non-negative int64 [n], or
        None for default ids (``0, 1, 2, ...`` in insertion order, never reused after a removal). The first
        ``add`` fixes the lengths and whether ids are given. Larger buffers, when due, are filled while searches
        go on; searches wait only while the items are copied in. ``lock``: a readers-writer lock of the
        caller's, held for writing during that copy too (as :meth:`remove_ids`)."""
        cs = check_code_set(codes, "codes")
        lengths = list(cs)
        n = next(iter(cs.values())).shape[0]
        given = ids is not None
        ids_arr = check_ids(ids, n) if given else None
        with self._writing:
            self._swap_in(self._grown(n))
            with writing(lock), self._lock.write():
                self._add_locked(cs, lengths, n, given, ids_arr)

    def reserve(self, n: int) -> None:
        """Room for ``n`` more items (as usearch's ``reserve``), so that adding them copies nothing. The copy
        into larger buffers runs while searches go on; only the swap waits for them. ``add`` does the same
        for its own items (a caller with a lock of its own passes it as ``add``'s ``lock``, which is then held
        for the copy of the items alone). Before the first add (no code lengths yet) there is nothing to reserve."""
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise CtfreidError(f"reserve needs a number of items >= 0, got {n!r}")
        with self._writing:
            self._swap_in(self._grown(int(n)))

    def _swap_in(self, grown: dict | None) -> None:
        """Swap in the buffers of :meth:`_grown` (the caller holds ``_writing``: no write ran since the copy)."""
        if grown is not None:
            with self._lock.write():
                old = (self._ids, dict(self._codes), self._views, self._planes)
                self._ids = grown.pop("ids")
                self._planes = grown.pop("planes", self._planes)
                self._codes.update(grown)
                self._views = None
            # the old buffers are freed here, after the lock: unmapping a loaded file whose name is gone frees
            # its pages (70 ms at 1e6 items of 4 lengths), and searches would wait for it
            del old

    def _grown(self, n: int) -> dict | None:
        """Writable buffers with room for ``n`` more rows holding the current ones (codes by length, and
        ``"ids"``), or None when every buffer is writable and has room (``n = 0``: copies of a read-only map
        from ``load`` only). The doubling copy (3.4 GB at 1e7 items of 4 lengths) runs under the read lock, so
        searches go on meanwhile; the caller holds ``_writing``, so no write changes the rows before it swaps
        the copies in."""
        with self._lock.read():
            if self._lengths is None:
                return None
            need = self._nslots + n
            if all(b.shape[0] >= need and b.flags.writeable for b in (*self._codes.values(), self._ids)):
                return None
            grown: dict = {L: self._grow(self._codes[L], need, (L // 8,), np.uint8) for L in self._lengths}
            grown["ids"] = self._grow(self._ids, need, (), np.int64)
            planes = self._planes_for(grown[self._lengths[0]])
            if planes is not self._planes:
                grown["planes"] = planes
            return grown

    def _add_locked(self, cs: dict, lengths: list[int], n: int, given: bool, ids_arr: np.ndarray | None) -> None:
        """The body of :meth:`add`, under the write lock."""
        if self._lengths is not None and lengths != self._lengths:
            raise CtfreidError(f"codes have lengths {lengths} but the index holds lengths {self._lengths}")
        if self._default_ids is not None and self._default_ids == given:
            raise CtfreidError(
                "ids must be given on every add or on none: the index was built "
                + ("with default ids (0, 1, 2, ...)" if self._default_ids else "with explicit ids")
            )
        if ids_arr is None:
            ids_arr = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        elif n:
            self._check_new_ids(ids_arr)
        if self._lengths is None:
            self._lengths = lengths
            self._codes = {L: np.empty((0, L // 8), np.uint8) for L in lengths}
        self._default_ids = not given
        if n == 0:
            return
        old, new_total = self._nslots, self._nslots + n
        for L, arr in cs.items():
            self._codes[L] = self._grow(self._codes[L], new_total, (L // 8,), np.uint8)
            self._codes[L][old:new_total] = arr
        self._planes = self._planes_for(self._codes[lengths[0]])
        if self._planes is not None:  # the blocks this add filled (a partial block waits until it is full)
            _kernels.lay_planes(_kernels.words32(self._codes[lengths[0]]).reshape(-1), old // _kernels.BLOCK,
                                new_total // _kernels.BLOCK, self._planes)
        self._ids = self._grow(self._ids, new_total, (), np.int64)
        self._ids[old:new_total] = ids_arr
        cap_words = self._ids.shape[0] // _kernels.BLOCK + 1
        if self._live.shape[0] < cap_words:
            live = np.zeros(cap_words, np.uint64)
            live[: self._live.shape[0]] = self._live
            self._live = live
        self._set_live(np.arange(old, new_total), True)
        if self._increasing:
            self._increasing = bool((old == 0 or ids_arr[0] > self._ids[old - 1])
                                    and (n == 1 or (np.diff(ids_arr) > 0).all()))
        self._sorted = None
        self._nslots = new_total
        self._next_id = max(self._next_id, int(ids_arr.max()) + 1)
        self._views = None

    def _check_new_ids(self, ids_arr: np.ndarray) -> None:
        """Refuse ids that a live item holds; compact first when a removed item's slot still holds one."""
        if not self._nslots or (self._increasing and ids_arr.min() > self._ids[self._nslots - 1]):
            return
        pos = self._lookup(ids_arr, live_only=False)
        if (pos < 0).all():
            return
        live = self._live_slots()
        clash = pos[pos >= 0]
        if live[clash].any():
            raise CtfreidError(f"ids must be unique: id {int(self._ids[clash[live[clash]][0]])} is already in the index")
        self._compact_locked()  # only removed items hold these ids: drop their slots first

    def _grow(self, buf: np.ndarray, need: int, row: tuple, dtype) -> np.ndarray:
        """A writable buffer with room for ``need`` rows holding the current rows (amortised doubling;
        read-only maps are copied into memory here)."""
        if buf.shape[0] >= need and buf.flags.writeable:
            return buf
        cap = max(need, 2 * self._nslots, 1024) if buf.shape[0] < need else buf.shape[0]
        new = _empty_aligned((cap,) + row, dtype)
        if self._nslots:
            new[: self._nslots] = buf[: self._nslots]
        return new

    def _planes_for(self, codes: np.ndarray) -> np.ndarray | None:
        """Byte planes with room for every block of the first length's buffer ``codes``, holding the current
        full blocks (the current planes when they have room); None when the index keeps none (``keeps_planes``)."""
        if not keeps_planes(self._lengths):
            return None
        cur = self._planes
        if cur is not None and cur.shape[0] >= _planes_bytes(codes.shape[0]):
            return cur
        return _laid_planes(codes, self._nslots, cur)

    def _set_live(self, pos: np.ndarray, alive: bool, live: np.ndarray | None = None) -> None:
        """Mark slots ``pos`` live or dead in ``live`` (default: the index's bits)."""
        live = self._live if live is None else live
        words = (pos >> 6).astype(np.intp)
        bits = np.left_shift(np.uint64(1), (pos & 63).astype(np.uint64))
        if alive:
            np.bitwise_or.at(live, words, bits)
        else:
            np.bitwise_and.at(live, words, ~bits)

    # ------------------------------------------------------------------------------------- removal
    def _lookup(self, ids: np.ndarray, live_only: bool = True) -> np.ndarray:
        """Slot of each id, -1 when absent (or removed, with ``live_only``): binary search, O(log n) per id
        (the ids are sorted once after an add when they do not increase with insertion)."""
        n = self._nslots
        if n == 0 or ids.size == 0:
            return np.full(ids.shape, -1, np.int64)
        if self._increasing:
            stored, order = self._ids[:n], None
        else:
            if self._sorted is None:
                order = np.argsort(self._ids[:n], kind="stable")
                self._sorted = (order, self._ids[:n][order])
            order, stored = self._sorted
        at = np.minimum(np.searchsorted(stored, ids), n - 1)
        found = stored[at] == ids
        pos = np.where(found, at if order is None else order[at], -1).astype(np.int64)
        if live_only and found.any():
            p = pos[found]
            alive = (self._live[p >> 6] >> (p & 63).astype(np.uint64)) & np.uint64(1)
            pos[np.flatnonzero(found)[alive == 0]] = -1
        return pos

    def remove_ids(self, ids: Any, compact: bool = True, lock: RWLock | None = None) -> int:
        """Remove the items with these ids; returns how many were removed (unknown or already removed ids
        are not an error and are not counted).

        From the return on, no search returns them, their codes are overwritten with zeros in memory, and
        ``save`` / ``to_bytes`` write none of their bytes; answers equal those of an index built without
        them. Costs O(removed log n); dead slots are compacted away past ``COMPACT_FRACTION`` of the slots
        (the copy runs while searches go on). ``compact=False`` leaves that to a later ``compact(due=True)``:
        for a caller that holds a lock of its own around the removal (rather than passing it as ``lock``).

        Searches wait only while the removal becomes visible, all items at once: a swap of the live bits (one
        per slot). The look-ups before it and the erasure of the codes after it run while searches go on: the
        kernels mask their candidates with the live bits, and a full ranking drops the dead slots' distances,
        so no answer depends on a dead slot's code. ``lock``: a readers-writer lock of the caller's (the
        service's gallery lock), held for writing during the swap too, so that the caller's searches see the
        removal as one write (taken before the index's own lock, the order in which a search takes them).
        """
        arr = ids_to_remove(ids)
        if arr.size == 0:
            return 0
        with self._writing:  # no other write from here on: slots, ids and buffers stay as they are
            # a read-only map from load is copied into memory first (copy on write), while searches go on
            self._swap_in(self._grown(0))
            pos = self._lookup(arr)
            pos = pos[pos >= 0]
            if pos.size == 0:
                return 0
            live = self._live.copy()  # n / 8 bytes
            self._set_live(pos, False, live)
            with writing(lock), self._lock.write():
                self._live = live
                self._ndead += int(pos.size)
            self._erase(pos)
            if compact:  # the items are gone from every answer already; searches go on during the copy
                self._compact(due=True)
            return int(pos.size)

    def _erase(self, pos: np.ndarray) -> None:
        """Overwrite the codes of the dead slots ``pos`` with zeros, and their copy in the byte planes (``_writing``
        held; searches go on, see ``remove_ids``; the kernel releases the GIL)."""
        planes = self._planes if self._planes is not None else np.empty(0, np.uint8)
        _kernels.erase_slots(tuple(self._codes[L] for L in self._lengths), planes, pos)

    def compact(self, due: bool = False) -> None:
        """Drop the slots of removed items now (O(n)); answers do not change. The copy of the live items runs
        while searches go on; the write lock is held only to swap the copies in. ``due``: only when the dead
        slots pass ``COMPACT_FRACTION`` of the slots (as ``remove_ids`` does)."""
        with self._writing:
            self._compact(due)

    def _compact(self, due: bool = False) -> None:
        """Compact with ``_writing`` held: copy under the read lock (no write can change the rows, since
        every write holds ``_writing``), then swap under the write lock; ``due``: as ``compact``."""
        with self._lock.read():
            if due and self._ndead <= COMPACT_FRACTION * self._nslots:
                return
            copies = self._compacted()
        if copies is not None:
            with self._lock.write():
                old = (self._ids, self._codes, self._live, self._views, self._planes)
                self._install(copies)
            del old  # freed after the lock (see _swap_in)

    def _compact_locked(self) -> None:
        """Compact with the write lock held (an add whose ids only removed items held)."""
        copies = self._compacted()
        if copies is not None:
            self._install(copies)

    def _compacted(self) -> dict | None:
        """The live items' rows in fresh buffers (codes by length, ``"ids"``, ``"live"``, ``"planes"`` when kept),
        or None when no slot is dead; changes nothing."""
        if not self._ndead:
            return None
        keep = self._live_slots()
        m = int(keep.sum())
        out: dict = {}
        for L in self._lengths:
            out[L] = _empty_aligned((max(m, 1024), L // 8), np.uint8)
            out[L][:m] = self._codes[L][: self._nslots][keep]
        ids = _empty_aligned((max(m, 1024),), np.int64)
        ids[:m] = self._ids[: self._nslots][keep]
        if keeps_planes(self._lengths):
            out["planes"] = _laid_planes(out[self._lengths[0]], m)
        live = np.zeros(ids.shape[0] // _kernels.BLOCK + 1, np.uint64)
        full, rest = divmod(m, 64)
        live[:full] = np.uint64(0xFFFFFFFFFFFFFFFF)
        if rest:
            live[full] = np.uint64((1 << rest) - 1)
        out["ids"], out["live"] = ids, live
        return out

    def _install(self, copies: dict) -> None:
        """Swap in the buffers of :meth:`_compacted` (write lock held)."""
        ids = copies.pop("ids")
        self._live = copies.pop("live")
        self._planes = copies.pop("planes", None)
        self._codes = copies
        self._ids = ids
        m = self._nslots - self._ndead
        self._nslots, self._ndead = m, 0
        self._increasing = bool(m <= 1 or (np.diff(ids[:m]) > 0).all())
        self._sorted = None
        self._views = None

    # --------------------------------------------------------------------------------------- search
    def _queries(self, query_codes: Mapping[int, np.ndarray]) -> tuple[_Queries, bool]:
        """Validated query codes with the kernels' views of them, and whether the queries were 1-D. (Without the
        lock: the views depend only on the code lengths, which the first ``add`` fixes.)"""
        lengths = self._lengths
        if lengths is None:
            raise CtfreidError("the index is empty: add codes before searching")
        plain = _plain_queries(query_codes, lengths)
        if plain is not None:
            return plain
        if not isinstance(query_codes, Mapping):
            raise CtfreidError(f"query_codes must be a dict {{length: uint8 codes}}, got {type(query_codes).__name__}")
        try:
            arrays = [query_codes[L] for L in lengths]
        except KeyError:
            arrays = None
        if arrays is None or len(query_codes) != len(lengths):
            keys = sorted(query_codes)
            raise CtfreidError(f"query_codes have code lengths {keys} but the index holds {lengths}")
        single = True
        for v in arrays:
            if not (isinstance(v, np.ndarray) and v.ndim == 1):
                single = False
                break
        qs = []
        for L, v in zip(lengths, arrays):
            v, _ = prepare_queries(v[None] if single else v, L // 8, f"query_codes[{L}]")
            if qs and v.shape[0] != qs[0].shape[0]:
                raise CtfreidError(f"query_codes[{L}] has {v.shape[0]} rows but the shorter codes have {qs[0].shape[0]}")
            qs.append(v)
        return _query_views(tuple(qs), lengths), single

    def _stage_views(self) -> tuple:
        """Stage-1 codes, later-stage word views, lengths, query offsets and the stage-1 ``words32`` view (None
        when the shortest code is not a multiple of 32 bits); cached until the next write."""
        if self._views is None:
            gs = [self._codes[L][: self._nslots] for L in self._lengths]
            Gr = tuple(_kernels.words64(g) for g in gs[1:]) + _kernels.stage_pad(len(gs) - 1)
            Ls = np.array(self._lengths, dtype=np.int64)
            qoff = _query_layout(tuple(self._lengths))[0]
            g1 = _kernels.words32(gs[0]) if gs[0].shape[1] % 4 == 0 else None
            self._views = (gs[0], Gr, Ls, qoff, g1)
        return self._views

    def _thresholds(self, thresholds: Mapping[int, int] | None, sw: StageWeights | None = None) -> np.ndarray:
        """Per-call ``thresholds``, else the default for the call (``weighted_thresholds`` for a weighted
        stage 1, else ``thresholds``), validated; ``sw``: the call's query weights (their lengths' thresholds are
        weighted distances). A dict of integers is checked once until its contents change (a few such dicts are
        remembered: a service passes the same thresholds in every request; the check costs ~10 us)."""
        maxima = sw.maxima if sw is not None else None
        weighted = () if sw is None else tuple(sw.maxima)
        if thresholds is None:
            thresholds = default_thresholds(self._lengths, self.thresholds, self.weighted_thresholds, self.weighting,
                                             weighted)
        if type(thresholds) is not dict:
            return threshold_array(thresholds, self._lengths, maxima=maxima)
        items = tuple(thresholds.items())
        for _, t in items:  # integers only: True == 1, and a remembered 1 must not answer for a bool (refused)
            if type(t) is not int and not isinstance(t, np.integer):
                return threshold_array(thresholds, self._lengths, maxima=maxima)
        key = (items, weighted)
        cache = self._thr_cache
        thr = cache.get(key)
        if thr is None:
            thr = threshold_array(thresholds, self._lengths, maxima=maxima)
            if len(cache) >= 16:
                cache.clear()
            cache[key] = thr
        return thr

    def _positions(self, q: _Queries, k: int | None, thr: np.ndarray,
                   sw: StageWeights | None = None) -> tuple:
        """Kernel results over the slots: (D, slot positions), [nq, min(k, ntotal)] (all live for k None), and
        the per-stage candidate counts ``int64 [nq, S]`` (items ranked at each stage; -1 for full rankings)
        but stage 1's, left 0: every live item, which :meth:`_run` fills in where a caller returns the counts (a
        column set costs 1-2 us a search). ``sw``: query weights (``asymmetric.stage_weights``). Call with the
        read lock held."""
        n, nq, live_n = self._nslots, q.first.shape[0], self.ntotal
        lengths = self._lengths
        G1 = self._stage_views()[0]
        m = live_n if k is None else min(k, live_n)
        C = np.zeros((nq, len(lengths)), np.int64) if k is not None else np.full((nq, len(lengths)), -1, np.int64)
        if m == 0:
            return np.empty((nq, 0), np.int32), np.empty((nq, 0), np.int64), C
        weighted = weight_tail(sw)  # the kernels' trailing P1, Lw[, Pr]
        # one weighted length has no top-k kernel: its full ranking, then the first m
        full = k is None or (sw is not None and len(lengths) == 1)
        cols = n if full else m
        D = np.empty((nq, cols), np.int32)
        P = np.empty((nq, cols), np.int64)
        if len(lengths) == 1:
            if sw is not None:
                _kernels.weighted_rank(_kernels.words32(q.codes[0]), sw.first, _kernels.words32(G1), weighted[1], D, P)
            elif full:
                _kernels.rank(q.first, _kernels.words(G1), lengths[0], D, P)
            else:
                _kernels.topk(q.first, _kernels.words(G1), lengths[0], m, self._live, D, P)
        elif full:
            _kernels.ctf_rank(*self._ctf_args(q, thr, sw), D, P, *weighted)
        else:
            self._ctf_topk(q, m, thr, sw, D, P, C)
        if full and self._ndead:  # the order is a per-item key: dropping removed items keeps it exact
            keep = self._live_slots()[P]
            P = P[keep].reshape(nq, live_n)
            D = D[keep].reshape(nq, live_n)
        return (D, P, C) if cols == m or k is None else (D[:, :m], P[:, :m], C)

    def _ctf_args(self, q: _Queries, thr: np.ndarray, sw: StageWeights | None) -> tuple:
        """The leading arguments of the CtF kernels (several lengths) for queries ``q``."""
        _, Gr, Ls, qoff, g1 = self._stage_views()
        # each stage's largest distance, which sizes the sort keys: other than Ls for weighted later stages
        Lmax = Ls if sw is None or sw.later is None else sw.stage_maxima(self._lengths)
        return q.first, g1, self._lengths[0], q.later, qoff, Gr, Lmax, len(self._lengths), thr

    def _ctf_topk(self, q: _Queries, m: int, thr: np.ndarray, sw: StageWeights | None, D: np.ndarray,
                  P: np.ndarray, C: np.ndarray) -> None:
        """The first ``m`` of the CtF rankings of ``q`` (several lengths) into ``D``/``P`` (slots) and their
        stage counts into ``C[:, 1:]``: the tile scan (``ctf_topk_batch``) or query by query (``ctf_topk``), as
        ``batched`` decides. Call with the read lock held."""
        n, nq, planes = self._nslots, q.first.shape[0], self._planes
        args = self._ctf_args(q, thr, sw)
        tail = weight_tail(sw)
        if planes is not None:  # the stored planes (the last argument) after P1, Lw, Pr
            tail = (*tail, None, 0, None)[:3] + (planes,)
        try:
            ws = self._scratch.pop()  # the last one given back: warmest in the caches
        except IndexError:
            ws = _Scratch()
        S = len(self._lengths)
        try:
            if batched(nq, self._lengths, n, sw, thr, planes is not None):
                Ls = self._stage_views()[2]
                hi2 = _kernels.stage2_keep(n, thr, Ls)
                _kernels.ctf_topk_batch(*args, m, self._live, *ws.workspace(n, m, S), hi2,
                                        *ws.batch_buffers(n, nq, S, self._batch_room(n)), D, P, C, *tail)
                self._note_batch_keep(n, C[:, _kernels.kept_stage(n, Ls)])
            else:
                _kernels.ctf_topk(*args, m, self._live, *ws.workspace(n, m, S), D, P, C, *tail)
        finally:  # kept for the next search, up to one set per search thread (more at once: freed after)
            if not self._scratch or len(self._scratch) < get_num_threads():
                self._scratch.append(ws)

    def _batch_room(self, n: int) -> int:
        """Kept candidates a query the batch buffers hold: n / 64 at first, then what :meth:`_note_batch_keep`
        saw in any batch (a scratch set's first batch is sized by the others' batches)."""
        return max(n // 64, self._batch_room_seen)

    def _note_batch_keep(self, n: int, kept: np.ndarray) -> None:
        """Grow the batch buffers of the next batches (every scratch set's) when a query of this one kept more
        candidates (``kept``: per query, its count at ``_kernels.kept_stage``) than they held. Such a query was
        searched on its own, at the speed of one query: on real codes a default fit keeps 2-6 % of 1e6 items
        after two stages (docs/results-cuhk03.md), more than the first guess of n / 64. At most n / 8 (the
        buffers' memory; a query that keeps more is dominated by its later stages, which a batch does not
        share). Threads race benignly here: each writes a room that fits its own batch."""
        need = int(kept.max())
        if need > self._batch_room(n):
            self._batch_room_seen = min(n // 8, need + need // 4)

    def _hit_keys(self, q: _Queries, P: np.ndarray, thr: np.ndarray,
                  sw: StageWeights | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-length distances and stage counts of the hits at slots ``P`` (read lock held)."""
        _, Gr, _, qoff, g1 = self._stage_views()
        S = len(self._lengths)
        dist = np.empty(P.shape + (S,), np.int32)
        stages = np.empty(P.shape, np.int8)
        Qr = q.later if S > 1 else _kernels._readonly(np.zeros((P.shape[0], 1), np.uint64))
        Q1 = q.first if S > 1 else _kernels.words32(q.codes[0])
        _kernels.hit_keys(Q1, g1, Qr, qoff, Gr, S, thr, P, dist, stages, *(() if sw is None else (sw.first, sw.later)))
        return dist, stages

    def _run(self, q: _Queries, k: int | None, thresholds: Mapping[int, int] | None,
             threads: int | None, keys: bool = False, query_weights: np.ndarray | None = None) -> tuple:
        """(D, slots[, distances, stages]) of every query, the queries split over ``threads`` threads
        (each query is searched on its own, so the answers do not depend on the split)."""
        nq = q.first.shape[0]
        sw = stage_weights(query_weights, nq, self._lengths)
        with self._lock.read():
            thr = self._thresholds(thresholds, sw)

            def chunk(a: int, b: int) -> tuple:
                part = q if a == 0 and b == nq else q.rows(a, b)
                w = sw if sw is None or part is q else sw.rows(a, b)
                D, P, C = self._positions(part, k, thr, w)
                return (D, P, C) + (self._hit_keys(part, P, thr, w) if keys and P.shape[1] else ())

            parts = run_chunks(chunk, nq, threads, work_per_query=self._nslots)
            out = list(parts[0]) if len(parts) == 1 else [np.concatenate(x, axis=0) for x in zip(*parts)]
            if keys:
                out[2][:, 0] = self.ntotal  # stage 1 ranks every live item
            # slots -> stored ids while the read lock is held: D, P, I, C, ...
            out.insert(2, self._slot_ids(out[1]))
        return tuple(out)

    def search(self, query_codes: Mapping[int, np.ndarray], k: int,
               thresholds: Mapping[int, int] | None = None, threads: int | None = None,
               query_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """First ``k`` results of the coarse-to-fine ranking: ``(D int32[nq, m], I int64[nq, m])`` with
        ``m = min(k, ntotal)``.

        ``D`` is the Hamming distance at the finest stage each result reached (Sec. 3.1); ``I`` the stored
        ids. ``thresholds`` overrides the attribute for this call; ``threads`` the default number of
        threads (``ctfreid.search.parallel.set_num_threads``) over which a batch of queries is split (fewer
        when the batch times the gallery is too little work for them: ``parallel.MIN_WORK_PER_THREAD``).
        ``query_weights``: ``uint8 [nq, L1]`` bit weights of the shortest code for a weighted stage 1
        (``ctfreid.search.asymmetric``; the first threshold is then a weighted distance), or ``{length:
        uint8 [nq, length]}`` weighting any stages (their thresholds and distances are weighted; the default
        ``weighted_thresholds`` serve weights of exactly ``weighting``'s lengths,
        ``weighting.query_weights(values, later_values)``). 1-D query codes give 1-D results.
        """
        k = check_k(k)
        q, single = self._queries(query_codes)
        if q.first.shape[0] == 1 and len(self._lengths) > 1:  # one query of several lengths: its own short path
            if threads is not None:
                check_threads(threads)
            out = self._search_one(q, k, thresholds, query_weights)
            if out is not None:
                return out if single else (out[0][None], out[1][None])
        D, _, I = self._run(q, k, thresholds, threads, query_weights=query_weights)[:3]
        return (D[0], I[0]) if single else (D, I)

    def _search_one(self, q: _Queries, k: int, thresholds: Mapping[int, int] | None,
                    query_weights: np.ndarray | None) -> tuple | None:
        """``search`` of one query of several lengths: ``_run`` and ``_positions`` cut to that case, where a
        search's Python took three times its kernel's time (2,276 items: 38 us a search, 8 in the kernel). It runs
        on the calling thread, as ``run_chunks`` runs one query. ``(D[m], I[m])``, or None for an empty index (the
        general path's answer)."""
        sw = stage_weights(query_weights, 1, self._lengths)
        with self._lock.read():
            thr = self._thresholds(thresholds, sw)
            m = min(k, self.ntotal)
            if m == 0:
                return None
            D = np.empty((1, m), np.int32)
            P = np.empty((1, m), np.int64)
            C = np.zeros((1, len(self._lengths)), np.int64)  # stage counts: not returned, read by _note_batch_keep
            self._ctf_topk(q, m, thr, sw, D, P, C)
            return D[0], self._slot_ids(P[0])

    def search_hits(self, query_codes: Mapping[int, np.ndarray], k: int,
                    thresholds: Mapping[int, int] | None = None, threads: int | None = None,
                    query_weights: np.ndarray | None = None) -> Hits:
        """First ``k`` results with their coarse-to-fine sort key (``ctfreid.search.merge.Hits``): ids,
        the number of stages each hit was ranked with, and its distance at each length up to the finest
        it reached, and per query the number of items ranked at each stage (``candidates``). Same order as
        ``search``; ``merge_hits`` of several indexes' hits equals the hits of one index over their union.
        ``query_weights``: as for ``search`` (the key's distances at weighted lengths are weighted). 1-D query
        codes are treated as one query (results stay 2-D)."""
        k = check_k(k)
        q, _ = self._queries(query_codes)
        out = self._run(q, k, thresholds, threads, keys=True, query_weights=query_weights)
        if out[1].shape[1] == 0:
            return dataclasses.replace(empty_hits(q.first.shape[0], self._lengths), candidates=out[3])
        _, _, ids, counts, dist, stages = out
        return Hits(ids, stages, dist, tuple(self._lengths), counts)

    def range_search(self, query_codes: Mapping[int, np.ndarray], radius: int,
                     thresholds: Mapping[int, int] | None = None,
                     query_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss's ``lims, D, I = index.range_search(q, radius)`` for coarse-to-fine search: per query, the
        items that pass every stage's threshold (Sec. 3.1) and lie within ``radius`` at the longest length
        (with one code length: the items within ``radius``), in ranking order (longest-length distance,
        then the shorter ones, then insertion order). ``query_weights``: weighted stages, as for ``search``
        (``radius`` then bounds the longest length's weighted distance when that length is weighted).

        Returns ``lims int64[nq + 1]``, ``D int32[lims[-1]]`` (longest-length distances) and ``I
        int64[lims[-1]]`` (ids): query ``i``'s results are ``D[lims[i]:lims[i + 1]]``, ``I[...]``.
        """
        radius = check_radius(radius)
        q, _ = self._queries(query_codes)
        nq = q.first.shape[0]
        with self._lock.read():  # one state for both kernel calls (the lock is not re-entrant: no _run here)
            S = len(self._lengths)
            if not self.ntotal:
                return range_result(np.zeros((nq, 0), bool), np.empty((nq, 0), np.int32), np.empty((nq, 0), np.int64))
            sw = stage_weights(query_weights, nq, self._lengths)
            thr = self._thresholds(thresholds, sw)
            if S == 1:
                D, P, _ = self._positions(q, None, thr, sw)  # the full ranking, distances ascending
                last = np.full(nq, D.shape[1], np.int64)
            else:
                # the items that pass every threshold lead each ranking, by their longest-length distance:
                # the kernels count them (the same for any k), then a top-k of that many returns them
                last = self._positions(q, 1, thr, sw)[2][:, S - 1]
                D, P, _ = self._positions(q, max(1, int(last.max())), thr, sw)
            keep = (np.arange(D.shape[1]) < last[:, None]) & (D <= radius)
            return range_result(keep, D, self._ids[P])

    def rank(self, query_codes: Mapping[int, np.ndarray], thresholds: Mapping[int, int] | None = None,
             threads: int | None = None, query_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Full coarse-to-fine rankings ``(D int32[nq, ntotal], I int64[nq, ntotal])`` (for evaluation);
        ``query_weights`` as for ``search``."""
        q, single = self._queries(query_codes)
        D, _, I = self._run(q, None, thresholds, threads, query_weights=query_weights)[:3]
        return (D[0], I[0]) if single else (D, I)

    # ------------------------------------------------------------------------------- save / load / bytes
    def _header(self) -> tuple[dict, list[tuple[str, np.ndarray]]]:
        n = self._nslots
        arrays = [(f"codes_{L}", self._codes[L][:n]) for L in self.lengths] + [("ids", self._ids[:n])]
        thresholds = {str(int(L)): int(t) for L, t in self.thresholds.items()} if self.thresholds else {}
        header = {
            "format": "ctfreid.CtFIndex",
            "lengths": self.lengths,
            "ntotal": n,
            "default_ids": self._default_ids,
            "next_id": self._next_id,
            "thresholds": thresholds,
            **({"weights": self.weighting.to_dict(), "weighted_thresholds": None if self.weighted_thresholds is None
                else {str(int(L)): int(t) for L, t in self.weighted_thresholds.items()}}
               if self.weighting is not None else {}),
            "metadata": self.metadata,
            "arrays": [],
            "file_size": 0,
        }
        return header, arrays

    def _write(self, f: BinaryIO) -> None:
        """The file format onto ``f`` (compacting first, so that removed items leave no bytes)."""
        if not isinstance(self.metadata, dict):
            raise CtfreidError(f"index metadata must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as e:
            raise CtfreidError(f"index metadata must be JSON-serialisable: {e}") from None
        if self.weighting is not None and not isinstance(self.weighting, Weighting):
            raise CtfreidError(f"index weighting must be a Weighting or None, got {type(self.weighting).__name__}")
        if self.weighted_thresholds is not None and self.weighting is None:
            raise CtfreidError("index weighted_thresholds need index.weighting (their Weighting)")
        if self._lengths is not None:  # the file holds ints: 9.5 would come back as 9
            if self.thresholds:
                check_thresholds(self.thresholds, self._lengths)
            if self.weighted_thresholds is not None:
                check_thresholds(self.weighted_thresholds, self._lengths,
                                 maxima=weighted_maxima(self.weighting, self._lengths))
        while True:
            with self._lock.read():
                # written under the same read lock that saw no removed slot: a removal that slips in after
                # a compaction sends us round again instead of writing its item's id as a live one
                if not self._ndead:
                    self._write_locked(f)
                    return
            with self._writing:
                self._compact()

    def _write_locked(self, f: BinaryIO) -> None:
        """The file format onto ``f``; read lock held and no removed slot."""
        header, arrays = self._header()
        # offsets depend on the header size, which depends on the offsets: iterate until stable
        size = 0
        for _ in range(10):
            header["arrays"] = []
            off = _align(_PREFIX.size + size)
            for name, arr in arrays:
                header["arrays"].append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": off})
                off = _align(off + arr.nbytes)
            header["file_size"] = off + _CRC.size
            blob = json.dumps(header, sort_keys=True).encode()
            if len(blob) == size:
                break
            size = len(blob)
        crc = 0

        def put(data) -> None:
            nonlocal crc
            mv = memoryview(data).cast("B")
            crc = zlib.crc32(mv, crc)
            f.write(mv)

        put(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob)
        pos = _PREFIX.size + len(blob)
        for (name, arr), info in zip(arrays, header["arrays"]):
            put(b"\0" * (info["offset"] - pos))
            step = max(1, _CHUNK // max(1, arr[:1].nbytes))  # rows per write
            for start in range(0, arr.shape[0], step):
                put(np.ascontiguousarray(arr[start : start + step]))
            pos = info["offset"] + arr.nbytes
        put(b"\0" * (header["file_size"] - _CRC.size - pos))
        f.write(_CRC.pack(crc))

    def save(self, path: str | bytes | os.PathLike) -> None:
        """Write the index to ``path`` atomically (format in the module docstring)."""
        with atomic_write(_file_path(path, "save index to")) as f:
            self._write(f)

    def to_bytes(self) -> bytes:
        """The index in the file format (checksummed), e.g. to send it to another process."""
        buf = io.BytesIO()
        self._write(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "CtFIndex":
        """An index from ``to_bytes`` output; the checksum is verified."""
        mv = memoryview(data).cast("B")
        buf = _empty_aligned((mv.nbytes,), np.uint8)  # kernels read aligned words
        buf[:] = np.frombuffer(mv, np.uint8)
        return cls._parse(buf, "index bytes")

    def __getstate__(self) -> dict:
        return {"bytes": self.to_bytes()}  # locks and search scratch are not state

    def __setstate__(self, state: dict) -> None:
        other = CtFIndex.from_bytes(state["bytes"])
        self.__dict__.update(other.__dict__)

    @classmethod
    def load(cls, path: str | bytes | os.PathLike, mmap: bool = True) -> "CtFIndex":
        """Read an index written by ``save``; ``mmap=True`` maps the arrays read-only.

        The file is opened once: the checksum is verified and every array is read or mapped from that one
        descriptor. Raises ``FileNotFoundError`` if ``path`` does not exist and ``CtfreidError`` naming the
        file if it is not a regular file, not a ctfreid index, newer than this version, truncated or damaged.
        """
        path = _file_path(path, "load index")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"index file {path} does not exist") from None
        except IsADirectoryError:
            raise CtfreidError(f"cannot load index {path}: it is a directory, not an index file") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise CtfreidError(f"cannot load index {path}: it is a directory, not an index file")
            if not stat.S_ISREG(st.st_mode):
                raise CtfreidError(f"cannot load index {path}: not a regular file (a device, FIFO or socket)")
            size = st.st_size
            if size < _PREFIX.size + _CRC.size:
                with os.fdopen(os.dup(fd), "rb") as f:
                    head = f.read(8)
                raise CtfreidError(f"cannot load index {path}: "
                                   + ("file is truncated" if head and MAGIC.startswith(head) else
                                      "not a ctfreid index file (wrong magic bytes)"))
            if mmap:
                buf = np.frombuffer(_mmap.mmap(fd, size, access=_mmap.ACCESS_READ), np.uint8)
            else:
                buf = _empty_aligned((size,), np.uint8)
                mv, got = memoryview(buf), 0
                while got < size:
                    r = os.preadv(fd, [mv[got:]], got)
                    if r <= 0:
                        break
                    got += r
                buf = buf[:got]
        finally:
            os.close(fd)
        return cls._parse(buf, str(path))

    @classmethod
    def _parse(cls, buf: np.ndarray, name: str) -> "CtFIndex":
        """An index over the bytes ``buf`` (uint8, 64-byte aligned, or a read-only map): every check of
        the format first, then array views into ``buf``."""
        size = buf.shape[0]

        def bad(what: str) -> CtfreidError:
            return CtfreidError(f"cannot load index {name}: {what}")

        if size < _PREFIX.size or bytes(buf[:8]) != MAGIC:
            raise bad("file is truncated" if size < 8 and MAGIC.startswith(bytes(buf[:size])) and size
                      else "not a ctfreid index file (wrong magic bytes)")
        _, version, hsize = _PREFIX.unpack(bytes(buf[: _PREFIX.size]))
        if version > FORMAT_VERSION:
            raise bad(f"written in format version {version}, this ctfreid reads up to version {FORMAT_VERSION}")
        if version < 1 or _PREFIX.size + hsize + _CRC.size > size:
            raise bad("file is truncated or damaged (header does not fit)")
        blob = bytes(buf[_PREFIX.size : _PREFIX.size + hsize])
        try:
            header = json.loads(blob.decode())
            lengths = [int(L) for L in header["lengths"]]
            n = int(header["ntotal"])
            expect = int(header["file_size"])
            arrays = {a["name"]: a for a in header["arrays"]}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise bad("file is damaged (unreadable header)") from None
        if size < expect:
            raise bad(f"file is truncated ({size} bytes, expected {expect})")
        if size != expect:
            raise bad(f"file is damaged ({size} bytes, expected {expect})")
        crc = 0
        for start in range(0, size - _CRC.size, _CHUNK):  # verify before trusting any byte of the payload
            crc = zlib.crc32(buf[start : min(start + _CHUNK, size - _CRC.size)], crc)
        (stored,) = _CRC.unpack(bytes(buf[size - _CRC.size :]))
        if crc != stored:
            raise bad("checksum mismatch: the file is damaged")
        index = cls()
        try:
            # the kernels take the lengths shortest first, each once (a CtfreidError is a ValueError)
            if [check_length(L) for L in lengths] != sorted(set(lengths)) or (n and not lengths):
                raise ValueError("lengths")
            index.metadata = dict(header.get("metadata") or {})
            def thresholds_of(key: str) -> dict[int, int]:
                return {int(L): int(t) for L, t in sorted(dict(header.get(key) or {}).items(), key=lambda x: int(x[0]))}

            index.thresholds = thresholds_of("thresholds")
            if header.get("weights") is not None:
                index.weighting = Weighting.from_dict(header["weights"], f"{name}: weights")
                if "weighted_thresholds" in header:
                    if header["weighted_thresholds"] is not None:
                        index.weighted_thresholds = thresholds_of("weighted_thresholds")
                else:  # written before an index kept both: its only thresholds were the weighted ones
                    index.weighted_thresholds, index.thresholds = index.thresholds, {}
            specs = [(f"codes_{L}", (n, L // 8), np.uint8) for L in lengths] + [("ids", (n,), np.int64)]
            loaded = {}
            end = _PREFIX.size + hsize  # arrays follow the header and each other without overlapping
            for aname, shape, dtype in specs:
                info = arrays[aname]
                if tuple(info["shape"]) != shape or np.dtype(info["dtype"]) != np.dtype(dtype):
                    raise ValueError(aname)
                off = int(info["offset"])
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if off % _ALIGN or off < end or off + nbytes > size - _CRC.size:
                    raise ValueError(aname)
                end = off + nbytes
                loaded[aname] = buf[off : off + nbytes].view(dtype).reshape(shape)
            ids = loaded["ids"]
            if n and (int(ids.min()) < 0 or (n > 1 and len(np.unique(ids)) != n)):
                raise ValueError("ids")
            default_ids = header.get("default_ids")
            least = int(ids.max()) + 1 if n else 0  # a default id below it would be given twice
            next_id = int(header.get("next_id", least))
            if not isinstance(default_ids, (bool, type(None))) or next_id < least:
                raise ValueError("next_id")
        except (ValueError, KeyError, TypeError):
            raise bad("file is damaged (inconsistent header)") from None
        if lengths:
            index._lengths = lengths
        index._codes = {L: loaded[f"codes_{L}"] for L in lengths}
        index._ids = loaded["ids"]
        index._nslots = n
        index._live = _kernels.all_live(n)
        if lengths:
            index._planes = index._planes_for(index._codes[lengths[0]])
        index._default_ids = default_ids
        index._next_id = next_id
        index._increasing = bool(n <= 1 or (np.diff(ids) > 0).all())
        return index
