#!/usr/bin/env python3
"""One query at a time with ``k`` changing from call to call (a service's requests), and ``range_search``,
against the same queries at a fixed k = 100, in the same run (one thread, µs per query).

    python3 benchmarks/bench_varying_k.py [--n 1e6] [--rounds 5]

The codes and thresholds are ``bench_search.py``'s (stage 1 keeps about 2 %). "k alternating" searches the
same 64 queries with k = 10 and 100 in turn: a search's scratch memory, kept per thread, must not be made
again for every new k (fresh memory costs page faults). ``range_search`` (radius = the longest length, so
every item that passes the thresholds) runs the kernels twice: once to count the items that pass, once for
a top-k of that many.
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
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, lengths = int(args.n), [32, 128, 512, 2048]
    g, q, calib, _, _ = make_data(n, 512, lengths, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
    thr, kept = fit_thresholds(calib, {L: v[:n] for L, v in g.items()}, 0.02)
    index = CtFIndex()
    index.add({L: np.ascontiguousarray(v[:n]) for L, v in g.items()})
    index.thresholds = thr
    del g
    queries = [{L: np.ascontiguousarray(v[i : i + 1]) for L, v in q.items()} for i in range(64)]
    cases = {
        "k = 100": lambda: [index.search(x, 100, threads=1) for x in queries],
        "k alternating 10 / 100": lambda: [index.search(x, 10 if i % 2 else 100, threads=1)
                                           for i, x in enumerate(queries)],
        "range_search": lambda: [index.range_search(x, lengths[-1]) for x in queries],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds + 1):
        for name, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) / len(queries) * 1e6)
    base = np.median(times["k = 100"][1:])
    print(f"n = {n:,}, thresholds {thr} (stage 1 keeps {100 * kept[0]:.1f} %); one thread, us a query, "
          f"median of {args.rounds} interleaved rounds")
    for name, t in times.items():
        print(f"  {name:24s} {np.median(t[1:]):7.0f}  ({np.median(t[1:]) / base:.2f}x k = 100)")


if __name__ == "__main__":
    main()
