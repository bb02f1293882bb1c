"""Image galleries: a :class:`~ctfreid.search.index.CtFIndex` of a folder of person crops, built, extended
and searched with the model that encoded it (used by ``ctfreid index``, ``ctfreid search`` and the demo).

An image index is a ``CtFIndex`` whose ``metadata`` holds::

    {"format": "ctfreid-image-index/1",
     "model": {"fingerprint", "file", "lengths", "backbone", "height", "width", "flip"},
     "paths": [...], "pids": [...], "camids": [...],      # one entry per indexed image, in id order
     "thresholds_source": "..."}

An index built with weighted thresholds (``ctfreid calibrate --weighted``) keeps their ``Weighting``
(``index.weighting``), and its searches weight each query's shortest code by it (:func:`search_images`).

``pids`` / ``camids`` come from Market-1501 style names (``0002_c1s1_000451_03.jpg``) when they parse,
else -1 (unknown). Ids are positions 0..n-1 in these lists. ``flip`` records whether the images were
encoded with the flip test; adding and searching encode the same way, since flipped and plain codes of
one image differ. The fingerprint (:func:`ctfreid.learn.run_dir.model_fingerprint`) makes an index refuse
codes of another model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctfreid.data.datasets import IMAGE_EXTENSIONS, is_image_name, parse_name
from ctfreid.errors import CtfreidError

if TYPE_CHECKING:
    from ctfreid.search.asymmetric import WeightedFit

META_FORMAT = "ctfreid-image-index/1"


def folder_records(folder: str | os.PathLike, label: str = "--images",
                   recursive: bool = False) -> list[tuple[str, int, int]]:
    """``(absolute path, pid, camid)`` of every image in ``folder`` (sorted by name); pid/camid from
    Market-1501 style names, -1 when the name does not parse."""
    folder = Path(folder)
    if not folder.is_dir():
        what = ("does not exist" if not folder.exists() else "is a file, not a folder" if folder.is_file()
                else "is not a folder (a device, FIFO or socket)")
        raise FileNotFoundError(f"{label} {folder} {what}: expected a folder of person crops (.jpg, .png...)")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and is_image_name(p.name))
    if not files:
        raise CtfreidError(f"{label} {folder} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    records = []
    for p in files:
        parsed = parse_name(p.name)
        pid, camid = parsed if parsed is not None else (-1, -1)
        records.append((str(p.resolve()), pid, camid))
    return records


def resolve_thresholds(encoder, spec: str | None = None, beta: float | None = None, batch_size: int = 64,
                       progress: bool = False, fit: Callable | None = None) -> tuple[dict[int, int], str, WeightedFit | None]:
    """CtF thresholds for ``encoder`` (``ctfreid.infer.encoder.load_encoder``: a run or its ONNX export), a
    sentence saying where they come from, and the weighted stage 1 fitted beside them (a
    ``ctfreid.search.asymmetric.WeightedFit``, the default for queries with real values) or None: ``spec``
    (``32=9,...`` or a calibrate .json), else ``beta`` (DTO on the run's validation split, Sec. 3.3), else
    the thresholds stored with the model, else ``fit(val)`` on the run's validation split (an
    ``EncodedSet``; it returns ``(thresholds, source, weighted)``: ``ctfreid index build`` passes the
    targeted fits of ``ctfreid.eval.calibration``, which this layer may not import), else DTO with beta 2.
    A file with only a weighted fit (an older ``calibrate --weighted``) gives no Hamming thresholds (``{}``)."""
    from ctfreid.search.asymmetric import WeightedFit
    from ctfreid.search.thresholds import check_thresholds, read_thresholds_file

    lengths = sorted(encoder.lengths)
    if len(lengths) == 1:
        return {}, "one code length: no thresholds needed", None

    def checked(weighted: WeightedFit | None) -> WeightedFit | None:
        return None if weighted is None else WeightedFit(
            check_thresholds(weighted.thresholds, lengths, maxima=weighted.weighting.maxima(lengths[0])),
            weighted.weighting)

    if spec is not None:  # an empty spec is refused by read_thresholds_file, not skipped
        fits = read_thresholds_file(spec)
        th = check_thresholds(fits.hamming, lengths) if fits.hamming is not None else {}
        return th, f"--thresholds {spec}", checked(fits.weighted_fit)
    if beta is None and encoder.thresholds:
        return (check_thresholds(encoder.thresholds, lengths), f"stored with {encoder.thresholds_source}",
                checked(getattr(encoder, "weighted", None)))
    from ctfreid.data.datasets import split_records
    from ctfreid.search.thresholds import fit_thresholds

    val = encoder.encode_records(split_records("val", dict(encoder.info)), batch_size=batch_size, progress=progress)
    if beta is None and fit is not None:
        th, source, weighted = fit(val)
        return check_thresholds(th, lengths), source, checked(weighted)
    beta = 2.0 if beta is None else beta
    th = fit_thresholds(val.codes, val.pids, val.camids, beta=beta)
    return th, f"DTO beta={beta:g} on the run's {len(val)} validation images", None


def index_flip(index) -> bool:
    """Whether the images of ``index`` were encoded with the flip test (queries must be too)."""
    return bool(((index.metadata or {}).get("model") or {}).get("flip", False))


def _model_meta(fingerprint: str, info: Mapping, flip: bool = False) -> dict:
    cfg = info.get("model_config") or {}
    return {"fingerprint": fingerprint, "file": str(info.get("file")), "lengths": sorted(cfg.get("lengths", [])),
            "backbone": cfg.get("backbone"), "height": info.get("height"), "width": info.get("width"),
            "flip": bool(flip)}


def build_index(encoded, thresholds: Mapping[int, int], fingerprint: str, info: Mapping,
                extra: Mapping | None = None, flip: bool = False, weighted=None):
    """A :class:`ctfreid.search.index.CtFIndex` of ``encoded`` (an ``EncodedSet`` with paths) with the metadata
    above; ``weighted``: the ``WeightedFit`` of a weighted stage 1 for queries with real values
    (``index.weighted_thresholds``, ``index.weighting``), or None."""
    from ctfreid.search.index import CtFIndex

    if encoded.paths is None:
        raise CtfreidError("the encoded set has no image paths: an image index needs them")
    index = CtFIndex()
    index.add(encoded.codes)
    index.thresholds = {int(k): int(v) for k, v in thresholds.items()}
    if weighted is not None:
        index.weighted_thresholds = {int(k): int(v) for k, v in weighted.thresholds.items()}
        index.weighting = weighted.weighting
    index.metadata = {
        "format": META_FORMAT,
        "model": _model_meta(fingerprint, info, flip),
        "paths": [str(p) for p in encoded.paths],
        "pids": [int(p) for p in encoded.pids],
        "camids": [int(c) for c in encoded.camids],
        **dict(extra or {}),
    }
    return index


def search_images(index, encoded, k: int):
    """``index.search_hits`` of encoded query images (an ``EncodedSet``): their codes weighted by
    ``index.weighting`` (the shortest, and the later lengths it weights) with ``index.weighted_thresholds``
    when the index has them and the queries have those lengths' values, else Hamming with
    ``index.thresholds``."""
    weights = None
    if index.weighted_thresholds is not None:
        has_values = encoded.values is not None and all(L in encoded.later_values for L in index.weighting.later)
        if has_values or not index.thresholds:
            if not has_values:
                raise CtfreidError("the index has thresholds for weighted stages only: its queries need the "
                                   f"values (bn(v)) of its {index.weighting.stages(index.lengths[0])}, which this "
                                   "encoder did not give")
            weights = index.weighting.query_weights(encoded.values, encoded.later_values)
    return index.search_hits(encoded.codes, k, query_weights=weights)


def add_to_index(index, encoded) -> None:
    """Append ``encoded`` (same code lengths) to ``index`` and to its path / pid / camid lists."""
    if encoded.paths is None:
        raise CtfreidError("the encoded set has no image paths: an image index needs them")
    meta = dict(index.metadata)
    index.add(encoded.codes)
    meta["paths"] = list(meta["paths"]) + [str(p) for p in encoded.paths]
    meta["pids"] = list(meta["pids"]) + [int(p) for p in encoded.pids]
    meta["camids"] = list(meta["camids"]) + [int(c) for c in encoded.camids]
    index.metadata = meta


def remove_from_index(index, pids: Sequence[int] = (), paths: Sequence[str | os.PathLike] = ()) -> list[int]:
    """Remove the images of persons ``pids`` and the images at ``paths`` from ``index`` (erasure: gone from
    every search, and from the file at its next save, which compacts); their entries in the metadata lists
    become ``null`` / -1 (ids stay positions). Returns the ids removed, sorted; an empty selection removes
    nothing. A path the index does not hold is an error naming it (nothing is removed then)."""
    meta = dict(index.metadata)
    known = {p: i for i, p in enumerate(meta["paths"]) if p is not None}
    ids = set()
    for p in paths:
        key = str(Path(p).resolve())
        if key not in known:
            raise CtfreidError(f"image {p} is not in the index (it holds {len(known)} images; paths are "
                               "compared resolved, as 'index build' stored them)")
        ids.add(known[key])
    wanted = {int(p) for p in pids}
    ids.update(i for i, (p, path) in enumerate(zip(meta["pids"], meta["paths"])) if p in wanted and path is not None)
    gone = sorted(ids)
    if gone:
        index.remove_ids(np.asarray(gone, np.int64))
        for name, blank in (("paths", None), ("pids", -1), ("camids", -1)):
            values = list(meta[name])
            for i in gone:
                values[i] = blank
            meta[name] = values
        index.metadata = meta
    return gone


def check_model(index, index_path: str | os.PathLike, fingerprint: str, info: Mapping) -> None:
    """``ValueError`` unless ``index`` was made by the model with ``fingerprint`` (and its code lengths)."""
    meta = index.metadata or {}
    if meta.get("format") != META_FORMAT or "paths" not in meta:
        raise CtfreidError(f"index {index_path} is not an image index of 'ctfreid index build' "
                         "(no model fingerprint or image paths in its metadata)")
    made_by = meta.get("model", {})
    lengths = sorted((info.get("model_config") or {}).get("lengths", []))
    if made_by.get("fingerprint") != fingerprint or sorted(made_by.get("lengths", [])) != lengths:
        raise CtfreidError(
            f"index {index_path} was built by another model (fingerprint {made_by.get('fingerprint')}, lengths "
            f"{made_by.get('lengths')}, {made_by.get('file')}) than {info.get('file')} (fingerprint {fingerprint}, "
            f"lengths {lengths}): use the model that built it, or rebuild the index with 'ctfreid index build'"
        )


def check_index_file(path: str | os.PathLike) -> None:
    """Refuse an ``--index`` that is not an existing regular file, saying what it is instead."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--index {path}: no such file (build one with 'ctfreid index build')")
    if p.is_dir():
        raise CtfreidError(f"--index {path} is a directory: expected an index file written by 'ctfreid index build'")
    if not p.is_file():
        raise CtfreidError(f"--index {path} is not a regular file (a device, FIFO or socket): expected an index "
                           "file written by 'ctfreid index build'")


