"""``ctfreid calibrate``: coarse-to-fine thresholds from an encoded validation set: DTO (Sec. 3.3), or aimed
at an accuracy or a time target (``ctfreid.eval.calibration``)."""

from __future__ import annotations

import argparse
import math

from ctfreid.cli._args import not_an_input, output_file, positive_float, positive_int, seed
from ctfreid.errors import CtfreidError

HELP = "fit coarse-to-fine thresholds on a validation set: DTO, or aimed at accuracy or a time budget"
DESCRIPTION = """Thresholds for coarse-to-fine search, for every code length but the longest, fitted on a
validation set (never on the test set). The thresholds .json it writes is accepted by 'ctfreid evaluate
--thresholds', 'ctfreid index build' and 'ctfreid search'. Three targets:

--target dto: Distance Threshold Optimization (DTO, Sec. 3.3 of the paper): fit Gaussians to the Hamming
distances of same-identity pairs (different cameras) and of different-identity pairs, and choose the
threshold that maximises F_beta. Larger beta favours recall (more candidates: slower, more accurate).

--target accuracy: the thresholds with the lowest expected query time whose CtF mAP and Rank-1 stay within
--tolerance points of the longest code alone, on the validation identities split into query and gallery
(one query per identity and camera; --folds splits pooled).
--target time: the best validation mAP whose expected time is at most --budget-ms milliseconds per query.
Expected times come from a cost model of top-k CtF search: by default the built-in one (measured once,
so that fits are deterministic and cost no timing: the same thresholds as 'index build', the demo and
the service); --measure-cost-model measures one on this machine instead (5-40 s, varies with its load;
--save-cost-model keeps it), --cost-model reads a saved one. Times are planned for a gallery of
--gallery-size items (the fractions kept at each stage transfer across sizes; default: the validation
gallery).

The targets also fit a weighted (asymmetric) first stage, written beside the Hamming thresholds in the same
file: the query's shortest code keeps a weight per bit, its confidence |bn(v)| quantised to --weighted BITS
bits (default 4), and stage 1 ranks by the sum of the weights of the bits that differ (the gallery keeps its
binary codes). Searches by images use it ('ctfreid evaluate', 'index build', 'search', the service);
searches by codes alone use the Hamming thresholds. It needs values_<L> in the validation set (written by
'ctfreid encode'); --weighted 0 leaves it out. --weight-later 128,512 weights those later stages too (their
values_<L>, written by 'ctfreid encode'; their thresholds are then weighted distances). On CUHK03 it made
one query at 10^6 items faster in most runs, but in two of seven CtF lost up to 0.9 mAP on the test split
(docs/results-cuhk03.md), so it is off by default: check it on held-out data before using it.

Without --target: dto when --beta or --beta-sweep is given, time when --budget-ms is, else accuracy.
--beta-sweep prints thresholds for a range of betas; with --query and --gallery it also evaluates CtF at
each (the accuracy / speed trade-off of the paper's Fig. 4).

example:
  ctfreid calibrate --val val.npz --beta 2 --out thresholds.json
  ctfreid calibrate --val val.npz --target accuracy --tolerance 0.5 --gallery-size 100000 --out thresholds.json
  ctfreid calibrate --val val.npz --target time --budget-ms 0.2 --measure-cost-model --out thresholds.json
  ctfreid calibrate --val val.npz --weighted 0 --out thresholds.json   (Hamming thresholds only)
  ctfreid calibrate --val val.npz --weight-later 128,512 --out thresholds.json
  ctfreid calibrate --val val.npz --beta-sweep --query q.npz --gallery g.npz"""

TARGETS = ("dto", "accuracy", "time")
# the default: on the CUHK03 dev set (MobileNetV2 AiO) tolerance 0.5 kept the 2048-bit code's accuracy with
# 1.7-1.8x faster search than DTO with beta 2 (and ~5x expected at 1e6 items)
DEFAULT_TARGET = "accuracy"


