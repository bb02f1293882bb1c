#!/usr/bin/env python3
"""Small batches: which kernel a batch of a few queries should take. ``CtFIndex.search`` over the codes and
threshold fit of ``bench_search.py`` (stage 1 keeps about 2 %), top-100, each batch searched with the
one-query kernel (``ctf_topk`` query by query: ``_kernels.BATCH_MIN_QUERIES`` set out of reach) and with
the kernel the index picks (``_kernels.tile_scan``); both must give the answers of one query at a time.

    python3 benchmarks/bench_small_batches.py --sizes 1e6,2e6 --batches 1,2,4,8,16 --threads 1,2 [--weighted]

``--tile``: the tile scan for every batch instead of the index's pick (weighted: where the rule allows it at
all; with the index's byte planes, from ``_kernels.PLANES_WEIGHTED_TILE_MIN_N`` codes on, which a caller may
lower to compare below it). ``--source N``: take the galleries as the first n codes of the cached set of N
codes (one generation of 1e7 codes serves every size). ``--weighted``: a weighted stage 1 with random 4-bit
weights, its threshold and the later ones matched to the same kept fractions. µs a query, medians of
``--rounds`` interleaved rounds over 64 distinct queries.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from bench_default_fits import matched_thresholds
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex
    from ctfreid.search import _kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6")
    ap.add_argument("--source", type=float, default=0, help="slice every size from the cached set of this many")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weighted", action="store_true")
    ap.add_argument("--tile", action="store_true",
                    help="the tile scan for every batch (BATCH_MIN_QUERIES = 1) instead of the index's pick: the "
                         "measurements behind the rule")
    args = ap.parse_args()
    lengths, nq = [32, 128, 512, 2048], 64
    for n in (int(float(s)) for s in args.sizes.split(",")):
        g, q, c, _, _ = make_data(max(n, int(args.source)), 512, lengths, 0,
                                  Path(tempfile.gettempdir()) / "ctfreid-bench")
        g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
        rng = np.random.default_rng(1)
        w = None
        if args.weighted:
            wc = {32: rng.integers(0, 16, (c[32].shape[0], 32), dtype=np.uint8)}
            th, kept = matched_thresholds(c, g, [0.02, 0.005, 0.00125], wc)
            w = rng.integers(0, 16, (nq, 32), dtype=np.uint8)
        else:
            th, kept = fit_thresholds(c, g, 0.02)
        index = CtFIndex()
        index.add(g)
        del g
        q = {L: np.ascontiguousarray(v[:nq]) for L, v in q.items()}
        default = _kernels.BATCH_MIN_QUERIES
        modes = {"query by query": 1 << 62, "as picked": 1 if args.tile else default}

        def search(b: int, t: int, a: int) -> np.ndarray:
            return index.search({L: v[a : a + b] for L, v in q.items()}, 100, th, threads=t,
                                query_weights=None if w is None else w[a : a + b])[1]

        _kernels.BATCH_MIN_QUERIES = 1 << 62
        ref = np.concatenate([search(1, 1, a) for a in range(nq)])
        print(f"\nn = {n:,}, {'weighted' if w is not None else 'Hamming'} stage 1, thresholds {th} "
              f"(stage 1 keeps {kept[0]:.1%}); us a query")
        print("| threads | batch | query by query | as picked | speed-up |")
        print("|---|---|---|---|---|")
        try:
            for t in (int(x) for x in args.threads.split(",")):
                for b in (int(x) for x in args.batches.split(",")):
                    starts = range(0, nq - b + 1, b)
                    times: dict = {m: [] for m in modes}
                    for r in range(args.rounds + 1):  # round 0: compile, warm, check
                        for m, v in modes.items():
                            _kernels.BATCH_MIN_QUERIES = v
                            t0 = time.perf_counter()
                            got = [search(b, t, a) for a in starts]
                            if r:
                                times[m].append((time.perf_counter() - t0) / (len(starts) * b) * 1e6)
                            else:
                                assert np.array_equal(np.concatenate(got), ref[: len(starts) * b]), (m, b, t)
                    med = {m: float(np.median(v)) for m, v in times.items()}
                    a, p = med["query by query"], med["as picked"]
                    print(f"| {t} | {b} | {a:.0f} | {p:.0f} | {a / p:.2f}x |", flush=True)
        finally:
            _kernels.BATCH_MIN_QUERIES = default


if __name__ == "__main__":
    main()
