"""``ctfreid index build`` / ``ctfreid index add``: a coarse-to-fine index of a folder of person crops
(the library side is :mod:`ctfreid.infer.gallery`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ctfreid.cli._args import not_an_input, output_file, positive_float, positive_int
from ctfreid.errors import CtfreidError

if TYPE_CHECKING:
    from ctfreid.search.asymmetric import WeightedFit

HELP = "build or extend a coarse-to-fine index from a folder of images"
DESCRIPTION = """Encode a folder of person crops with a trained AiO model and save a coarse-to-fine (CtF)
index: the multi-length binary codes, the coarse-to-fine thresholds, the image paths, the person ids parsed from
Market-1501 style names (0002_c1s1_000451_03.jpg; -1 = unknown otherwise) and the model's fingerprint
(a hash of its weights, configuration and code lengths). 'ctfreid search' refuses queries encoded by
another model.

  index build   encode every image in --images and write a new index to --out
  index add     encode the images of --images that the index does not hold yet and append them
                (old images are not re-encoded; the index must come from the same model)
  index remove  erase the images of a person (--pid) or given images (--image) from the index: gone from
                every search and from the file's bytes (it is rewritten compacted), with a receipt

Thresholds of 'index build', first match wins: --thresholds (32=9,128=41,512=190 or a .json from
'ctfreid calibrate'); --beta B (the paper's DTO with this beta on the run's validation split, e.g.
--beta 2); the thresholds stored in the model file or in RUN_DIR/thresholds.json; else the fastest
thresholds whose validation mAP and Rank-1 stay within 0.5 points of the longest code ('ctfreid calibrate
--target accuracy --tolerance 0.5'), fitted on the run's validation split (Sec. 4.2: 'ctfreid train
--val-fraction 0.4' keeps one) with the built-in cost model, planned for the number of images indexed.
Beside them the index keeps a weighted (asymmetric) stage 1 for image queries when one was fitted (the
'weighted_stage1' of a calibrate .json or of RUN_DIR/thresholds.json, or the default fit: 4-bit weights,
the same target): 'ctfreid search' uses it; searches by codes alone use the Hamming thresholds.

examples:
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf
  ctfreid index add --index gallery.ctf --model runs/aio --images new_crops/
  ctfreid index remove --index gallery.ctf --pid 2 --image crops/0007_c2s1_000123_01.jpg
  ctfreid search --index gallery.ctf --model runs/aio query.jpg --k 10"""

REMOVE_DESCRIPTION = """Erase images from an index: every image of the persons --pid (the ids parsed from Market-1501
style names when the index was built) and the images --image. The index file is rewritten atomically and
compacted: the removed codes and paths leave no bytes in it. Prints the ids removed and when.

example:
  ctfreid index remove --index gallery.ctf --pid 2 --pid 17
  ctfreid index remove --index gallery.ctf --image crops/0007_c2s1_000123_01.jpg"""

BUILD_DESCRIPTION = """Encode every image of --images with the model of --model and write a new CtF index.

example:
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf --beta 2
  ctfreid index build --model runs/aio --images crops/ --out gallery.ctf --flip   # flip test"""

ADD_DESCRIPTION = """Append the images of --images that the index does not hold yet (same path = same image);
only they are encoded. The model must be the one that built the index (same fingerprint).

example:
  ctfreid index add --index gallery.ctf --model runs/aio --images new_crops/"""


# ---------------------------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN_DIR|ENCODER.onnx",
                   help="run directory of 'ctfreid train' (or its model.pt), or its ONNX export ('ctfreid export')")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of person crops (.jpg, .jpeg, .png, .bmp)")
    p.add_argument("--recursive", action="store_true", help="also take images in sub-folders")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoding batch (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    b = sub.add_parser("build", help="encode a folder of images into a new index", description=BUILD_DESCRIPTION,
                       formatter_class=raw)
    _common(b)
    b.add_argument("--out", required=True, type=output_file, metavar="INDEX", help="index file to write (e.g. gallery.ctf)")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--thresholds", metavar="SPEC",
                       help="CtF thresholds: 32=9,128=41,512=190 or a .json from 'ctfreid calibrate'")
    group.add_argument("--beta", type=positive_float, help="fit thresholds with DTO at this beta on the run's validation split (default: the accuracy "
                       "target, tolerance 0.5 points; see above)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.add_argument("--flip", action="store_true",
                   help="flip test: encode each image with its mirror (2x slower; remembered by the index, so "
                        "'index add' and 'search' do the same)")
    a = sub.add_parser("add", help="append new images to an index", description=ADD_DESCRIPTION, formatter_class=raw)
    a.add_argument("--index", required=True, metavar="INDEX", help="index file to extend (rewritten atomically)")
    _common(a)
    r = sub.add_parser("remove", help="erase a person's images (or given images) from an index",
                       description=REMOVE_DESCRIPTION, formatter_class=raw)
    r.add_argument("--index", required=True, metavar="INDEX", help="index file (rewritten atomically, compacted)")
    r.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                   help="remove every image of this person (repeatable)")
    r.add_argument("--image", action="append", default=[], metavar="PATH", help="remove this image (repeatable)")