def _betas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.1,1,2, got {text!r}") from None
    for value in values:  # refused while parsing, not after the first fit is printed
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected finite betas > 0, got {text!r}")
    return values


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated code lengths, e.g. 128,512, got {text!r}") from None
    return values


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of points >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val", required=True, metavar="VAL.npz",
                        help="encoded validation set (pids, camids, codes_<L>)")
    parser.add_argument("--target", choices=TARGETS, default=None,
                        help="dto (the paper's F_beta), accuracy (fastest within --tolerance of the longest code) "
                        "or time (most accurate within --budget-ms); default: accuracy (see above)")
    parser.add_argument("--beta", type=positive_float, default=None,
                        help="DTO: F_beta weight of recall (default 2.0, the paper's)")
    parser.add_argument("--rho", default="1",
                        help="DTO: weight of the negative CDF: a number, or 'auto' = the real negative/positive "
                        "pair ratio (default 1)")
    parser.add_argument("--tolerance", type=_tolerance, default=None, metavar="POINTS",
                        help="target accuracy: most mAP and Rank-1 points lost to the longest code (default 0.5)")
    parser.add_argument("--budget-ms", type=positive_float, default=None, metavar="MS",
                        help="target time: most expected milliseconds per query")
    parser.add_argument("--gallery-size", type=positive_int, default=None, metavar="N",
                        help="targets: plan the time for a gallery of N items (default: the validation gallery)")
    parser.add_argument("--k", type=positive_int, default=None,
                        help="targets: the top-k of the searches timed (default 100, or the cost model's)")
    parser.add_argument("--folds", type=positive_int, default=None,
                        help="targets: validation query / gallery splits pooled (default 4; each draws other "
                        "images of every identity and camera as queries)")
    parser.add_argument("--cost-model", metavar="COST.json",
                        help="targets: read the cost model from this file (default: the built-in one)")
    parser.add_argument("--measure-cost-model", action="store_true",
                        help="targets: measure the cost model on this machine (5-40 s) instead of using the "
                        "built-in one")
    parser.add_argument("--save-cost-model", type=output_file, metavar="COST.json",
                        help="targets: write the cost model used here (for --cost-model next time)")
    parser.add_argument("--weighted", type=int, default=None, metavar="BITS", choices=range(0, 5),
                        help="targets: also fit a weighted (asymmetric) stage 1 for image queries: each bit of the "
                        "query's shortest code weighted by its confidence |bn(v)|, quantised to BITS bits (1-4; "
                        "default 4, the best on CUHK03, when the validation set has values_<L>); 0: Hamming only")
    parser.add_argument("--weight-later", type=_lengths, default=None, metavar="L1,L2,...",
                        help="targets: weight these later stages of image queries too (lengths between the shortest "
                        "and the longest; their values_<L> needed); default: stage 1 only")
    parser.add_argument("--out", type=output_file, metavar="thresholds.json",
                        help="write the thresholds and how they were fitted as JSON")
    parser.add_argument("--max-pairs", type=positive_int, default=1_000_000,
                        help="most pairs of each kind used for the fits (deterministic subsample; default 1000000)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed of the pair subsample and of the validation query / gallery split (default 0)")
    parser.add_argument("--beta-sweep", action="store_true", help="print the trade-off table over several betas")
    parser.add_argument("--betas", type=_betas, default=None, metavar="B1,B2,...",
                        help="betas of the sweep (default 0.01,0.03,0.1,0.3,1,2,3,10)")
    parser.add_argument("--query", metavar="Q.npz", help="with --beta-sweep: evaluate CtF on this query set")
    parser.add_argument("--gallery", metavar="G.npz", help="with --beta-sweep: ... against this gallery")