def load_index(path: str | os.PathLike, mmap: bool = True):
    """``CtFIndex.load`` with messages naming the option: a missing path, a folder, a device or FIFO."""
    from ctfreid.search.index import CtFIndex

    check_index_file(path)
    return CtFIndex.load(path, mmap=mmap)


@contextlib.contextmanager
def index_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of an index file for a whole read-modify-write (load, add, save), so that
    two writers of one index (two 'ctfreid index add' runs) never lose each other's images: the second
    waits for the first. The lock is ``fcntl.flock`` on ``PATH.lock``, released when the process exits,
    even when killed; the lock file stays beside the index. A symbolic link locks the file it points to,
    so two links to one index exclude each other too."""
    target = Path(os.path.realpath(path))
    lock = target.with_name(target.name + ".lock")
    if not lock.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {lock.parent} does not exist")
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:  # name the user's file, not the lock beside it
        raise type(e)(e.errno, f"cannot lock {path} for writing: its lock file {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def query_records(items: list[str]) -> list[tuple[str, int, int]]:
    """Records of the query arguments: files as given, folders expanded (sorted)."""
    records = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            records += folder_records(p, label="query folder")
        elif p.is_file():
            parsed = parse_name(p.name)
            pid, camid = parsed if parsed is not None else (-1, -1)
            records.append((str(p.resolve()), pid, camid))
        elif p.exists():  # a device or a FIFO: reading it would block or give no picture
            raise CtfreidError(f"query image {item} is not a regular file (a device, FIFO or socket): expected an "
                               "image file or a folder of them")
        else:
            raise FileNotFoundError(f"query image {item} does not exist")
    return records
