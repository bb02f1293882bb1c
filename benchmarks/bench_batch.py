#!/usr/bin/env python3
"""Batches of queries on 1 and 2 threads: CtF top-100 per query against faiss ``IndexBinaryFlat`` at 32 and
2048 bits (``faiss.omp_set_num_threads`` the same), and the NumPy streaming-read floor.

    python3 benchmarks/bench_batch.py                   # n = 1e6, batches 1, 8, 64, 512
    python3 benchmarks/bench_batch.py --sizes 1e4,1e5,1e6,1e7 --batches 1,8,64,512

The codes and threshold fit are those of ``bench_search.py`` (stage 1 keeps about 2 %). Each cell is the
median over 3 passes of interleaved timed calls of the whole batch, divided by the batch size (time per
query). "floor": ``codes32.sum()`` over the same 32-bit code array (a streaming read that stays in cache),
the bound one query of a memory-bound scan cannot beat. Every batch answer is checked against the
one-query, one-thread answers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def median_time(f, budget: float, min_calls: int = 3) -> float:
    f()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget:
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    import faiss
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6")
    ap.add_argument("--batches", default="1,8,64,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per cell and pass")
    args = ap.parse_args(argv)
    lengths = [32, 128, 512, 2048]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    nq = max(batches)
    for n in (int(float(s)) for s in args.sizes.split(",")):
        g, q, c, _, _ = make_data(n, nq, lengths, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
        g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
        thresholds, kept = fit_thresholds(c, g, 0.02)
        index = CtFIndex()
        index.add(g)
        index.thresholds = thresholds
        flat = {L: faiss.IndexBinaryFlat(L) for L in (32, 2048)}
        for L, f in flat.items():
            f.add(g[L])
        one = index.search(q, 100, threads=1)
        print(f"\nn = {n:,}, thresholds {thresholds} (stage 1 keeps {kept[0]:.1%}); µs per query, medians of 3 passes")
        print("| threads | batch | CtF | faiss 32 | faiss 2048 | NumPy floor | faiss 32 / CtF | faiss 2048 / CtF | CtF / floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        floor = median_time(lambda: g[32].view(np.uint32).sum(), args.budget / 3)
        for t in threads:
            faiss.omp_set_num_threads(t)
            for b in batches:
                qb = {L: np.ascontiguousarray(v[:b]) for L, v in q.items()}
                got = index.search(qb, 100, threads=t)
                assert np.array_equal(got[1], one[1][:b]), "batch answers differ from one query at a time"
                cells = {}
                for _ in range(3):
                    for name, f in (("ctf", lambda: index.search(qb, 100, threads=t)),
                                    ("f32", lambda: flat[32].search(qb[32], 100)),
                                    ("f2048", lambda: flat[2048].search(qb[2048], 100))):
                        cells.setdefault(name, []).append(median_time(f, args.budget / 3) / b)
                ctf, f32, f2048 = (float(np.median(cells[k])) for k in ("ctf", "f32", "f2048"))
                print(f"| {t} | {b} | {ctf * 1e6:.0f} | {f32 * 1e6:.0f} | {f2048 * 1e6:.0f} | {floor * 1e6:.0f} | "
                      f"{f32 / ctf:.2f} | {f2048 / ctf:.1f} | {ctf / floor:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
