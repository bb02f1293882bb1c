#!/usr/bin/env python3
"""The default calibration's two operating points at scale: the Hamming fit (searches by codes) against the
weighted stage 1 beside it (searches by image), each at the fractions it keeps on real validation codes.

    python3 benchmarks/bench_default_fits.py RUN/thresholds.json [...] --n 1e6

Each thresholds file is one written by ``ctfreid calibrate`` (default target, with its ``weighted_stage1``).
Its two fits kept, on the run's validation identities, a fraction of the gallery after each stage
(``fit.keep_fractions``). Real galleries of 10^6 crops are not at hand, so the codes are those of
``bench_search.py`` (cached) and each fit becomes the thresholds that keep the same cumulative fractions on
the generated calibration queries (the weighted one with random 4-bit weights per query at each length its
weighting weights: stage 1, and the later lengths of ``weights.later`` when it was fitted with
``--weight-later``): the later stages re-rank as many candidates per query as the real fit would at that
size. What differs from real
codes is which items pass, not how many. ``CtFIndex.search``, top-``k``: one query at a time on one
thread, and batches of 64 on 1 and 2 threads; interleaved rounds, medians, us a query.

``--baseline`` also times the longest code alone in the same rounds (``hamming_topk`` over the same gallery,
as ``experiments/time_thresholds.py`` times it on real galleries; 2 threads: the batch split as ``CtFIndex``
splits it, ``parallel.run_chunks``) and prints each fit's speed-up over it: the issue's bar of CtF against the 2048-bit code,
at the size the fit was made for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def matched_thresholds(calib: dict, gallery: dict, fractions: list[float],
                       weights: dict | None = None) -> tuple[dict, list[float]]:
    """Thresholds whose cumulative kept fractions of the gallery on the calibration queries are closest to
    ``fractions`` (one per stage but the last); the lengths of ``weights`` (``{length: uint8 [nq, length]}``)
    weighted."""
    weights = weights or {}
    from ctfreid.search.asymmetric import max_distance, weighted_distances
    from ctfreid.search.hamming import hamming_distances

    lengths = sorted(gallery)
    n = next(iter(gallery.values())).shape[0]
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 100_000), replace=False))
    cands = [sample] * len(calib[lengths[0]])
    thresholds, got = {}, []
    for s, L in enumerate(lengths[:-1]):
        if L in weights:
            d = [weighted_distances(calib[L][i], weights[L][i], gallery[L][c]) for i, c in enumerate(cands)]
            top = max_distance(L)
        else:
            d = [hamming_distances(calib[L][i], gallery[L][c]) for i, c in enumerate(cands)]
            top = L
        frac = np.cumsum(np.bincount(np.concatenate(d), minlength=top + 1)) / (len(d) * sample.size)
        t = int(np.argmin(np.abs(frac - fractions[s])))
        thresholds[L] = t
        got.append(float(frac[t]))
        cands = [c[x <= t] for c, x in zip(cands, d)]
    return thresholds, got


def main() -> None:
    from bench_search import index_and_queries, make_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fits", nargs="+", type=Path, help="thresholds .json files of 'ctfreid calibrate'")
    ap.add_argument("--n", default="1e6")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", action="store_true", help="also time the longest code alone (see above)")
    args = ap.parse_args()
    lengths = [32, 128, 512, 2048]
    n = int(float(args.n))
    g, q, calib, _, _ = make_data(n, 512, lengths, 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
    rng = np.random.default_rng(1)
    wc = {L: rng.integers(0, 16, (calib[L].shape[0], L), dtype=np.uint8) for L in lengths}
    nq = 64
    wq = {L: rng.integers(0, 16, (nq, L), dtype=np.uint8) for L in lengths}
    points = []
    for path in args.fits:
        doc = json.loads(path.read_text())
        ham = [doc["fit"]["keep_fractions"][str(L)] for L in lengths[1:]]
        section = doc["weighted_stage1"]
        wei = [section["fit"]["keep_fractions"][str(L)] for L in lengths[1:]]
        weighted = [lengths[0], *sorted(int(L) for L in section["weights"].get("later", {}))]
        th, got = matched_thresholds(calib, g, ham)
        thw, gotw = matched_thresholds(calib, g, wei, {L: wc[L] for L in weighted})
        w = wq[lengths[0]] if len(weighted) == 1 else {L: wq[L] for L in weighted}
        points.append((path, ham, got, th, wei, gotw, thw, w, weighted))
    index, queries, one = index_and_queries(g, q, nq)
    longest = baseline_cases(g[lengths[-1]], queries[lengths[-1]], args.k) if args.baseline else None
    del g
    print(f"n = {n:,}, top-{args.k}, us a query, median of {args.rounds} interleaved rounds")
    print("| fit | kept after 32 / 128 / 512 bits (validation; matched here) | thresholds | one query, 1 thread | "
          "batch of 64, 1 thread | batch of 64, 2 threads |")
    print("|---|---|---|---|---|---|")
    for path, ham, got, th, wei, gotw, thw, w, weighted in points:
        cases = {}
        for name, t, qw in (("Hamming", th, None), ("weighted", thw, w)):
            def single(t=t, qw=qw):
                for i, x in enumerate(one):
                    index.search(x, args.k, t, threads=1, query_weights=_row(qw, i))
            cases[name] = (single,
                           lambda t=t, qw=qw: index.search(queries, args.k, t, threads=1, query_weights=qw),
                           lambda t=t, qw=qw: index.search(queries, args.k, t, threads=2, query_weights=qw))
        if longest is not None:
            cases[f"{lengths[-1]}-bit"] = longest
        times = {(name, j): [] for name in cases for j in range(3)}
        for r in range(args.rounds + 1):  # round 0 compiles and warms
            for name, fs in cases.items():
                for j, f in enumerate(fs):
                    t0 = time.perf_counter()
                    f()
                    if r:
                        times[name, j].append((time.perf_counter() - t0) / nq * 1e6)
        med = {key: float(np.median(v)) for key, v in times.items()}
        for name, fr, gt, t in (("Hamming", ham, got, th), ("weighted", wei, gotw, thw)):
            kept = " / ".join(f"{100 * a:.1f} ({100 * b:.1f})" for a, b in zip(fr, gt))
            cells = []
            for j in range(3):
                ratio = med[name, j] / med["Hamming", j]
                cells.append(f"{med[name, j]:.0f}" + (f" ({ratio:.2f}x)" if name == "weighted" else ""))
            thr = "/".join(str(t[L]) for L in lengths[:-1])
            label = name if name == "Hamming" else f"weighted {'/'.join(map(str, weighted))}"
            if longest is not None:
                base = f"{lengths[-1]}-bit"
                cells = [f"{c}, {med[base, j] / med[name, j]:.1f}x faster" for j, c in enumerate(cells)]
            print(f"| {path.parent.name}/{path.stem} {label} | {kept} % | {thr} | " + " | ".join(cells) + " |")
        if longest is not None:
            print(f"| {lengths[-1]}-bit code alone | | | " + " | ".join(f"{med[base, j]:.0f}" for j in range(3)) + " |")


def baseline_cases(gallery, queries, k: int) -> tuple:
    """One query at a time, a batch on 1 thread and on 2 threads, of ``hamming_topk`` over ``gallery`` alone."""
    from ctfreid.search.hamming import hamming_topk
    from ctfreid.search.parallel import run_chunks

    def chunk(a: int, b: int):
        return hamming_topk(queries[a:b], gallery, k)

    nq, n = queries.shape[0], gallery.shape[0]
    return (lambda: [hamming_topk(x, gallery, k) for x in queries],
            lambda: hamming_topk(queries, gallery, k),
            lambda: run_chunks(chunk, nq, 2, work_per_query=n))


def _row(weights, i: int):
    """Query ``i``'s weights (an array or ``{length: array}``), or None."""
    if weights is None:
        return None
    return {L: w[i] for L, w in weights.items()} if isinstance(weights, dict) else weights[i]


if __name__ == "__main__":
    main()
