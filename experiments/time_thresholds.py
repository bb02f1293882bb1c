#!/usr/bin/env python3
"""Top-100 and full-ranking ms per query for each thresholds file and for the longest and the shortest code
alone, timed in interleaved rounds in one process (one thread): a load change on a shared machine hits every
setting alike. The shortest code alone bounds CtF's speed-up: CtF ranks the whole gallery with it first.
A thresholds file fitted for a weighted stage 1 (``ctfreid calibrate --weighted``) is timed with the query
set's ``values`` weighted as it says (``ctfreid.search.asymmetric``). ``--index`` also times each file's
thresholds through ``CtFIndex`` (``search`` and ``rank``; it keeps the 32-bit codes as byte planes on AVX2 hosts
without AVX-512, ``ctfreid.search.index.keeps_planes``), as a service or ``ctfreid search`` runs them, and where
it keeps them also without (``benchmarks/bench_byte_planes.py``).

    python3 experiments/time_thresholds.py QUERY.npz GALLERY.npz TH1.json TH2.json ... [--rounds 15] [--index]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ctfreid import CtFIndex
from ctfreid.encoded import load_encoded
from ctfreid.eval.evaluate import single_thread
from ctfreid.search.coarse_to_fine import ctf_rank, ctf_search
from ctfreid.search.hamming import hamming_rank, hamming_topk
from ctfreid.search.thresholds import read_thresholds_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_byte_planes import without_planes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("query")
    ap.add_argument("gallery")
    ap.add_argument("thresholds", nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--index", action="store_true", help="also through CtFIndex")
    args = ap.parse_args()
    q, g = load_encoded(args.query), load_encoded(args.gallery)
    L, L1 = max(g.codes), min(g.codes)
    # the longest code alone (the baseline) and the shortest alone (a floor: CtF scans the gallery with it)
    fns = {f"{x}-bit": (lambda x=x: hamming_topk(q.codes[x], g.codes[x], 100),
                        lambda x=x: hamming_rank(q.codes[x], g.codes[x])) for x in (L, L1)}
    for path in args.thresholds:
        fits = read_thresholds_file(path)  # the weighted stage 1 when the file has one, as image searches do
        th, wt = (fits.weighted, fits.weighting) if fits.weighted is not None else (fits.hamming, None)
        w = None if wt is None else wt.weights(q.values)
        fns[Path(path).stem] = (lambda th=th, w=w: ctf_search(q.codes, g.codes, th, 100, query_weights=w),
                                lambda th=th, w=w: ctf_rank(q.codes, g.codes, th, query_weights=w))
        if args.index:
            index = CtFIndex()
            index.add(g.codes)
            fns[f"{Path(path).stem} (index)"] = (
                lambda th=th, w=w, index=index: index.search(q.codes, 100, th, threads=1, query_weights=w),
                lambda th=th, w=w, index=index: index.rank(q.codes, th, threads=1, query_weights=w))
            if index._planes is not None:
                fns[f"{Path(path).stem} (index, no planes)"] = (
                    lambda th=th, w=w, index=index: without_planes(index, index.search, q.codes, 100, th, threads=1,
                                                                   query_weights=w),
                    lambda th=th, w=w, index=index: without_planes(index, index.rank, q.codes, th, threads=1,
                                                                   query_weights=w))
    times: dict = {name: ([], []) for name in fns}
    with single_thread():
        for top, full in fns.values():  # compile and warm
            top(), full()
        for _ in range(args.rounds):
            for name, pair in fns.items():
                for j, f in enumerate(pair):
                    t = time.perf_counter()
                    f()
                    times[name][j].append((time.perf_counter() - t) * 1e3 / len(q.pids))
    out = {n: {"top100_min": min(a), "top100_median": float(np.median(a)), "full_min": min(b),
               "full_median": float(np.median(b))} for n, (a, b) in times.items()}
    ref = out[f"{L}-bit"]
    for n, r in out.items():
        print(f"{n:>24}  top-100 {r['top100_min']:.4f} ms ({ref['top100_min'] / r['top100_min']:.1f}x)  "
              f"full {r['full_min']:.4f} ms ({ref['full_min'] / r['full_min']:.1f}x)   fastest of {args.rounds} rounds")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
