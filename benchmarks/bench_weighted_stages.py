"""What weighting the later stages costs at equal work: CtF top-100 at n codes (``bench_search.py``'s codes
and thresholds, stage 1 keeping about 2 %), one query at a time on one thread, with unit weights (every
weight 1: the same candidates and answers as Hamming distances, checked) at: no stage (Hamming), stage 1
only (``query_weights`` an array), the 128-bit stage, the 512-bit stage, both, those and stage 1, and every
stage (a mapping over lengths; weighted later stages take the row distances of ``_kernels._rows_wdist``).
Medians of interleaved rounds, µs a query, and the extra cost of a row ranked by a weighted 128- or 512-bit
stage (``ctfreid.eval.calibration.WEIGHTED_ROW_EXTRA_MS``).

    python3 benchmarks/bench_weighted_stages.py [--n 1e6] [--rounds 7]

Real weights change which candidates pass, so the time at an operating point also moves with the kept
fractions (``docs/results-cuhk03.md``, "Weighting the later stages too?").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import fit_thresholds, make_data  # noqa: E402

from ctfreid import CtFIndex  # noqa: E402
from ctfreid.search.hamming import hamming_distances  # noqa: E402

LENGTHS = (32, 128, 512, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--queries", type=int, default=128)
    a = ap.parse_args()
    n, nq = int(a.n), a.queries
    g, q, c, _, _ = make_data(n, 512, LENGTHS, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
    g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
    thr, kept = fit_thresholds(c, g, 0.02)
    index = CtFIndex()
    index.add(g)
    ones = {L: np.ones((nq, L), np.uint8) for L in LENGTHS}
    settings = {"Hamming": None, "stage 1 weighted": ones[32], "128 weighted": {128: ones[128]},
                "512 weighted": {512: ones[512]}, "128 and 512 weighted": {L: ones[L] for L in (128, 512)},
                "32, 128, 512 weighted": {L: ones[L] for L in (32, 128, 512)}, "every stage weighted": ones}
    singles = [{L: v[i] for L, v in q.items()} for i in range(nq)]

    def weights(w, i):
        if w is None:
            return None
        return w[i] if not isinstance(w, dict) else {L: x[i] for L, x in w.items()}

    ref = [index.search(x, 100, thr, threads=1)[1] for x in singles]
    for name, w in settings.items():  # same answers (and compiled before timing)
        for i, x in enumerate(singles):
            assert (index.search(x, 100, thr, threads=1, query_weights=weights(w, i))[1] == ref[i]).all(), name
    times: dict = {name: [] for name in settings}
    for _ in range(a.rounds):
        for name, w in settings.items():
            t = time.perf_counter()
            for i, x in enumerate(singles):
                index.search(x, 100, thr, threads=1, query_weights=weights(w, i))
            times[name].append((time.perf_counter() - t) / nq * 1e6)
    base = float(np.median(times["Hamming"]))
    print(f"n = {n:,}, thresholds {thr}, stage 1 keeps {100 * kept[0]:.1f} %; one query, 1 thread, top-100, "
          f"µs a query (median of {a.rounds} interleaved rounds of {nq} queries); unit weights: same answers")
    for name, ts in times.items():
        m = float(np.median(ts))
        print(f"  {name:>22}: {m:7.0f}  ({m / base:.2f}x Hamming)")
    # the extra cost of a row ranked by one weighted stage (calibration.WEIGHTED_ROW_EXTRA_MS): rows ranked there
    alive = hamming_distances(q[32][:nq], g[32]) <= thr[32]
    rows = {128: alive.sum(axis=1).mean()}
    alive &= hamming_distances(q[128][:nq], g[128]) <= thr[128]
    rows[512] = alive.sum(axis=1).mean()
    for L in (128, 512):
        extra = (float(np.median(times[f"{L} weighted"])) - base) * 1e3 / rows[L]
        print(f"  {L}-bit stage weighted: {rows[L]:.0f} rows a query, {extra:.1f} ns more a row, "
              f"{extra / (L // 64):.2f} ns a 64-bit word")


if __name__ == "__main__":
    main()
