"""``CtFIndex``: a faiss-style index for coarse-to-fine search over multi-length binary codes (Sec. 3.1).

    index = CtFIndex()
    index.add({32: c32, 128: c128, 512: c512, 2048: c2048})   # lengths fixed by the first add
    index.thresholds = {32: 9, 128: 41, 512: 190}               # e.g. from DTO (Sec. 3.3)
    D, I = index.search(query_codes, k=100)                     # int32 / int64 [nq, k]
    index.save("gallery.ctf"); index = CtFIndex.load("gallery.ctf", mmap=True)

Results are exactly those of ``ctf_search`` / ``ctf_rank`` (``I`` holds the stored ids, -1 padding). An
index with a single length is a plain Hamming index (no thresholds).

File format (version 1, little-endian)::

    b"CTFREID\\0" | uint32 version | uint32 header size | header (UTF-8 JSON) | arrays | uint32 crc32

The JSON header holds ``lengths``, ``ntotal``, ``thresholds``, ``metadata``, ``file_size`` and, per array
(``codes_<L>`` uint8 [n, L // 8] and ``ids`` int64 [n]), its dtype, shape and offset; arrays start at
64-byte aligned offsets so they can be memory-mapped. The trailing CRC-32 covers every byte before it.
``load`` checks the magic, the version, the header, the file size and the checksum before returning, so
a truncated or damaged file raises ``ValueError`` naming the file and the problem and never yields wrong
results. With ``mmap=True`` the checksum is still verified (one sequential read of the file, ~1 s per
GB): correctness beats load time; the arrays are then read-only memory maps, and ``add`` copies them into
memory first (copy on write). ``save`` is atomic: a crash mid-save leaves any previous file intact.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.codes import check_code_set
from ctfreid.errors import CtfreidError
from ctfreid.search import _kernels
from ctfreid.search.hamming import check_k, prepare_queries
from ctfreid.search.thresholds import threshold_array

MAGIC = b"CTFREID\x00"
FORMAT_VERSION = 1
_ALIGN = 64
_PREFIX = struct.Struct("<8sII")  # magic, version, header size
_CRC = struct.Struct("<I")
_CHUNK = 16 << 20


def _align(x: int) -> int:
    return -(-x // _ALIGN) * _ALIGN


def _empty_aligned(shape: tuple, dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary, so that 512- and 2048-bit codes do not
    straddle an extra cache line (fewer memory reads when gathering candidates)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = -raw.ctypes.data % _ALIGN
    return raw[off : off + nbytes].view(dtype).reshape(shape)


class CtFIndex:
    """Coarse-to-fine index over ``{length: packed codes}`` code sets with int64 ids (faiss-style).

    Attributes: ``thresholds`` (dict length -> int for every length but the longest; checked when
    searching), ``metadata`` (JSON-serialisable dict saved with the index), ``ntotal``, ``lengths``.
    """

    def __init__(self) -> None:
        self.thresholds: dict[int, int] = {}
        self.metadata: dict[str, Any] = {}
        self._lengths: list[int] | None = None
        self._codes: dict[int, np.ndarray] = {}  # capacity-sized buffers (or read-only memory maps)
        self._ids: np.ndarray = np.empty(0, np.int64)
        self._ntotal = 0
        self._default_ids: bool | None = None  # fixed by the first add
        self._local = threading.local()  # per-thread search scratch (no page faults on reuse)
        self._views: tuple | None = None

    # ---------------------------------------------------------------------------------------- state
    @property
    def ntotal(self) -> int:
        """Number of stored codes."""
        return self._ntotal

    @property
    def lengths(self) -> list[int]:
        """Code lengths (bits), shortest first; empty before the first ``add``."""
        return list(self._lengths or [])

    def __repr__(self) -> str:
        return f"CtFIndex(lengths={self.lengths}, ntotal={self._ntotal}, thresholds={self.thresholds})"

    def _gallery(self, length: int) -> np.ndarray:
        return self._codes[length][: self._ntotal]

    def codes(self, length: int) -> np.ndarray:
        """The stored ``length``-bit codes, ``uint8[ntotal, length // 8]`` in insertion order (read-only view)."""
        if length not in (self._lengths or []):
            raise CtfreidError(f"this index holds code lengths {self.lengths}, not {length!r}")
        view = self._gallery(length).view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, ``int64[ntotal]`` in insertion order (read-only view)."""
        view = self._ids[: self._ntotal].view() if self._ids is not None else np.empty(0, np.int64)
        view.flags.writeable = False
        return view

    # ------------------------------------------------------------------------------------------ add
    def add(self, codes: Mapping[int, np.ndarray], ids: np.ndarray | None = None) -> None:
        """Append a code set ``{length: uint8[n, length // 8]}``; ``ids`` int64 [n] or None for
        ``ntotal .. ntotal + n - 1``. The first ``add`` fixes the lengths and whether ids are given."""
        cs = check_code_set(codes, "codes")
        lengths = list(cs)
        if self._lengths is None:
            self._lengths = lengths
        elif lengths != self._lengths:
            raise CtfreidError(f"codes have lengths {lengths} but the index holds lengths {self._lengths}")
        n = next(iter(cs.values())).shape[0]
        given = ids is not None
        if self._default_ids is not None and self._default_ids == given:
            raise CtfreidError(
                "ids must be given on every add or on none: the index was built "
                + ("with default ids (ntotal, ntotal + 1, ...)" if self._default_ids else "with explicit ids")
            )
        if given:
            ids_arr = np.asarray(ids)
            if ids_arr.ndim != 1 or ids_arr.shape[0] != n or not np.issubdtype(ids_arr.dtype, np.integer):
                raise CtfreidError(f"ids must be a 1-D integer array of length {n}, got {ids_arr.dtype} {ids_arr.shape}")
            ids_arr = ids_arr.astype(np.int64)
        else:
            ids_arr = np.arange(self._ntotal, self._ntotal + n, dtype=np.int64)
        if n == 0:
            self._default_ids = not given
            return
        new_total = self._ntotal + n
        for L, arr in cs.items():
            self._codes[L] = self._grow(self._codes.get(L), new_total, (L // 8,), np.uint8)
            self._codes[L][self._ntotal : new_total] = arr
        self._ids = self._grow(self._ids, new_total, (), np.int64)
        self._ids[self._ntotal : new_total] = ids_arr
        self._ntotal = new_total
        self._default_ids = not given
        self._views = None

    def _grow(self, buf: np.ndarray | None, need: int, row: tuple, dtype) -> np.ndarray:
        """A writable buffer with room for ``need`` rows holding the current rows (amortised doubling;
        memory-mapped arrays are copied into memory here)."""
        if buf is not None and buf.shape[0] >= need and buf.flags.writeable and not isinstance(buf, np.memmap):
            return buf
        cap = max(need, 2 * self._ntotal, 1024)
        new = _empty_aligned((cap,) + row, dtype)
        if buf is not None and self._ntotal:
            new[: self._ntotal] = buf[: self._ntotal]
        return new

    # --------------------------------------------------------------------------------------- search
    def _queries(self, query_codes: Mapping[int, np.ndarray]) -> tuple[tuple[np.ndarray, ...], bool]:
        """Validated 2-D query codes per length (shortest first) and whether the queries were 1-D."""
        if self._ntotal == 0 or self._lengths is None:
            raise CtfreidError("the index is empty: add codes before searching")
        if not isinstance(query_codes, Mapping):
            raise CtfreidError(f"query_codes must be a dict {{length: uint8 codes}}, got {type(query_codes).__name__}")
        try:
            arrays = [query_codes[L] for L in self._lengths]
        except KeyError:
            arrays = None
        if arrays is None or len(query_codes) != len(self._lengths):
            keys = sorted(query_codes)
            raise CtfreidError(f"query_codes have code lengths {keys} but the index holds {self._lengths}")
        single = all(isinstance(v, np.ndarray) and v.ndim == 1 for v in arrays)
        qs = []
        for L, v in zip(self._lengths, arrays):
            if single:
                v = v[None, :]
            if not (  # fast path for the common, valid case; prepare_queries explains any problem
                type(v) is np.ndarray and v.dtype == np.uint8 and v.ndim == 2 and v.shape[1] == L // 8
                and v.flags.c_contiguous and (qs or v.ctypes.data % 8 == 0)  # later stages are copied
            ):
                v, _ = prepare_queries(v, L // 8, f"query_codes[{L}]")
            q = v
            if qs and q.shape[0] != qs[0].shape[0]:
                raise CtfreidError(f"query_codes[{L}] has {q.shape[0]} rows but the shorter codes have {qs[0].shape[0]}")
            qs.append(q)
        return tuple(qs), single

    def _stage_views(self) -> tuple:
        """Stage-1 codes, later-stage word views, lengths and query offsets (cached until the next add)."""
        if self._views is None:
            gs = [self._gallery(L) for L in self._lengths]
            Gr = tuple(_kernels.words64(g) for g in gs[1:]) + _kernels.stage_pad(len(gs) - 1)
            Ls = np.array(self._lengths, dtype=np.int64)
            self._views = (gs[0], Gr, Ls, _kernels.stage_offsets(self._lengths))
        return self._views

    def _thresholds(self) -> np.ndarray:
        """``thresholds`` validated (re-checked only when the dict's contents change)."""
        key = tuple(self.thresholds.items()) if isinstance(self.thresholds, dict) else None
        cached = getattr(self, "_thr_cache", None)
        if key is None or cached is None or cached[0] != (key, tuple(self._lengths)):
            thr = threshold_array(self.thresholds, self._lengths)
            if key is None:
                return thr
            self._thr_cache = cached = ((key, tuple(self._lengths)), thr)
        return cached[1]

    def _run(self, qs: tuple[np.ndarray, ...], k: int | None) -> tuple[np.ndarray, np.ndarray]:
        n, nq = self._ntotal, qs[0].shape[0]
        lengths = self._lengths
        m = n if k is None else k
        D = np.empty((nq, m), np.int32)
        I = np.empty((nq, m), np.int64)
        G1, Gr, Ls, qoff = self._stage_views()
        if len(lengths) == 1:
            if k is None:
                _kernels.rank(_kernels.words(qs[0]), _kernels.words(G1), lengths[0], D, I)
            else:
                _kernels.topk(_kernels.words(qs[0]), _kernels.words(G1), lengths[0], k, D, I)
        else:
            Qr = _kernels.later_queries(qs, qoff)
            args = (_kernels.words32(qs[0]), _kernels.words32(G1), lengths[0], Qr, qoff, Gr, Ls, len(lengths),
                    self._thresholds())
            if k is None:
                _kernels.ctf_rank(*args, D, I)
            else:
                _kernels.ctf_topk(*args, k, *self._workspace(n, k), D, I)
        if not self._default_ids:
            valid = I >= 0
            I[valid] = self._ids[I[valid]]
        return D, I

    def _workspace(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """CtF scratch, one per thread, reused while (n, k, number of stages) stay the same."""
        ws = getattr(self._local, "ws", None)
        key = (n, min(k, n), len(self._lengths))
        if ws is None or ws[0] != key:
            ws = (key, _kernels.ctf_workspace(n, k, len(self._lengths)))
            self._local.ws = ws
        return ws[1]

    def search(self, query_codes: Mapping[int, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """First ``k`` results of the coarse-to-fine ranking: ``(D int32[nq, k], I int64[nq, k])``.

        ``D`` is the Hamming distance at the finest stage each result reached; ``I`` the stored ids;
        padded with -1 / int32 max when ``k > ntotal``. 1-D query codes give 1-D results.
        """
        k = check_k(k)
        qs, single = self._queries(query_codes)
        D, I = self._run(qs, k)
        return (D[0], I[0]) if single else (D, I)

    def rank(self, query_codes: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Full coarse-to-fine rankings ``(D int32[nq, ntotal], I int64[nq, ntotal])`` (for evaluation)."""
        qs, single = self._queries(query_codes)
        D, I = self._run(qs, None)
        return (D[0], I[0]) if single else (D, I)

    # ------------------------------------------------------------------------------------ save/load
    def _header(self) -> tuple[dict, list[tuple[str, np.ndarray]]]:
        arrays = [(f"codes_{L}", self._gallery(L)) for L in self.lengths] + [("ids", self._ids[: self._ntotal])]
        thresholds = {str(int(L)): int(t) for L, t in self.thresholds.items()} if self.thresholds else {}
        header = {
            "format": "ctfreid.CtFIndex",
            "lengths": self.lengths,
            "ntotal": self._ntotal,
            "default_ids": self._default_ids,
            "thresholds": thresholds,
            "metadata": self.metadata,
            "arrays": [],
            "file_size": 0,
        }
        return header, arrays

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (format in the module docstring)."""
        path = Path(path)
        header, arrays = self._header()
        try:
            json.dumps(header["metadata"])
        except (TypeError, ValueError) as e:
            raise CtfreidError(f"index metadata must be JSON-serialisable: {e}") from None
        if not isinstance(header["metadata"], dict):
            raise CtfreidError(f"index metadata must be a dict, got {type(header['metadata']).__name__}")
        # offsets depend on the header size, which depends on the offsets: iterate until stable
        size = 0
        for _ in range(10):
            header["arrays"] = []
            off = _align(_PREFIX.size + size)
            for name, arr in arrays:
                header["arrays"].append(
                    {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": off}
                )
                off = _align(off + arr.nbytes)
            header["file_size"] = off + _CRC.size
            blob = json.dumps(header, sort_keys=True).encode()
            if len(blob) == size:
                break
            size = len(blob)
        crc = 0
        with atomic_write(path) as f:

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

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "CtFIndex":
        """Read an index written by ``save``; ``mmap=True`` maps the code arrays read-only.

        Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` naming the file if it
        is not a ctfreid index, was written by a newer format version, is truncated or is damaged.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index file {path} does not exist")
        size = path.stat().st_size

        def bad(what: str) -> ValueError:
            return CtfreidError(f"cannot load index {path}: {what}")

        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                raise bad("not a ctfreid index file (wrong magic bytes)")
            _, version, hsize = _PREFIX.unpack(prefix)
            if version > FORMAT_VERSION:
                raise bad(f"written in format version {version}, this ctfreid reads up to version {FORMAT_VERSION}")
            if version < 1 or _PREFIX.size + hsize + _CRC.size > size:
                raise bad("file is truncated or damaged (header does not fit)")
            blob = f.read(hsize)
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
            # verify the checksum before trusting any byte of the payload
            crc = zlib.crc32(prefix + blob)
            buf = bytearray(min(_CHUNK, size))
            left = size - _CRC.size - _PREFIX.size - hsize
            mv = memoryview(buf)
            while left > 0:
                got = f.readinto(mv[: min(len(buf), left)])
                if not got:
                    raise bad("file is truncated")
                crc = zlib.crc32(mv[:got], crc)
                left -= got
            (stored,) = _CRC.unpack(f.read(_CRC.size))
            if crc != stored:
                raise bad("checksum mismatch: the file is damaged")
        index = cls()
        try:
            index.metadata = dict(header.get("metadata") or {})
            index.thresholds = {int(L): int(t) for L, t in sorted((header.get("thresholds") or {}).items(), key=lambda x: int(x[0]))}
            specs = [(f"codes_{L}", (n, L // 8), np.uint8) for L in lengths] + [("ids", (n,), np.int64)]
            loaded = {}
            for name, shape, dtype in specs:
                info = arrays[name]
                if tuple(info["shape"]) != shape or np.dtype(info["dtype"]) != np.dtype(dtype):
                    raise CtfreidError(name)
                off = int(info["offset"])
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if off % _ALIGN or off + nbytes > size - _CRC.size:
                    raise CtfreidError(name)
                if nbytes == 0:
                    loaded[name] = np.empty(shape, dtype)
                elif mmap:
                    loaded[name] = np.memmap(path, dtype=dtype, mode="r", offset=off, shape=shape)
                else:
                    arr = _empty_aligned(shape, dtype)
                    with open(path, "rb") as f:
                        f.seek(off)
                        if f.readinto(memoryview(arr).cast("B")) != nbytes:
                            raise CtfreidError(name)
                    loaded[name] = arr
        except (ValueError, KeyError, TypeError):
            raise bad("file is damaged (inconsistent header)") from None
        if lengths:
            index._lengths = lengths
        index._codes = {L: loaded[f"codes_{L}"] for L in lengths}
        index._ids = loaded["ids"]
        index._ntotal = n
        index._default_ids = header.get("default_ids")
        return index
