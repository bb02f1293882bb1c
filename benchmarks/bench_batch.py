#!/usr/bin/env python3
"""Batches of queries on 1 and 2 threads: CtF top-100 per query against faiss ``IndexBinaryFlat`` at 32 and
2048 bits (``faiss.omp_set_num_threads`` the same), and the NumPy streaming-read floor; then where a query's
time goes.

    python3 benchmarks/bench_batch.py                                  # n = 1e6, batches 1, 8, 64, 512
    python3 benchmarks/bench_batch.py --sizes 1e4,1e5,1e6,1e7 --budget 0.5
    python3 benchmarks/bench_batch.py --sizes 1e6,1e7 --target-rounds 9     # issue 15's targets, interleaved

The codes and threshold fit are those of ``bench_search.py`` (stage 1 keeps about 2 %; 1e7 codes take ~12
minutes to generate once, then are cached in $TMPDIR/ctfreid-bench, and ~10 GB of memory). Every cell runs
the same ``--queries`` distinct queries (512): a call searches all of them in consecutive batches of the
cell's size (CtF's time depends on the queries' candidate counts, which vary by 10 % between batches of 64,
and a batch searched again finds its candidates' codes in cache), and each cell is the median over 3 passes
of interleaved timed calls, divided by the number of queries (time per query). "CtF query by query": the
same batch with the one-query kernel (the code before the batch scan: ``_kernels.BATCH_MIN_QUERIES`` set above
the batch size). "floor": ``codes32.view(np.uint32).sum()`` over the same 32-bit codes, the bound one query
of a memory-bound scan cannot beat. faiss at 2048 bits runs on at most ``--faiss2048-work`` query x code
pairs a call (a cell marked * timed a sub-batch: faiss's time per query then is that of the smaller batch);
faiss runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (see ``main``). Every batch answer is
checked against the one-query, one-thread answers.

On a loaded machine a call's wall time includes the time its threads waited for a core, the more often
the longer the call; so the 1-thread rows are also printed in CPU time of the calling thread (faiss with
one OpenMP thread runs in it too), and the breakdown (one thread, µs per query) is in CPU time: "scan" =
stage 1 with an impossible threshold (the 64-code masks alone; byte-plane masks, which take thresholds 0..254,
with 0; one query reads the index's planes where it keeps them); "survivors" = stage 1 with the real threshold
minus "scan" (extracting the stage-1 candidates and their stage-2 distances; in the batch scan also keeping
those within the stage-2 threshold); "re-rank" = the distances of stages 3 .. S of the
stage-2 candidates; "top-k" = the rest of the kernel (compactions between the later stages, ordering,
the first k); "Python" = ``search`` minus the kernel (validation, views, ids).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def median_time(f, budget: float, min_calls: int = 1, cpu: list | None = None) -> float:
    """Median wall time of ``f()`` over calls for ``budget`` seconds (at least ``min_calls``), after one
    warm-up; appends the median CPU time of the calling thread to ``cpu`` if given."""
    f()
    times, cpus, start = [], [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget:
        c, t = time.thread_time(), time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    if cpu is not None:
        cpu.append(float(np.median(cpus)))
    return float(np.median(times))


def one_by_one(index, qb: dict, threads: int) -> None:
    """The batch with the one-query kernel (``ctf_topk``, query after query; threads as for the batch):
    the code before the batch scan, the same-run baseline of "query by query / CtF"."""
    from ctfreid.search import _kernels

    keep = _kernels.BATCH_MIN_QUERIES
    _kernels.BATCH_MIN_QUERIES = 1 << 62
    try:
        index.search(qb, 100, threads=threads)
    finally:
        _kernels.BATCH_MIN_QUERIES = keep


def breakdown(index, q: dict, b: int, budget: float) -> dict[str, float]:
    """µs per query of the parts of one thread's top-100 of a batch of ``b`` queries (see the docstring),
    with the kernel ``CtFIndex.search`` uses for that batch size (``ctf_topk_batch`` or ``ctf_topk``; the
    latter over 64 distinct queries, so that no query finds its candidates' codes cached by its last run)."""
    from ctfreid.search import _kernels as K
    from ctfreid.search.index import _Scratch

    def median_cpu(f, budget: float) -> float:
        cpu: list = []
        median_time(f, budget, cpu=cpu)
        return cpu[0]

    batched = K.tile_scan(b, 32)
    if not batched:  # batches of b run query by query: time b at a time over up to 64 distinct queries
        b = min(64, q[32].shape[0]) // b * b
    qv, _ = index._queries({L: v[:b] for L, v in q.items()})  # validated, with the kernels' views
    Q1, Qr = qv.first, qv.later
    G1, Gr, Ls, qoff = index._stage_views()[:4]
    thr = index._thresholds(None)
    n, S = G1.shape[0], len(Ls)
    g1 = K.words32(G1).reshape(n)
    hi2 = K.stage2_keep(n, thr, Ls)
    singles = [{L: v[i : i + 1] for L, v in q.items()} for i in range(b)]
    parts = [qv.rows(i, i + 1) for i in range(b)]
    if batched:
        total = median_cpu(lambda: index.search({L: v[:b] for L, v in q.items()}, 100, threads=1), budget)
        kernel = median_cpu(lambda: index._positions(qv, 100, thr), budget)
    else:
        total = median_cpu(lambda: [index.search(x, 100, threads=1) for x in singles], budget)
        kernel = median_cpu(lambda: [index._positions(x, 100, thr) for x in parts], budget)
    if batched:  # ctf_topk_batch: the tile scan (_scan_tiles) on its own
        bufI, bufD = _Scratch().batch_buffers(n, b, len(index.lengths), index._batch_room(n))  # the index's own sizes
        cnt, c1 = np.zeros(bufI.shape[0], np.int64), np.zeros(bufI.shape[0], np.int64)

        def stage1(hi: int, h2: int) -> None:
            for a0 in range(0, b, bufI.shape[0]):
                cnt[:], c1[:] = 0, 0
                K._scan_tiles(Q1, g1, n, hi, h2, Qr, qoff, Gr[0], index._live, a0, min(bufI.shape[0], b - a0),
                              bufI, bufD, cnt, c1, None)  # None: the Hamming stage 1 (no weight planes)

        # byte-plane masks (AVX2 hosts) take thresholds 0..254: 0 lets only exact copies through, which the
        # stage-2 threshold -1 then drops; the popcount masks take -1 (nothing passes)
        scan = median_cpu(lambda: stage1(0 if K.BYTE_PLANES else -1, -1), budget)
        survivors = median_cpu(lambda: stage1(int(thr[0]), hi2), budget)
        stage1(int(thr[0]), int(thr[1]))  # the last group's stage-2 candidates, for the re-rank timing
        a0 = (b - 1) // bufI.shape[0] * bufI.shape[0]
        cands = [(a0 + a, bufI[a, : cnt[a]].copy()) for a in range(b - a0) if cnt[a] <= bufI.shape[1]]
    else:  # ctf_topk: one query at a time (stage 1, then the stage-2 distances of all its candidates)
        big = n + 2 * K.BLOCK
        ids, d0, d1 = np.empty(big, np.int64), np.empty(big, np.int32), np.empty(big, np.int32)
        dd = np.zeros(K.BLOCK + 1, np.int32)
        planes = index._planes  # the index's byte planes, which one query's stage 1 reads where it keeps them

        def stage1(hi: int, keep: list | None = None) -> None:
            for i in range(b):
                if planes is not None:
                    c = K._within_planes(Q1, None, i, planes, g1, n, hi, ids, d0, index._live)
                else:
                    c = K._within1(Q1[i], g1, n, hi, ids, d0, dd, index._live)
                K._later_dist(Qr, qoff, Gr, 1, i, ids, c, d1)
                if keep is not None:
                    keep.append((i, ids[:c][d1[:c] <= thr[1]].copy()))

        scan = median_cpu(lambda: stage1(0 if planes is not None else -1), budget)  # (planes: 0..254, see above)
        survivors = median_cpu(lambda: stage1(int(thr[0])), budget)
        cands: list = []
        stage1(int(thr[0]), cands)
    out = np.empty(n + 2 * K.BLOCK, np.int32)

    def rerank() -> None:
        for i, rows in cands:
            for s in range(2, S):
                K._later_dist(Qr, qoff, Gr, s, i, rows, rows.shape[0], out)
                if s < S - 1:
                    rows = rows[out[: rows.shape[0]] <= thr[s]]

    per = len(cands)
    re = median_cpu(rerank, budget) / per
    scan, survivors, kernel, total = scan / b, survivors / b, kernel / b, total / b
    return {"scan": scan, "survivors": survivors - scan, "re-rank": re, "top-k": kernel - survivors - re,
            "Python": total - kernel, "total": total}


def print_breakdown(index, q: dict, n: int, batches: list[int], nq: int, budget: float) -> None:
    """The breakdown table for batches of 1 and 64 (those of ``batches``)."""
    print(f"\nwhere the time goes (n = {n:,}, 1 thread, CPU time, µs per query)")
    print("| batch | scan | survivors | re-rank | top-k | Python | total |")
    print("|---|---|---|---|---|---|---|")
    for b in sorted({1, min(64, nq)} & set(batches) or {batches[0]}):
        parts = breakdown(index, q, b, budget / 3)
        cols = ("scan", "survivors", "re-rank", "top-k", "Python", "total")
        print(f"| {b} | " + " | ".join(f"{parts[k] * 1e6:.0f}" for k in cols) + " |", flush=True)


def target_rounds(index, f32, q: dict, g32: np.ndarray, rounds: int) -> None:
    """Issue 15's targets in interleaved rounds (this VM's faiss moves by up to 2x between runs, so each round
    compares the methods minutes apart at most): per round, 512 queries in batches of 64 on 2 threads (CtF,
    faiss 32), one query at a time on one thread (CtF, 64 distinct queries) and the floor (median of 5 sums)."""
    import faiss

    nq = q[32].shape[0] // 64 * 64

    def per_query(f, m: int) -> float:
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) / m * 1e6

    batches = [{L: np.ascontiguousarray(v[a : a + 64]) for L, v in q.items()} for a in range(0, nq, 64)]
    singles = [{L: v[i] for L, v in q.items()} for i in range(64)]
    faiss.omp_set_num_threads(2)
    rows = []
    print(f"\n{rounds} interleaved rounds, us a query")
    print("| round | CtF, batches of 64, 2 threads | faiss 32, the same | faiss 32 / CtF | CtF, one query, 1 thread "
          "| floor | CtF / floor |")
    print("|---|---|---|---|---|---|---|")
    for r in range(rounds + 1):  # the first round warms up
        ctf = per_query(lambda: [index.search(b, 100, threads=2) for b in batches], nq)
        fs = per_query(lambda: [f32.search(b[32], 100) for b in batches], nq)
        one = per_query(lambda: [index.search(x, 100, threads=1) for x in singles], 64)
        floor = float(np.median([per_query(lambda: g32.view(np.uint32).sum(), 1) for _ in range(5)]))
        if r:
            rows.append((fs / ctf, one / floor))
            print(f"| {r} | {ctf:.0f} | {fs:.0f} | {fs / ctf:.2f} | {one:.0f} | {floor:.0f} | {one / floor:.2f} |",
                  flush=True)
    a, b = np.array(rows).T
    print(f"medians of the rounds' ratios: faiss 32 / CtF {np.median(a):.2f} ({a.min():.2f}-{a.max():.2f}); "
          f"one query / floor {np.median(b):.2f} ({b.min():.2f}-{b.max():.2f})")


