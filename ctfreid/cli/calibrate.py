"""``ctfreid calibrate``: DTO thresholds (Sec. 3.3) from an encoded validation set."""

from __future__ import annotations

import argparse
import math

from ctfreid.cli._args import output_file, positive_float, positive_int, seed
from ctfreid.errors import CtfreidError

HELP = "fit DTO thresholds on an encoded validation set"
DESCRIPTION = """Distance Threshold Optimization (DTO, Sec. 3.3 of the paper): for every code length but the
longest, fit Gaussians to the Hamming distances of same-identity pairs (different cameras) and of
different-identity pairs in a validation set, and choose the threshold that maximises F_beta. Larger
beta favours recall (more candidates: slower, more accurate). The thresholds .json it writes is accepted
by 'ctfreid evaluate --thresholds', 'ctfreid index build' and 'ctfreid search'.

--beta-sweep prints thresholds for a range of betas; with --query and --gallery it also evaluates CtF at
each (the accuracy / speed trade-off of the paper's Fig. 4). Fit on validation data, never on the test set.

example:
  ctfreid calibrate --val val.npz --beta 2 --out thresholds.json
  ctfreid calibrate --val val.npz --beta-sweep --query q.npz --gallery g.npz"""


def _betas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.1,1,2, got {text!r}") from None
    for value in values:  # refused while parsing, not after the first fit is printed
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected finite betas > 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val", required=True, metavar="VAL.npz",
                        help="encoded validation set (pids, camids, codes_<L>)")
    parser.add_argument("--beta", type=positive_float, default=2.0, help="F_beta weight of recall (default 2.0, the paper's)")
    parser.add_argument("--rho", default="1",
                        help="weight of the negative CDF: a number, or 'auto' = the real negative/positive "
                        "pair ratio (default 1)")
    parser.add_argument("--out", type=output_file, metavar="thresholds.json", help="write thresholds, beta and the Gaussian fits as JSON")
    parser.add_argument("--max-pairs", type=positive_int, default=1_000_000,
                        help="most pairs of each kind used for the fits (deterministic subsample; default 1000000)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the pair subsample (default 0)")
    parser.add_argument("--beta-sweep", action="store_true", help="print the trade-off table over several betas")
    parser.add_argument("--betas", type=_betas, default=None, metavar="B1,B2,...",
                        help="betas of the sweep (default 0.01,0.03,0.1,0.3,1,2,3,10)")
    parser.add_argument("--query", metavar="Q.npz", help="with --beta-sweep: evaluate CtF on this query set")
    parser.add_argument("--gallery", metavar="G.npz", help="with --beta-sweep: ... against this gallery")


def run(args: argparse.Namespace) -> int:
    from ctfreid.cli.evaluate import parse_rho
    from ctfreid.encoded import load_encoded
    from ctfreid.eval.evaluate import DEFAULT_BETAS, beta_sweep, format_sweep
    from ctfreid.search.thresholds import fit_dto, save_thresholds

    rho = parse_rho(args.rho)
    if (args.query or args.gallery) and not args.beta_sweep:
        raise CtfreidError("--query / --gallery only apply with --beta-sweep")
    if bool(args.query) != bool(args.gallery):
        raise CtfreidError("--beta-sweep needs both --query and --gallery, or neither")
    val = load_encoded(args.val, f"--val {args.val}")
    fits = fit_dto(val.codes, val.pids, val.camids, beta=args.beta, rho=rho, max_pairs=args.max_pairs, seed=args.seed)
    print(f"DTO on {args.val}: {len(val)} images, beta={args.beta:g}, rho={args.rho}")
    print(f"{'length':>6}  {'relevant mean/std (pairs)':<28}{'non-relevant mean/std (pairs)':<32}"
          f"{'threshold':>9}{'F_beta':>8}{'recall':>8}{'neg. rate':>11}")
    for L, f in fits.items():
        pos = f"{f.pos_mean:.2f}/{f.pos_std:.2f} ({f.num_pos})"
        neg = f"{f.neg_mean:.2f}/{f.neg_std:.2f} ({f.num_neg})"
        print(f"{L:>6}  {pos:<28}{neg:<32}{f.threshold:>9}{f.f_beta:>8.3f}{f.recall:>8.3f}{f.neg_rate:>11.2e}")
    print("thresholds: " + ",".join(f"{L}={f.threshold}" for L, f in fits.items()))
    extra = {"rho_spec": rho, "val": str(args.val), "num_images": len(val)}
    if args.beta_sweep:
        query = load_encoded(args.query, f"--query {args.query}") if args.query else None
        gallery = load_encoded(args.gallery, f"--gallery {args.gallery}") if args.gallery else None
        rows = beta_sweep(val, query, gallery, args.betas or DEFAULT_BETAS, rho, args.max_pairs, args.seed)
        print("\nbeta sweep" + (" (CtF on query/gallery)" if query is not None else " (Gaussian estimates)"))
        print(format_sweep(rows))
        extra["sweep"] = rows
    if args.out:
        save_thresholds(args.out, fits, extra)
        print(f"wrote {args.out}")
    return 0