def resolve_target(args: argparse.Namespace) -> str:
    """The target of the command line, its options checked against it (one clear error otherwise)."""
    target = args.target or ("dto" if args.beta is not None or args.beta_sweep else
                             "time" if args.budget_ms is not None else DEFAULT_TARGET)
    targeted = {"--tolerance": args.tolerance, "--budget-ms": args.budget_ms, "--gallery-size": args.gallery_size,
                "--k": args.k, "--folds": args.folds, "--cost-model": args.cost_model, "--save-cost-model": args.save_cost_model,
                "--measure-cost-model": args.measure_cost_model or None, "--weighted": args.weighted,
                "--weight-later": args.weight_later}
    if target == "dto":
        given = [name for name, v in targeted.items() if v is not None]
        if given:
            which = {"--tolerance": "accuracy", "--budget-ms": "time"}.get(given[0], "accuracy or time")
            raise CtfreidError(f"{given[0]} applies to --target {which}, not dto")
        return target
    if args.beta is not None:
        raise CtfreidError(f"--beta applies to --target dto, not {target}")
    if target == "accuracy" and args.budget_ms is not None:
        raise CtfreidError("--budget-ms applies to --target time, not accuracy (use --tolerance)")
    if target == "time" and args.budget_ms is None:
        raise CtfreidError("--target time needs --budget-ms MS (the most expected milliseconds per query)")
    if target == "time" and args.tolerance is not None:
        raise CtfreidError("--tolerance applies to --target accuracy, not time (use --budget-ms)")
    if args.weight_later and args.weighted == 0:
        raise CtfreidError("--weight-later weights later stages beside a weighted stage 1: not with --weighted 0")
    if args.cost_model and (args.save_cost_model or args.measure_cost_model):
        which = "--measure-cost-model" if args.measure_cost_model else "--save-cost-model"
        raise CtfreidError(f"{which} and --cost-model exclude each other (--cost-model reads a saved model)")
    return target


def _fit_target(args: argparse.Namespace, target: str, val):
    """The targeted fits, Hamming and weighted (None when not fitted): prints them, returns them and the cost
    model they used."""
    from ctfreid.eval.calibration import (DEFAULT_FOLDS, DEFAULT_TOLERANCE, DEFAULT_WEIGHT_BITS, fit_target,
                                         format_fit)
    from ctfreid.eval.cost_model import (CostModel, default_cost_model, default_sizes, format_cost_model,
                                         measure_cost_model)

    if args.cost_model:
        model = CostModel.load(args.cost_model)
        model.check_lengths(val.lengths, f"codes of {args.val}")
        print(f"cost model from {args.cost_model}")
    elif args.measure_cost_model:
        k = args.k or 100
        n = args.gallery_size or len(val)
        sizes = default_sizes(n, k)
        print(f"measuring the cost model of top-{k} search on generated codes ({sizes[0]} and {sizes[1]} items, "
              "one thread)...", flush=True)
        model = measure_cost_model(val.lengths, sizes, k=k)
    else:
        model = default_cost_model(val.lengths, args.k)
        print("the built-in cost model (--measure-cost-model measures one on this machine)")
    if args.save_cost_model:
        model.save(args.save_cost_model)
        print(f"wrote {args.save_cost_model}")
    print(format_cost_model(model))
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    fit = fit_target(val, target, tolerance, args.budget_ms, model, args.gallery_size, args.k, seed=args.seed,
                     folds=args.folds or DEFAULT_FOLDS, max_pairs=args.max_pairs)
    print(format_fit(fit))
    sizes = model.info.get("sizes")
    if args.cost_model and sizes and not min(sizes) / 4 <= fit.gallery_size <= 4 * max(sizes):
        print(f"note: the cost model was measured on galleries of {sizes} items, far from {fit.gallery_size}: "
              f"measure one for this size (--measure-cost-model --gallery-size {fit.gallery_size})")
    bits = DEFAULT_WEIGHT_BITS if args.weighted is None else args.weighted
    weighted = None
    asked = args.weighted is not None or args.weight_later is not None
    if bits and (val.values is not None or asked):  # asked for: no values is an error
        from ctfreid.search.asymmetric import weighted_stages

        stages = weighted_stages([val.lengths[0], *sorted(set(args.weight_later or []))])
        print(f"\n{stages} ({bits}-bit weights), for queries with real values (encoded images):")
        try:
            weighted = fit_target(val, target, tolerance, args.budget_ms, model, args.gallery_size, args.k,
                                  seed=args.seed, folds=args.folds or DEFAULT_FOLDS, max_pairs=args.max_pairs,
                                  weight_bits=bits, weight_later=args.weight_later or ())
        except CtfreidError as e:
            if asked:
                raise
            print(f"note: no weighted stage 1 ({e})")  # the default: the Hamming fit stands alone
        else:
            print(format_fit(weighted))
    elif bits:
        print(f"note: no weighted stage 1: {args.val} has no values_{val.lengths[0]} (encode it again with "
              "'ctfreid encode' for one)")
    return fit, weighted, model