def run(args: argparse.Namespace) -> int:
    from ctfreid.infer.gallery import check_index_file, index_lock

    if args.action in ("add", "remove"):
        check_index_file(args.index)  # before locking: no INDEX.lock litter beside a wrong --index
    if args.action == "remove" and not (args.pid or args.image):
        raise CtfreidError("index remove needs --pid or --image: which images to erase")
    target = args.out if args.action == "build" else args.index
    _refuse_existing(args)
    with index_lock(target):  # two writers of one index wait for each other instead of losing images
        if args.action == "build":
            _refuse_existing(args)  # again under the lock: another build may have written it meanwhile
            return _build(args)
        return _add(args) if args.action == "add" else _remove(args)


def _refuse_existing(args: argparse.Namespace) -> None:
    if args.action == "build" and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} exists: pass --overwrite to replace it, or 'ctfreid index add' to extend it")


def _build(args: argparse.Namespace) -> int:
    from ctfreid.infer.encoder import load_encoder
    from ctfreid.infer.gallery import build_index, folder_records, resolve_thresholds

    records = folder_records(args.images, recursive=args.recursive)
    enc = load_encoder(args.model, device=args.device, flip=True if args.flip else None)
    not_an_input(args.out, "--out", {"model": enc.info["file"]})
    thresholds, source, weighted = resolve_thresholds(enc, args.thresholds, args.beta, args.batch_size,
                                                       not args.quiet,
                                                       fit=lambda val: targeted_thresholds(val, len(records)))
    encoded = enc.encode_records(records, batch_size=args.batch_size, progress=not args.quiet)
    index = build_index(encoded, thresholds, enc.fingerprint, enc.info, {"thresholds_source": source}, flip=enc.flip,
                        weighted=weighted)
    index.save(args.out)
    th = ", ".join(f"{L}-bit <= {t}" for L, t in sorted(thresholds.items())) or "none"
    print(f"indexed {index.ntotal} images from {args.images} -> {args.out}")
    print(f"  model {enc.info['file']} (fingerprint {enc.fingerprint}, {enc.info.get('runtime', 'torch')}), "
          f"lengths {enc.lengths}" + (", flip test" if enc.flip else ""))
    print(f"  thresholds {th} ({source})")
    if weighted is not None:
        wth = ", ".join(f"{L}-bit <= {t}" for L, t in sorted(weighted.thresholds.items()))
        w = weighted.weighting
        print(f"  for image queries: {w.stages(index.lengths[0])} ({w.bits}-bit weights, scale {w.scale:.4g}"
              + "".join(f", {L} bits {s:.4g}" for L, s in w.later.items()) + f"), thresholds {wth}")
    return 0


def targeted_thresholds(val, gallery_size: int) -> tuple[dict[int, int], str, WeightedFit | None]:
    """The default thresholds of 'index build', the source line and the weighted stage 1 beside them: the
    accuracy target (tolerance 0.5 points, ``ctfreid.eval.calibration.default_fit`` and
    ``default_weighted_fit``) on the validation codes ``val``, planned for the ``gallery_size`` images
    being indexed, with the built-in cost model."""
    from ctfreid.eval.calibration import default_fit, default_weighted_fit, describe_fit

    fit = default_fit(val, gallery_size)
    wfit = default_weighted_fit(val, gallery_size)
    return fit.thresholds, describe_fit(fit, len(val)), None if wfit is None else wfit.weighted_fit


def _add(args: argparse.Namespace) -> int:
    from ctfreid.infer.encoder import load_encoder
    from ctfreid.infer.gallery import add_to_index, check_model, folder_records, index_flip, load_index

    index = load_index(args.index, mmap=False)
    records = folder_records(args.images, recursive=args.recursive)
    enc = load_encoder(args.model, device=args.device, flip=index_flip(index))  # encode as the index's images were
    check_model(index, args.index, enc.fingerprint, enc.info)
    known = set(index.metadata["paths"])
    new = [r for r in records if r[0] not in known]
    if new:
        add_to_index(index, enc.encode_records(new, batch_size=args.batch_size, progress=not args.quiet))
        index.save(args.index)
    print(f"added {len(new)} images from {args.images} to {args.index} ({len(records) - len(new)} already in it); "
          f"{index.ntotal} images in all")
    return 0


def _remove(args: argparse.Namespace) -> int:
    import datetime as dt

    from ctfreid.infer.gallery import load_index, remove_from_index

    index = load_index(args.index, mmap=False)
    if (index.metadata or {}).get("paths") is None:
        raise CtfreidError(f"--index {args.index} is not an image index of 'ctfreid index build' (no image paths)")
    gone = remove_from_index(index, pids=args.pid, paths=args.image)
    if gone:
        index.save(args.index)  # compacted: the removed codes and paths leave no bytes in the file
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(f"removed {len(gone)} images from {args.index} at {when}: ids {gone}; {index.ntotal} images left")
    return 0
