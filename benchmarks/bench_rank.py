"""Full rankings (what mAP needs, and what the paper times): µs a query on one thread, for the galleries of
re-identification evaluations (2,276 and 7,365 items: the CUHK03 dev gallery and all its crops; 15,913:
Market-1501's gallery), against NumPy's stable ``argsort`` of the same distances in the same run.

    python3 benchmarks/bench_rank.py [--sizes 2276,7365,15913] [--queries 600] [--rounds 9]

Rows: ``hamming_rank`` at 32 and 2048 bits (distances and a stable counting sort), ``weighted_rank`` with
4-bit weights on the 32-bit code (the default stage 1 for searches by image), ``ctf_rank`` with
``bench_search.py``'s thresholds (stage 1 keeps about 2 %), and ``counting_sort`` alone on the 32-bit
distances. "NumPy" = ``np.argsort(D, kind="stable")`` of the same distances (the sort alone, without
the distances or the sorted-distance output). Each call ranks ``--queries`` queries; the minimum and the
median of interleaved rounds are printed. Every ranking is checked against NumPy's before timing.
To compare two commits, run this file with ``PYTHONPATH`` pointing at each tree in turn.
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

import ctfreid  # noqa: E402
from ctfreid.eval.evaluate import single_thread  # noqa: E402
from ctfreid.search.asymmetric import weighted_distances, weighted_rank  # noqa: E402
from ctfreid.search.coarse_to_fine import ctf_rank  # noqa: E402
from ctfreid.search.hamming import counting_sort, hamming_distances, hamming_rank  # noqa: E402

LENGTHS = (32, 128, 512, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2276,7365,15913")
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    print(f"ctfreid from {Path(ctfreid.__file__).parent}")
    print("| n | ranking | ctfreid µs a query (min / median) | NumPy stable argsort | NumPy / ctfreid |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in (int(float(s)) for s in a.sizes.split(",")):
        g, q, c, _, _ = make_data(n, a.queries, list(LENGTHS), 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
        th, _ = fit_thresholds(c, g, 0.02)
        w = rng.integers(0, 16, (a.queries, 32), dtype=np.uint8)  # 4-bit weights, as calibrate's default
        d32, d2048 = hamming_distances(q[32], g[32]), hamming_distances(q[2048], g[2048])
        dw = weighted_distances(q[32], w, g[32])
        runs = {  # name: (ctfreid call, the distances whose stable argsort is its order)
            "hamming_rank 32": (lambda: hamming_rank(q[32], g[32]), d32),
            "hamming_rank 2048": (lambda: hamming_rank(q[2048], g[2048]), d2048),
            "weighted_rank 32 (4-bit)": (lambda: weighted_rank(q[32], w, g[32]), dw),
            "counting_sort 32": (lambda: counting_sort(d32, 32), d32),
            "ctf_rank 32/128/512/2048": (lambda: ctf_rank(q, g, th), None),
        }
        with single_thread():
            for name, (f, d) in runs.items():  # compile, warm, check
                out = f()
                I = out if isinstance(out, np.ndarray) else out[1]
                if d is not None:
                    assert np.array_equal(I, np.argsort(d, axis=1, kind="stable")), name
            times = {name: [] for name in runs}
            base = {name: [] for name, (_, d) in runs.items() if d is not None}
            for _ in range(a.rounds):
                for name, (f, d) in runs.items():
                    t = time.perf_counter()
                    f()
                    times[name].append((time.perf_counter() - t) * 1e6 / a.queries)
                    if name in base:
                        t = time.perf_counter()
                        np.argsort(d, axis=1, kind="stable")
                        base[name].append((time.perf_counter() - t) * 1e6 / a.queries)
        for name, ts in times.items():
            cell = f"{min(ts):.1f} / {np.median(ts):.1f}"
            if name in base:
                b = base[name]
                print(f"| {n:,} | {name} | {cell} | {min(b):.1f} / {np.median(b):.1f} | {min(b) / min(ts):.1f}x |")
            else:
                print(f"| {n:,} | {name} | {cell} | | |")


if __name__ == "__main__":
    main()