def main(argv=None) -> int:
    # faiss's OpenMP threads spin while they wait; on a shared machine one descheduled thread then stalls
    # the others for milliseconds (2 threads measured 10-100x slower than 1 under load), so they sleep
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6", help="gallery sizes, comma-separated (e.g. 1e4,1e5,1e6,1e7)")
    ap.add_argument("--batches", default="1,8,64,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per cell and pass")
    ap.add_argument("--queries", type=int, default=512,
                    help="distinct queries every cell runs (at least the largest batch; default 512)")
    ap.add_argument("--breakdown-only", action="store_true", help="only the breakdown of where the time goes")
    ap.add_argument("--target-rounds", type=int, default=0, metavar="R",
                    help="instead of the table: issue 15's targets in R interleaved rounds (target_rounds)")
    ap.add_argument("--faiss2048-work", type=float, default=1e8,
                    help="at most this many query x code pairs a faiss 2048-bit call (larger batches: a sub-batch)")
    args = ap.parse_args(argv)
    lengths = [32, 128, 512, 2048]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    nq = max(args.queries, max(batches))
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
        g32 = g[32]
        del g
        if args.breakdown_only:
            print_breakdown(index, q, n, batches, nq, args.budget)
            continue
        if args.target_rounds:
            print(f"\nn = {n:,}, thresholds {thresholds} (stage 1 keeps {kept[0]:.1%})")
            target_rounds(index, flat[32], q, g32, args.target_rounds)
            continue
        one = np.stack([index.search({L: v[i] for L, v in q.items()}, 100, threads=1)[1] for i in range(nq)])
        print(f"\nn = {n:,}, thresholds {thresholds} (stage 1 keeps {kept[0]:.1%}); µs per query, medians of 3 passes")
        print("| threads | batch | CtF | CtF query by query | faiss 32 | faiss 2048 | NumPy floor "
              "| query by query / CtF | faiss 32 / CtF | faiss 2048 / CtF | CtF / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        floor_cpu: list = []
        floor = median_time(lambda: g32.view(np.uint32).sum(), args.budget / 3, 3, floor_cpu)
        cpus: dict = {}
        for t in threads:
            faiss.omp_set_num_threads(t)
            for b in batches:
                qbs = [{L: np.ascontiguousarray(v[a : a + b]) for L, v in q.items()} for a in range(0, nq - b + 1, b)]
                got = np.concatenate([index.search(qb, 100, threads=t)[1] for qb in qbs])
                assert np.array_equal(got, one[: len(qbs) * b]), "batch answers differ from one query at a time"
                b2048 = max(1, min(b, int(args.faiss2048_work // n)))
                q2048 = qbs[0][2048][:b2048]  # faiss's brute force costs the same for every query
                cells = {}
                for _ in range(3):
                    for name, f, m in (("ctf", lambda: [index.search(qb, 100, threads=t) for qb in qbs], len(qbs) * b),
                                       ("seq", lambda: [one_by_one(index, qb, t) for qb in qbs], len(qbs) * b),
                                       ("f32", lambda: [flat[32].search(qb[32], 100) for qb in qbs], len(qbs) * b),
                                       ("f2048", lambda: flat[2048].search(q2048, 100), b2048)):
                        cpu = cpus.setdefault((t, b, name), [])
                        cells.setdefault(name, []).append(median_time(f, args.budget / 3, cpu=cpu) / m)
                        cpu[-1] /= m
                ctf, seq, f32, f2048 = (float(np.median(cells[k])) for k in ("ctf", "seq", "f32", "f2048"))
                star = "*" if b2048 < b else ""
                print(f"| {t} | {b} | {ctf * 1e6:.0f} | {seq * 1e6:.0f} | {f32 * 1e6:.0f} | {f2048 * 1e6:.0f}{star} | "
                      f"{floor * 1e6:.0f} | {seq / ctf:.2f} | {f32 / ctf:.2f} | {f2048 / ctf:.1f}{star} | "
                      f"{ctf / floor:.2f} |", flush=True)
        if 1 in threads:  # on a loaded machine the CPU time of a thread excludes the time it waited
            print(f"\nthe 1-thread rows in CPU time of the calling thread (n = {n:,}, µs per query, medians)")
            print("| batch | CtF | CtF query by query | faiss 32 | faiss 2048 | floor | query by query / CtF "
                  "| faiss 32 / CtF | faiss 2048 / CtF | CtF / floor |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for b in batches:
                ctf, seq, f32, f2048 = (float(np.median(cpus[1, b, k])) for k in ("ctf", "seq", "f32", "f2048"))
                star = "*" if max(1, min(b, int(args.faiss2048_work // n))) < b else ""
                print(f"| {b} | {ctf * 1e6:.0f} | {seq * 1e6:.0f} | {f32 * 1e6:.0f} | {f2048 * 1e6:.0f}{star} | "
                      f"{floor_cpu[0] * 1e6:.0f} | {seq / ctf:.2f} | {f32 / ctf:.2f} | {f2048 / ctf:.1f}{star} | "
                      f"{ctf / floor_cpu[0]:.2f} |", flush=True)
        print_breakdown(index, q, n, batches, nq, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