def run(args: argparse.Namespace) -> int:
    from ctfreid.cli.evaluate import parse_rho
    from ctfreid.encoded import check_same_encoder, load_encoded
    from ctfreid.eval.calibration import save_fit
    from ctfreid.eval.evaluate import DEFAULT_BETAS, beta_sweep, format_sweep
    from ctfreid.search.thresholds import fit_dto, save_thresholds

    rho = parse_rho(args.rho)
    target = resolve_target(args)
    beta = 2.0 if args.beta is None else args.beta
    if (args.query or args.gallery) and not args.beta_sweep:
        raise CtfreidError("--query / --gallery only apply with --beta-sweep")
    if bool(args.query) != bool(args.gallery):
        raise CtfreidError("--beta-sweep needs both --query and --gallery, or neither")
    inputs = {"--val": args.val, "--query": args.query, "--gallery": args.gallery, "--cost-model": args.cost_model}
    not_an_input(args.out, "--out", inputs)
    not_an_input(args.save_cost_model, "--save-cost-model", inputs)
    val = load_encoded(args.val, f"--val {args.val}")
    query = load_encoded(args.query, f"--query {args.query}") if args.query else None
    gallery = load_encoded(args.gallery, f"--gallery {args.gallery}") if args.gallery else None
    if query is not None:  # refused before any fitting
        for note in check_same_encoder({f"--val {args.val}": val, f"--query {args.query}": query,
                                        f"--gallery {args.gallery}": gallery}):
            print(note)
    extra = {"target": target, "val": str(args.val), "num_images": len(val), "seed": args.seed}
    if target == "dto":
        extra["rho_spec"] = rho
        fits = fit_dto(val.codes, val.pids, val.camids, beta=beta, rho=rho, max_pairs=args.max_pairs, seed=args.seed)
        print(f"DTO on {args.val}: {len(val)} images, beta={beta:g}, rho={args.rho}")
        print(f"{'length':>6}  {'relevant mean/std (pairs)':<28}{'non-relevant mean/std (pairs)':<32}"
              f"{'threshold':>9}{'F_beta':>8}{'recall':>8}{'neg. rate':>11}")
        for L, f in fits.items():
            pos = f"{f.pos_mean:.2f}/{f.pos_std:.2f} ({f.num_pos})"
            neg = f"{f.neg_mean:.2f}/{f.neg_std:.2f} ({f.num_neg})"
            print(f"{L:>6}  {pos:<28}{neg:<32}{f.threshold:>9}{f.f_beta:>8.3f}{f.recall:>8.3f}{f.neg_rate:>11.2e}")
        print("thresholds: " + ",".join(f"{L}={f.threshold}" for L, f in fits.items()))
    else:
        print(f"thresholds for target {target} on {args.val}: {len(val)} images")
        fit, weighted, model = _fit_target(args, target, val)
    if args.beta_sweep:
        rows = beta_sweep(val, query, gallery, args.betas or DEFAULT_BETAS, rho, args.max_pairs, args.seed)
        print("\nbeta sweep" + (" (CtF on query/gallery)" if query is not None else " (Gaussian estimates)"))
        print(format_sweep(rows))
        extra["sweep"] = rows
    if args.out:
        if target == "dto":
            save_thresholds(args.out, fits, extra)
        else:  # thresholds, the fit, its cost model, and the fit of a weighted stage 1
            save_fit(args.out, fit, model, extra, weighted=weighted)
        print(f"wrote {args.out}")
    return 0
