#!/usr/bin/env python3
"""One query through ``CtFIndex.search``: what a service pays per request around the kernel. µs a query, one
thread, top-``k``, on galleries where the kernel is short (a re-identification gallery of 2,276 items, 1e4, 1e5),
against the same search's kernel alone (``_kernels.ctf_topk`` called with the arguments the index passed it,
captured once) and faiss ``IndexBinaryFlat`` at 32 and at the longest length, in the same interleaved rounds.

    python3 benchmarks/bench_one_query.py [--sizes 2276,1e4,1e5] [--rounds 7] [--no-faiss]

Rows: Hamming stage 1 with the index's default thresholds and with thresholds passed on every call (a dict,
checked each time), and a weighted stage 1 (random 4-bit weights, ``query_weights=``) with its default. The codes
and threshold fit of ``bench_search.py`` (stage 1 keeps about 2 %); queries rotate over 64 distinct 1-D queries,
as a service receives them. "Python" is the search minus its kernel: validation, the lock, views, allocations and
the kernel's argument dispatch. Medians of ``--rounds`` rounds of 64 queries each, every one timed after an
untimed pass of the same 64 (warm caches, as a service answering one kind of request).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _kernel_call(index, query: dict, k: int, **kw) -> tuple:
    """The arguments ``index.search(query, k, **kw)`` passes to ``ctf_topk`` (captured from one call)."""
    from ctfreid.search import _kernels

    seen, orig = [], _kernels.ctf_topk
    _kernels.ctf_topk = lambda *a: (seen.append(a), orig(*a))[1]
    try:
        index.search(query, k, threads=1, **kw)
    finally:
        _kernels.ctf_topk = orig
    if len(seen) != 1:
        raise SystemExit("the search did not take ctf_topk once: nothing to compare with")
    return seen[0]


def main() -> None:
    from bench_default_fits import matched_thresholds
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex
    from ctfreid.eval.evaluate import single_thread
    from ctfreid.search import _kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2276,1e4,1e5")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args()
    lengths, nq = [32, 128, 512, 2048], 64
    faiss = None
    if not args.no_faiss:
        import faiss
    for n in (int(float(s)) for s in args.sizes.split(",")):
        g, q, c, _, _ = make_data(n, 512, lengths, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
        th, _ = fit_thresholds(c, g, 0.02)
        rng = np.random.default_rng(1)
        wth, _ = matched_thresholds(c, g, [0.02, 0.005, 0.00125],
                                    {32: rng.integers(0, 16, (c[32].shape[0], 32), dtype=np.uint8)})
        w = rng.integers(0, 16, (nq, 32), dtype=np.uint8)
        index = CtFIndex()
        index.add(g)
        index.thresholds = dict(th)
        index.weighted_thresholds = dict(wth)
        queries = [{L: q[L][i] for L in lengths} for i in range(nq)]
        explicit = {L: int(t) for L, t in th.items()}  # a fresh dict each call, as a JSON request gives
        cases = {  # name: (search of query i, keyword arguments of query i)
            "Hamming, default thresholds": (lambda i: index.search(queries[i], args.k, threads=1), lambda i: {}),
            "Hamming, thresholds per call": (
                lambda i: index.search(queries[i], args.k, dict(explicit), threads=1), lambda i: {}),
            "weighted, default thresholds": (
                lambda i: index.search(queries[i], args.k, threads=1, query_weights=w[i]),
                lambda i: {"query_weights": w[i]}),
        }
        fns = {}
        for name, (fn, kw) in cases.items():
            kernel = [_kernel_call(index, queries[i], args.k, **kw(i)) for i in range(nq)]
            fns[name] = fn
            fns[name + " (kernel)"] = (lambda i, kernel=kernel: _kernels.ctf_topk(*kernel[i]))
        if faiss is not None:
            for L in (lengths[0], lengths[-1]):
                fi = faiss.IndexBinaryFlat(L)
                fi.add(g[L])
                fns[f"faiss {L}"] = (lambda i, fi=fi, L=L: fi.search(q[L][i : i + 1], args.k))
        times = {name: [] for name in fns}
        with single_thread():
            if faiss is not None:
                faiss.omp_set_num_threads(1)
            for name, fn in fns.items():  # warm-up: compilation, scratch, caches
                for i in range(nq):
                    fn(i)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    for i in range(nq):  # untimed: the caches as this search leaves them (faiss 2048 evicts them)
                        fn(i)
                    t0 = time.perf_counter()
                    for i in range(nq):
                        fn(i)
                    times[name].append((time.perf_counter() - t0) / nq * 1e6)
        med = {name: float(np.median(t)) for name, t in times.items()}
        print(f"\nn = {n:,}, one query, one thread, top-{args.k}, median of {args.rounds} rounds, us a query")
        for name in cases:
            search, kernel = med[name], med[name + " (kernel)"]
            line = f"  {name:30s} search {search:8.1f}   kernel {kernel:8.1f}   Python {search - kernel:6.1f}"
            if faiss is not None:
                line += f"   faiss {lengths[0]} / search {med[f'faiss {lengths[0]}'] / search:5.2f}"
                line += f"   faiss {lengths[-1]} / search {med[f'faiss {lengths[-1]}'] / search:6.1f}"
            print(line)
        if faiss is not None:
            print(f"  faiss {lengths[0]}: {med[f'faiss {lengths[0]}']:.1f}   "
                  f"faiss {lengths[-1]}: {med[f'faiss {lengths[-1]}']:.1f}")


if __name__ == "__main__":
    main()
