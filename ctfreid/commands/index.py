"""``ctfreid index build`` / ``ctfreid index add``: a coarse-to-fine index of a folder of person crops.

The library side of it (used by ``ctfreid search`` and the demo too): :func:`model_fingerprint`,
:func:`folder_records`, :func:`resolve_thresholds`, :func:`build_index`, :func:`add_to_index` and
:func:`check_model`.

An index file is a :class:`ctfreid.index.CtFIndex` whose ``metadata`` holds::

    {"format": "ctfreid-image-index/1",
     "model": {"fingerprint", "file", "lengths", "backbone", "height", "width", "flip"},
     "paths": [...], "pids": [...], "camids": [...],      # one entry per indexed image, in id order
     "thresholds_source": "..."}

``pids`` / ``camids`` come from Market-1501 style names (``0002_c1s1_000451_03.jpg``) when they parse,
else -1 (unknown). Ids are positions 0..n-1 in these lists. ``flip`` records whether the images were
encoded with the flip test (``index build --flip``); ``index add`` and ``ctfreid search`` encode the same
way, since flipped and plain codes of one image differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

META_FORMAT = "ctfreid-image-index/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

HELP = "build or extend a coarse-to-fine index from a folder of images"
DESCRIPTION = """Encode a folder of person crops with a trained AiO model and save a coarse-to-fine (CtF)
index: the multi-length binary codes, the DTO thresholds, the image paths, the person ids parsed from
Market-1501 style names (0002_c1s1_000451_03.jpg; -1 = unknown otherwise) and the model's fingerprint
(a hash of its weights, configuration and code lengths). 'ctfreid search' refuses queries encoded by
another model.

  index build   encode every image in --images and write a new index to --out
  index add     encode the images of --images that the index does not hold yet and append them
                (old images are not re-encoded; the index must come from the same model)

