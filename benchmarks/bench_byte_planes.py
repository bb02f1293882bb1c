#!/usr/bin/env python3
"""``CtFIndex.search`` with the byte planes the index keeps on AVX2 hosts without AVX-512 (``index.keeps_planes``)
against the same index with them set aside for the call (its ``_planes``: stage 1 as before, the popcount masks
for one query; the same arrays otherwise, so the same caches), on the codes and threshold fit of
``bench_search.py``; the weighted stage 1 (the default for searches by image) gets random 3-bit weights and the
threshold that keeps the same fraction (``bench_asymmetric.py``).

    python3 benchmarks/bench_byte_planes.py --n 1e6 --batches 4,16,64

Both must give the same answers (checked). One thread, top-100, wall time, median of ``--rounds`` interleaved
rounds of 64 distinct queries (in batches of each ``--batches`` size too), us a query, and the NumPy floor of
issue 15 (``codes32.sum()``, cache-warm: the median of 15 sums back to back).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def without_planes(index, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the index's byte planes set aside (no writes may run meanwhile): the index as
    it searches where it keeps none. Also used by ``experiments/time_thresholds.py --index``."""
    planes, index._planes = index._planes, None
    try:
        return fn(*args, **kwargs)
    finally:
        index._planes = planes


def main() -> None:
    from bench_asymmetric import weighted_threshold
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex
    from ctfreid.search import _kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1e6")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batches", default="8,64", help="batch sizes besides one query")
    args = ap.parse_args()
    if not _kernels.BYTE_PLANES:
        sys.exit("this host has AVX-512 (or no AVX2): CtFIndex keeps no byte planes here, nothing to compare")
    n, nq, k = int(float(args.n)), 64, args.k
    g, q, calib, _, _ = make_data(n, 512, [32, 128, 512, 2048], 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
    g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
    thr, kept = fit_thresholds(calib, g, 0.02)
    rng = np.random.default_rng(1)
    t1w, kept_w = weighted_threshold(calib, rng.integers(0, 8, (calib[32].shape[0], 32), dtype=np.uint8), g[32],
                                     kept[0])
    thr_w = {**thr, 32: t1w}
    w = rng.integers(0, 8, (nq, 32), dtype=np.uint8)
    index = CtFIndex()
    index.add(g)
    floor_codes = np.ascontiguousarray(g[32]).view(np.uint32)
    del g
    queries = {L: np.ascontiguousarray(c[:nq]) for L, c in q.items()}
    one = [{L: c[i] for L, c in queries.items()} for i in range(nq)]

    sizes = [int(x) for x in args.batches.split(",") if x]

    def batches(b: int, th: dict, weights: np.ndarray | None) -> list:
        return [index.search({L: c[a : a + b] for L, c in queries.items()}, k, th, threads=1,
                             query_weights=None if weights is None else weights[a : a + b]) for a in range(0, nq, b)]

    def cases() -> dict:
        out = {
            "hamming, one query": lambda: [index.search(x, k, thr, threads=1) for x in one],
            "weighted, one query": lambda: [index.search(x, k, thr_w, threads=1, query_weights=w[i])
                                            for i, x in enumerate(one)],
        }
        for b in sizes:
            out[f"hamming, batches of {b}"] = lambda b=b: batches(b, thr, None)
            out[f"weighted, batches of {b}"] = lambda b=b: batches(b, thr_w, w)
        return out

    a = cases()
    for name, f in a.items():  # compile, and the same answers
        for x, y in zip(f(), without_planes(index, f)):
            assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]), name
    times: dict = {(name, side): [] for name in a for side in ("planes", "none")}
    floor: list = []
    for _ in range(args.rounds):
        for name, f in a.items():
            for side, run in (("planes", f), ("none", lambda f=f: without_planes(index, f))):
                t0 = time.perf_counter()
                run()
                times[name, side].append((time.perf_counter() - t0) / nq * 1e6)
    for _ in range(15):  # cache-warm, back to back, as bench_batch.py's floor
        t0 = time.perf_counter()
        floor_codes.sum()
        floor.append((time.perf_counter() - t0) * 1e6)
    fl = float(np.median(floor))
    print(f"n = {n:,}; thresholds {thr}, stage 1 keeps {100 * kept[0]:.2f} %; weighted t1 = {t1w} "
          f"(keeps {100 * kept_w:.2f} %); top-{k}, one thread, us a query, median of {args.rounds}; "
          f"NumPy floor {fl:.0f} us")
    print("| search | without planes | with planes | speed-up | with planes / floor |")
    print("|---|---|---|---|---|")
    for name in a:
        t_none, t_pl = (float(np.median(times[name, s])) for s in ("none", "planes"))
        print(f"| {name} | {t_none:,.0f} | {t_pl:,.0f} | {t_none / t_pl:.2f}x | {t_pl / fl:.2f} |")


if __name__ == "__main__":
    main()
