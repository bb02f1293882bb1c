"""``ctfreid evaluate``: Table-4 style accuracy and query time from encoded .npz files."""

from __future__ import annotations

import argparse
import json
import math

from ctfreid.cli._args import not_an_input, output_file, positive_float, positive_int
from ctfreid.errors import CtfreidError

HELP = "CMC/mAP and query time of float, each code length and CtF from .npz files"
DESCRIPTION = """Rank a query set against a gallery with real-valued features (when both .npz files have
'features'), with each code length alone (Hamming distance + counting sort) and with coarse-to-fine
search, then print Rank-1/5/10, mAP (Market-1501 protocol) and milliseconds per query.

Each .npz holds pids, camids, codes_<L> for every code length, optionally features and paths
('ctfreid encode' writes them). CtF thresholds come from --thresholds (LENGTH=DISTANCE list or the .json
written by 'ctfreid calibrate') or from DTO on a validation set (--calibrate); without either, only the
float and hash rows are printed. A calibrate .json holds a weighted (asymmetric) stage 1 beside its Hamming
thresholds: CtF uses it when the query set has values_<L> ('ctfreid encode' writes them), as searches by
image do; pass the Hamming thresholds as a list (printed) to compare.

example:
  ctfreid evaluate --query q.npz --gallery g.npz --calibrate val.npz --beta 2 --json results.json
  ctfreid evaluate --query q.npz --gallery g.npz --thresholds 32=9,128=41,512=190 --search-k 100"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", required=True, metavar="Q.npz", help="encoded query set")
    parser.add_argument("--gallery", required=True, metavar="G.npz", help="encoded gallery set")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--thresholds", metavar="SPEC",
                       help="CtF thresholds: 32=9,128=41,512=190 or a thresholds .json from 'ctfreid calibrate'")
    group.add_argument("--calibrate", metavar="VAL.npz", help="fit thresholds with DTO on this validation set")
    parser.add_argument("--beta", type=positive_float, default=None,
                        help="DTO beta with --calibrate (default 2.0; larger = more accurate, slower)")
    parser.add_argument("--rho", default="1", help="DTO rho with --calibrate: a number or 'auto' (default 1)")
    parser.add_argument("--max-rank", type=positive_int, default=10, help="longest CMC rank (default 10)")
    parser.add_argument("--search-k", type=positive_int, default=None, metavar="K",
                        help="also time the top-K search alone (the index's serving path) for each binary row")
    parser.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                        help="report the median time of N timed passes (default 1; the CPU may be shared)")
    parser.add_argument("--json", type=output_file, metavar="OUT.json", help="also write the results as JSON")


def parse_rho(text: str) -> float | str:
    """``"auto"`` or a positive number, for --rho."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise CtfreidError(f"--rho: expected a positive number or 'auto', got {text!r}") from None
    if not math.isfinite(value) or value <= 0:  # refused before any set is loaded
        raise CtfreidError(f"--rho: expected a finite number > 0 or 'auto', got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from ctfreid._atomic import atomic_write
    from ctfreid.encoded import check_same_encoder, load_encoded
    from ctfreid.eval.evaluate import evaluate_sets, format_table
    from ctfreid.search.thresholds import fit_dto, read_thresholds_file

    if args.beta is not None and not args.calibrate:
        raise CtfreidError("--beta only applies with --calibrate VAL.npz")
    rho = parse_rho(args.rho)
    not_an_input(args.json, "--json", {"--query": args.query, "--gallery": args.gallery,
                                       "--calibrate": args.calibrate, "--thresholds": args.thresholds})
    query = load_encoded(args.query, f"--query {args.query}")
    gallery = load_encoded(args.gallery, f"--gallery {args.gallery}")
    if query.lengths != gallery.lengths:
        raise CtfreidError(f"--query has code lengths {query.lengths} but --gallery has {gallery.lengths}")
    sets = {f"--query {args.query}": query, f"--gallery {args.gallery}": gallery}
    thresholds = weighting = None
    if args.thresholds is None and args.calibrate:
        sets[f"--calibrate {args.calibrate}"] = load_encoded(args.calibrate, f"--calibrate {args.calibrate}")
    for note in check_same_encoder(sets):
        print(note)
    if args.thresholds is not None:  # an empty --thresholds "$TH" is an error, not no thresholds
        fits = read_thresholds_file(args.thresholds)
        thresholds = fits.hamming
        if fits.weighted is not None and (query.values is not None or fits.hamming is None):
            # a weighted stage 1 fitted beside the Hamming thresholds: queries with values use it, as searches do
            thresholds, weighting = fits.weighted, fits.weighting
            print(f"{weighting.stages(query.lengths[0])} ({weighting.bits}-bit weights, scale {weighting.scale:.4g}) "
                  f"from {args.thresholds}"
                  + ("" if fits.hamming is None else "; its Hamming thresholds: " +
                     ",".join(f"{L}={t}" for L, t in fits.hamming.items())))
    elif args.calibrate:
        val = sets[f"--calibrate {args.calibrate}"]
        if val.lengths != gallery.lengths:
            raise CtfreidError(f"--calibrate has code lengths {val.lengths} but --gallery has {gallery.lengths}")
        beta = 2.0 if args.beta is None else args.beta
        fits = fit_dto(val.codes, val.pids, val.camids, beta=beta, rho=rho)
        thresholds = {L: f.threshold for L, f in fits.items()}
        print(f"DTO (beta={beta:g}) on {args.calibrate}: " + ", ".join(f"{L}={t}" for L, t in thresholds.items()))
    max_rank = args.max_rank
    if max_rank > len(gallery):  # as torchreid: a note, and CMC up to the gallery size
        max_rank = len(gallery)
        print(f"note: --max-rank {args.max_rank} is more than the {len(gallery)} gallery items: "
              f"CMC up to rank {max_rank}")
    result = evaluate_sets(query, gallery, thresholds, max_rank=max_rank, search_k=args.search_k,
                           repeats=args.repeats, weighting=weighting)
    print(f"{len(query)} queries x {len(gallery)} gallery items")
    print(format_table(result))
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0