Thresholds of 'index build', first match wins: --thresholds (32=9,128=41,512=190 or a .json from
'ctfreid calibrate'); --beta B (DTO with this beta on the run's validation split); the thresholds stored
in the model file or in RUN_DIR/thresholds.json; else DTO with beta 2 on the run's validation split
(Sec. 3.3 / 4.2: 'ctfreid train --val-fraction 0.4' keeps one).

examples:
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf
  ctfreid index add --index gallery.ctf --model runs/aio --images new_crops/
  ctfreid search --index gallery.ctf --model runs/aio query.jpg --k 10"""

BUILD_DESCRIPTION = """Encode every image of --images with the model of --model and write a new CtF index.

example:
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf --beta 2
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf --flip   # flip test"""

ADD_DESCRIPTION = """Append the images of --images that the index does not hold yet (same path = same image);
only they are encoded. The model must be the one that built the index (same fingerprint).

example:
  ctfreid index add --index gallery.ctf --model runs/aio --images new_crops/"""


# ---------------------------------------------------------------------------------------------- library
def model_fingerprint(model, info: Mapping) -> str:
    """A hex id of a trained model: SHA-256 of its configuration, input size / normalisation, code lengths
    and every tensor of its state dict. Two models give the same codes iff (practically) same fingerprint."""
    h = hashlib.sha256()
    desc = {"model_config": info.get("model_config"), "height": info.get("height"), "width": info.get("width"),
            "mean": list(info.get("mean", ())), "std": list(info.get("std", ())), "lengths": sorted(model.lengths)}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def folder_records(folder: str | os.PathLike, label: str = "--images",
                   recursive: bool = False) -> list[tuple[str, int, int]]:
    """``(absolute path, pid, camid)`` of every image in ``folder`` (sorted by name); pid/camid from
    Market-1501 style names, -1 when the name does not parse."""
    from ctfreid.datasets import parse_name

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{label} {folder} {what}: expected a folder of person crops (.jpg, .png...)")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{label} {folder} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    records = []
    for p in files:
        parsed = parse_name(p.name)
        pid, camid = parsed if parsed is not None else (-1, -1)
        records.append((str(p.resolve()), pid, camid))
    return records


def resolve_thresholds(model, info: Mapping, spec: str | None = None, beta: float | None = None,
                       encode_kw: Mapping | None = None) -> tuple[dict[int, int], str]:
    """CtF thresholds for ``model`` and a sentence saying where they come from (order in DESCRIPTION)."""
    from ctfreid.thresholds import check_thresholds, read_thresholds

    lengths = sorted(model.lengths)
    if len(lengths) == 1:
        return {}, "one code length: no thresholds needed"
    if spec:
        return check_thresholds(read_thresholds(spec), lengths), f"--thresholds {spec}"
    run_file = Path(info["file"]).parent / "thresholds.json"
    if beta is None:
        if info.get("thresholds"):
            return check_thresholds(info["thresholds"], lengths), f"stored in {info['file']}"
        if run_file.is_file():
            return check_thresholds(read_thresholds(run_file), lengths), str(run_file)
        beta = 2.0
    from ctfreid.encode import encode_records, split_records
    from ctfreid.thresholds import fit_thresholds

    records = split_records("val", dict(info))
    val = encode_records(model, records, **dict(encode_kw or {}))
    th = fit_thresholds(val.codes, val.pids, val.camids, beta=beta)
    return th, f"DTO beta={beta:g} on the run's {len(val)} validation images"


def encode_kwargs(info: Mapping, batch_size: int = 64, device: str = "cpu", progress: bool = True,
                  flip: bool = False) -> dict:
    """Keyword arguments of ``encode_records`` matching the model's input (size, normalisation, flip test)."""
    return {"batch_size": batch_size, "height": info["height"], "width": info["width"], "mean": info["mean"],
            "std": info["std"], "device": device, "progress": progress, "flip": bool(flip)}


def index_flip(index) -> bool:
    """Whether the images of ``index`` were encoded with the flip test (queries must be too)."""
    return bool(((index.metadata or {}).get("model") or {}).get("flip", False))


def _model_meta(fingerprint: str, info: Mapping, flip: bool = False) -> dict:
    cfg = info.get("model_config") or {}
    return {"fingerprint": fingerprint, "file": str(info.get("file")), "lengths": sorted(cfg.get("lengths", [])),
            "backbone": cfg.get("backbone"), "height": info.get("height"), "width": info.get("width"),
            "flip": bool(flip)}


def build_index(encoded, thresholds: Mapping[int, int], fingerprint: str, info: Mapping,
                extra: Mapping | None = None, flip: bool = False):
    """A :class:`ctfreid.index.CtFIndex` of ``encoded`` (an ``EncodedSet`` with paths) with the metadata above."""
    from ctfreid.index import CtFIndex

    if encoded.paths is None:
        raise ValueError("the encoded set has no image paths: an image index needs them")
    index = CtFIndex()
    index.add(encoded.codes)
    index.thresholds = {int(k): int(v) for k, v in thresholds.items()}
    index.metadata = {
        "format": META_FORMAT,
        "model": _model_meta(fingerprint, info, flip),
        "paths": [str(p) for p in encoded.paths],
        "pids": [int(p) for p in encoded.pids],
        "camids": [int(c) for c in encoded.camids],
        **dict(extra or {}),
    }
    return index


def add_to_index(index, encoded) -> None:
    """Append ``encoded`` (same code lengths) to ``index`` and to its path / pid / camid lists."""
    if encoded.paths is None:
        raise ValueError("the encoded set has no image paths: an image index needs them")
    meta = dict(index.metadata)
    index.add(encoded.codes)
    meta["paths"] = list(meta["paths"]) + [str(p) for p in encoded.paths]
    meta["pids"] = list(meta["pids"]) + [int(p) for p in encoded.pids]
    meta["camids"] = list(meta["camids"]) + [int(c) for c in encoded.camids]
    index.metadata = meta


def check_model(index, index_path: str | os.PathLike, fingerprint: str, info: Mapping) -> None:
    """``ValueError`` unless ``index`` was made by the model with ``fingerprint`` (and its code lengths)."""
    meta = index.metadata or {}
    if meta.get("format") != META_FORMAT or "paths" not in meta:
        raise ValueError(f"index {index_path} is not an image index of 'ctfreid index build' "
                         "(no model fingerprint or image paths in its metadata)")
    made_by = meta.get("model", {})
    lengths = sorted((info.get("model_config") or {}).get("lengths", []))
    if made_by.get("fingerprint") != fingerprint or sorted(made_by.get("lengths", [])) != lengths:
        raise ValueError(
            f"index {index_path} was built by another model (fingerprint {made_by.get('fingerprint')}, lengths "
            f"{made_by.get('lengths')}, {made_by.get('file')}) than {info.get('file')} (fingerprint {fingerprint}, "
            f"lengths {lengths}): use the model that built it, or rebuild the index with 'ctfreid index build'"
        )


def load_index(path: str | os.PathLike, mmap: bool = True):
    """``CtFIndex.load`` with a message naming the option when the file is missing."""
    from ctfreid.index import CtFIndex

    if not Path(path).is_file():
        raise FileNotFoundError(f"--index {path}: no such file (build one with 'ctfreid index build')")
    return CtFIndex.load(path, mmap=mmap)


# ---------------------------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="run directory of 'ctfreid train' (or its model.pt)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of person crops (.jpg, .jpeg, .png, .bmp)")
    p.add_argument("--recursive", action="store_true", help="also take images in sub-folders")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoding batch (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    b = sub.add_parser("build", help="encode a folder of images into a new index", description=BUILD_DESCRIPTION,
                       formatter_class=raw)
    _common(b)
    b.add_argument("--out", required=True, metavar="INDEX", help="index file to write (e.g. gallery.ctf)")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--thresholds", metavar="SPEC",
                       help="CtF thresholds: 32=9,128=41,512=190 or a .json from 'ctfreid calibrate'")
    group.add_argument("--beta", type=float, help="fit thresholds with DTO at this beta on the run's validation split")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.add_argument("--flip", action="store_true",
                   help="flip test: encode each image with its mirror (2x slower; remembered by the index, so "
                        "'index add' and 'search' do the same)")
    a = sub.add_parser("add", help="append new images to an index", description=ADD_DESCRIPTION, formatter_class=raw)
    a.add_argument("--index", required=True, metavar="INDEX", help="index file to extend (rewritten atomically)")
    _common(a)


def run(args: argparse.Namespace) -> int:
    from ctfreid.encode import encode_records, load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.action == "build" and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} exists: pass --overwrite to replace it, or 'ctfreid index add' to extend it")
    index = load_index(args.index, mmap=False) if args.action == "add" else None
    records = folder_records(args.images, recursive=args.recursive)
    model, info = load_model(args.model, device=args.device)
    fingerprint = model_fingerprint(model, info)
    flip = args.flip if args.action == "build" else index_flip(index)
    kw = encode_kwargs(info, args.batch_size, args.device, progress=not args.quiet, flip=flip)

    if args.action == "build":
        thresholds, source = resolve_thresholds(model, info, args.thresholds, args.beta, kw)
        encoded = encode_records(model, records, **kw)
        index = build_index(encoded, thresholds, fingerprint, info, {"thresholds_source": source}, flip=flip)
        index.save(args.out)
        th = ", ".join(f"{L}-bit <= {t}" for L, t in sorted(thresholds.items())) or "none"
        print(f"indexed {index.ntotal} images from {args.images} -> {args.out}")
        print(f"  model {info['file']} (fingerprint {fingerprint}), lengths {sorted(model.lengths)}"
              + (", flip test" if flip else ""))
        print(f"  thresholds {th} ({source})")
        return 0

    check_model(index, args.index, fingerprint, info)
    known = set(index.metadata["paths"])
    new = [r for r in records if r[0] not in known]
    if new:
        add_to_index(index, encode_records(model, new, **kw))
        index.save(args.index)
    print(f"added {len(new)} images from {args.images} to {args.index} ({len(records) - len(new)} already in it); "
          f"{index.ntotal} images in all")
    return 0
