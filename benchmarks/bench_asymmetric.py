#!/usr/bin/env python3
"""The cost of a weighted (asymmetric) stage 1 against the Hamming one, through ``CtFIndex.search``.

    python3 benchmarks/bench_asymmetric.py                 # n = 1e4, 1e5, 1e6
    python3 benchmarks/bench_asymmetric.py --sizes 1e6 --rounds 9

The codes of ``bench_search.py`` (32/128/512/2048 bits, cached). The Hamming thresholds keep about
``--keep`` of the gallery at stage 1 and 25 % of the previous candidates at each later stage; the weighted
stage 1 gets random 3-bit weights per query and the weighted threshold that keeps the same fraction on the
calibration queries, so that both searches re-rank about as many candidates and the difference is the
stage-1 scan. One thread, top-``k``; one query at a time and a batch of 64 (the weighted stage 1 takes
the tile scan from ``_kernels.WEIGHTED_TILE_MIN_N`` codes on, else runs query by query). Interleaved
rounds, medians, us a query.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def weighted_threshold(calib: dict, weights: np.ndarray, gallery32: np.ndarray, keep: float) -> tuple[int, float]:
    """The weighted stage-1 threshold whose kept fraction on the calibration queries is closest to ``keep``."""
    from ctfreid.search.asymmetric import max_distance, weighted_distances

    n = gallery32.shape[0]
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 100_000), replace=False))
    d = weighted_distances(calib[32], weights, gallery32[sample])
    frac = np.cumsum(np.bincount(d.ravel(), minlength=max_distance(32) + 1)) / d.size
    t = int(np.argmin(np.abs(frac - keep)))
    return t, float(frac[t])


def main() -> None:
    from bench_search import fit_thresholds, index_and_queries, make_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6")
    ap.add_argument("--keep", type=float, default=0.02)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    lengths = [32, 128, 512, 2048]
    rng = np.random.default_rng(1)
    for n in (int(float(x)) for x in args.sizes.split(",")):
        g, q, calib, _, _ = make_data(n, 512, lengths, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
        thr, kept = fit_thresholds(calib, g, args.keep)
        wc = rng.integers(0, 8, (calib[32].shape[0], 32), dtype=np.uint8)
        t1w, kept_w = weighted_threshold(calib, wc, g[32], kept[0])
        thr_w = {**thr, 32: t1w}
        nq = 64
        index, queries, one = index_and_queries(g, q, nq)
        del g
        w = rng.integers(0, 8, (nq, 32), dtype=np.uint8)
        cases = {
            "hamming, one query": lambda: [index.search(x, args.k, thr, threads=1) for x in one],
            "weighted, one query": lambda: [index.search(x, args.k, thr_w, threads=1, query_weights=w[i])
                                            for i, x in enumerate(one)],
            "hamming, batch of 64": lambda: index.search(queries, args.k, thr, threads=1),
            "weighted, batch of 64": lambda: index.search(queries, args.k, thr_w, threads=1, query_weights=w),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds + 1):  # round 0 compiles and warms
            for name, f in cases.items():
                t0 = time.perf_counter()
                f()
                if r:
                    times[name].append((time.perf_counter() - t0) / nq * 1e6)
        med = {name: float(np.median(t)) for name, t in times.items()}
        print(f"n = {n:,}: Hamming thresholds {thr} keep {100 * kept[0]:.2f} % at stage 1; weighted t1 = {t1w} keeps "
              f"{100 * kept_w:.2f} % (3-bit weights); one thread, top-{args.k}, us a query, median of {args.rounds} "
              "interleaved rounds")
        for name, t in med.items():
            base = med[name.replace("weighted", "hamming")]
            print(f"  {name:24s} {t:8.1f}  ({t / base:.2f}x the Hamming stage 1)")


if __name__ == "__main__":
    main()
