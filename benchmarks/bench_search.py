#!/usr/bin/env python3
"""Search speed: ctfreid vs faiss ``IndexBinaryFlat``, single thread, in the same process.

    python3 benchmarks/bench_search.py                                   # default sizes 1e4,1e5,1e6
    python3 benchmarks/bench_search.py --sizes 1e7 --lengths 32,2048 --no-market
    python3 benchmarks/bench_search.py --removal [--compare-to REV]     # bench_removal.py at n = 1e6 only

Synthetic codes: every code length is the sign of its own random projection of a shared latent vector
(identity clusters of look-alike identities, images with their own noise level), so shorter codes are
noisier versions of longer ones, as in a multi-length hashing model. Thresholds are fitted on separate
calibration queries: stage 1 keeps about ``--keep`` of the gallery (the integer threshold whose kept
fraction is closest), each later stage about 25 % of the previous candidates.

Prints, per gallery size: median latency of one query (top-``k`` and full ranking) for Hamming ranking
at every length and for coarse-to-fine (CtF), faiss at every length, and ratios ctfreid / faiss (< 1:
ctfreid is faster). Queries rotate over ``--queries`` test queries; all methods are timed in interleaved
blocks (warm caches), repeated in 3 passes so that a load change on a shared machine hits them alike. Also times a Market-1501-sized
evaluation (3,368 queries x 15,913 gallery: full rankings at every length plus CtF, and the metrics if
``ctfreid.eval.metrics`` is available). Checks on the way: faiss top-k distances == ctfreid's at every
length, CtF top-k == the first k of the CtF ranking. Generated codes are cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LATENT = 64
PER_ID = 8  # images per identity
IDS_PER_CLUSTER = 20  # look-alike identities per cluster
RHO = 0.7  # share of an identity's latent that comes from its cluster
GEN_VERSION = 1


# ------------------------------------------------------------------------------------------ data
class Generator:
    """Correlated multi-length codes: ``sign(latent @ P_L)`` with ``latent = identity + noise``."""

    def __init__(self, lengths: list[int], n_ids: int, seed: int):
        rng = np.random.default_rng(seed)
        n_cl = -(-n_ids // IDS_PER_CLUSTER)
        clusters = rng.standard_normal((n_cl, LATENT), dtype=np.float32)
        own = rng.standard_normal((n_ids, LATENT), dtype=np.float32)
        self.ids = np.sqrt(RHO) * clusters[np.arange(n_ids) // IDS_PER_CLUSTER] + np.sqrt(1 - RHO) * own
        self.P = {L: rng.standard_normal((LATENT, L), dtype=np.float32) for L in lengths}
        self.lengths = lengths

    def codes(self, pids: np.ndarray, seed: int, chunk: int = 100_000) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {L: np.empty((len(pids), L // 8), np.uint8) for L in self.lengths}
        for s in range(0, len(pids), chunk):
            p = pids[s : s + chunk]
            sigma = rng.uniform(0.3, 1.2, (len(p), 1)).astype(np.float32)
            lat = self.ids[p] + sigma * rng.standard_normal((len(p), LATENT), dtype=np.float32)
            for L in self.lengths:
                out[L][s : s + len(p)] = np.packbits(lat @ self.P[L] > 0, axis=1)
        return out


def make_data(n: int, n_query: int, lengths: list[int], seed: int, cache: Path) -> tuple[dict, dict, dict, np.ndarray, np.ndarray]:
    """(gallery codes, test query codes, calibration query codes, gallery pids, query pids), cached."""
    path = cache / f"codes_v{GEN_VERSION}_n{n}_q{n_query}_L{'-'.join(map(str, lengths))}_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        get = lambda p: {L: z[f"{p}{L}"] for L in lengths}  # noqa: E731
        return get("g"), get("q"), get("c"), z["gp"], z["qp"]
    t = time.perf_counter()
    n_ids = -(-n // PER_ID)
    gen = Generator(lengths, n_ids, seed)
    gp = np.arange(n) // PER_ID
    rng = np.random.default_rng(seed + 1)
    qp = rng.integers(0, n_ids, n_query)
    cp = rng.integers(0, n_ids, 64)
    g, q, c = gen.codes(gp, seed + 2), gen.codes(qp, seed + 3), gen.codes(cp, seed + 4)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, gp=gp, qp=qp, **{f"g{L}": g[L] for L in lengths}, **{f"q{L}": q[L] for L in lengths},
             **{f"c{L}": c[L] for L in lengths})
    os.replace(tmp, path)
    print(f"  (generated {n:,} codes in {time.perf_counter() - t:.1f} s, cached in {path})", flush=True)
    return g, q, c, gp, qp


def index_and_queries(gallery: dict, queries: dict, nq: int) -> tuple:
    """A ``CtFIndex`` of ``gallery``, the first ``nq`` of ``queries`` as one batch, and the same one by one."""
    from ctfreid import CtFIndex

    index = CtFIndex()
    index.add(gallery)
    batch = {L: np.ascontiguousarray(v[:nq]) for L, v in queries.items()}
    return index, batch, [{L: v[i] for L, v in batch.items()} for i in range(nq)]


def fit_thresholds(calib: dict, gallery: dict, keep: float, later_keep: float = 0.25) -> tuple[dict, list[float]]:
    """Thresholds whose kept fractions on the calibration queries are closest to ``keep`` (stage 1) and
    ``later_keep`` of the previous candidates (later stages); returns them and the fractions."""
    from ctfreid.search.hamming import hamming_distances

    lengths = sorted(gallery)
    n = next(iter(gallery.values())).shape[0]
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 100_000), replace=False))
    cands = [sample] * len(calib[lengths[0]])  # per calibration query: candidate gallery rows
    thresholds, fractions = {}, []
    for s, L in enumerate(lengths[:-1]):
        d = [hamming_distances(calib[L][i], gallery[L][c]) for i, c in enumerate(cands)]
        frac = np.cumsum(np.bincount(np.concatenate(d), minlength=L + 1)) / sum(map(len, d))
        t = int(np.argmin(np.abs(frac - (keep if s == 0 else later_keep))))
        thresholds[L] = t
        fractions.append(float(frac[t]))
        cands = [c[x <= t] for c, x in zip(cands, d)]
    return thresholds, fractions


# ---------------------------------------------------------------------------------------- timing
def timed_blocks(methods: dict, n_query: int, budget_s: float, passes: int = 3, min_calls: int = 5) -> dict:
    """Per method: (median wall s, median thread-CPU s, calls) of ``f(i)`` over rotating queries i.

    Each method runs in its own block of consecutive calls (warm caches, as in ../shared/anchors), and
    the blocks are repeated in ``passes`` passes so that a load change on a shared machine hits every
    method alike.
    """
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for f in methods.values():  # warm-up (and numba compilation)
        f(0)
        f(1 % n_query)
    slot = budget_s / (passes * len(methods))
    i = 0
    for _ in range(passes):
        for name, f in methods.items():
            start = time.perf_counter()
            calls = 0
            while calls < min_calls or (time.perf_counter() - start < slot and calls < 200):
                c0, t0 = time.thread_time(), time.perf_counter()
                f(i % n_query)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
                calls += 1
                i += 1
    return {name: (float(np.median(wall[name])), float(np.median(cpu[name])), len(wall[name])) for name in methods}


def fmt(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


# ------------------------------------------------------------------------------------------ main
def bench_size(n, gallery, queries, calib, lengths, k, keep, budget, faiss) -> dict:
    from ctfreid import CtFIndex
    from ctfreid.search.coarse_to_fine import ctf_search
    from ctfreid.search.hamming import hamming_rank, hamming_topk

    g = {L: np.ascontiguousarray(c[:n]) for L, c in gallery.items()}
    nq = queries[lengths[0]].shape[0]
    thresholds, fractions = fit_thresholds(calib, g, keep)
    index = CtFIndex()
    index.add(g)
    index.thresholds = thresholds
    flat = {}
    for L in lengths:
        flat[L] = faiss.IndexBinaryFlat(L)
        flat[L].add(g[L])
    q1 = [{L: queries[L][i : i + 1] for L in lengths} for i in range(nq)]

    ctf = len(lengths) > 1
    # correctness checks
    for L in lengths:
        fd, _ = flat[L].search(queries[L][:4], k)
        od, _ = hamming_topk(queries[L][:4], g[L], k)
        assert np.array_equal(fd, od), f"faiss and ctfreid top-{k} distances differ at {L} bits, n={n}"
    for i in range(2 if ctf else 0):
        sD, sI = index.search(q1[i], k)
        rD, rI = index.rank(q1[i])
        assert np.array_equal(sI, rI[:, :k]) and np.array_equal(sD, rD[:, :k]), "CtF top-k != CtF ranking"
        assert np.array_equal(ctf_search(q1[i], g, thresholds, k)[1], sI), "ctf_search != CtFIndex.search"

    methods = {}
    for L in lengths:
        methods[f"faiss{L}"] = lambda i, L=L: flat[L].search(queries[L][i : i + 1], k)
        methods[f"topk{L}"] = lambda i, L=L: hamming_topk(queries[L][i : i + 1], g[L], k)
        methods[f"rank{L}"] = lambda i, L=L: hamming_rank(queries[L][i : i + 1], g[L])
    if ctf:
        methods["ctf_index"] = lambda i: index.search(q1[i], k)
        methods["ctf_func"] = lambda i: ctf_search(q1[i], g, thresholds, k)
        methods["ctf_rank"] = lambda i: index.rank(q1[i])
    res = timed_blocks(methods, nq, budget)
    res["thresholds"] = thresholds
    res["kept"] = fractions
    return res


def report_size(n, res, lengths, k):
    Lmin, Lmax = lengths[0], lengths[-1]
    kept = ", ".join(f"{f:.1%}" for f in res["kept"])
    print(f"\nn = {n:,}  (CtF thresholds {res['thresholds']}, kept on calibration queries: {kept})")
    print(f"| method | L | faiss top-{k} | ctfreid top-{k} | ratio | ctfreid full ranking | ratio |")
    print("|---|---|---|---|---|---|---|")
    for L in lengths:
        f, t, r = res[f"faiss{L}"][0], res[f"topk{L}"][0], res[f"rank{L}"][0]
        print(f"| Hamming | {L} | {fmt(f)} | {fmt(t)} | {t / f:.2f} | {fmt(r)} | {r / f:.2f} |")
    if "ctf_index" not in res:
        return
    c, cf, cr = res["ctf_index"][0], res["ctf_func"][0], res["ctf_rank"][0]
    f_lo, f_hi = res[f"faiss{Lmin}"][0], res[f"faiss{Lmax}"][0]
    print(f"| CtF (CtFIndex.search) | {'/'.join(map(str, lengths))} | | {fmt(c)} | "
          f"{c / f_hi:.3f} vs faiss{Lmax}, {c / f_lo:.2f} vs faiss{Lmin} | {fmt(cr)} | "
          f"{cr / f_hi:.3f} vs faiss{Lmax} |")
    print(f"| CtF (ctf_search)      | | | {fmt(cf)} | {cf / f_hi:.3f} vs faiss{Lmax}, {cf / f_lo:.2f} vs faiss{Lmin} | | |")
    cc, cf_lo, cf_hi = res["ctf_index"][1], res[f"faiss{Lmin}"][1], res[f"faiss{Lmax}"][1]
    print(f"  CtF top-{k} (CtFIndex) is {f_hi / c:.1f}x faster than faiss {Lmax}-bit and {f_lo / c:.2f}x as fast as "
          f"faiss {Lmin}-bit (wall-clock medians, {res['ctf_index'][2]} calls); in thread CPU time "
          f"{cf_hi / cc:.1f}x and {cf_lo / cc:.2f}x", flush=True)


def bench_market(lengths, keep, seed, cache, block: int = 128) -> dict:
    """Market-1501-sized evaluation: full rankings of 3,368 queries x 15,913 gallery at every length and
    with CtF, in blocks of ``block`` queries (as ``ctfreid.eval.evaluate`` does: bounded memory, and fresh
    memory is slow to touch on some VMs), then CMC/mAP with ``ctfreid.eval.metrics`` when it is available."""
    from ctfreid.search.coarse_to_fine import ctf_rank
    from ctfreid.search.hamming import hamming_rank

    n, nq = 15_913, 3_368
    g, q, c, gp, qp = make_data(n, nq, lengths, seed + 100, cache)
    gp, qp = gp + 1, qp + 1  # Market pids start at 1 (0 marks distractors)
    rng = np.random.default_rng(seed)
    gcam, qcam = rng.integers(1, 7, n), rng.integers(1, 7, nq)
    thresholds, _ = fit_thresholds(c, g, keep)
    try:
        from ctfreid.eval.metrics import merge_metrics, ranking_stats
    except ImportError:
        merge_metrics = ranking_stats = None
    out = {}
    from ctfreid.eval.report import method_key, parse_method

    for name in [method_key(L) for L in lengths] + ["ctf"]:
        t_rank = t_metrics = 0.0
        parts = []
        for s in range(0, nq, block):
            sl = slice(s, s + block)
            t = time.perf_counter()
            if name == "ctf":
                _, I = ctf_rank({L: v[sl] for L, v in q.items()}, g, thresholds)
            else:
                L = parse_method(name)
                _, I = hamming_rank(q[L][sl], g[L])
            t_rank += time.perf_counter() - t
            if ranking_stats is not None:
                t = time.perf_counter()
                parts.append(ranking_stats(I, qp[sl], qcam[sl], gp, gcam))
                t_metrics += time.perf_counter() - t
        m = merge_metrics(parts, 10, n) if parts else None
        out[name] = {"rank_s": t_rank, "metrics_s": t_metrics if m is not None else None,
                     "mAP": getattr(m, "mAP", None), "rank1": getattr(m, "rank1", None)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="gallery sizes, comma-separated (default 1e4,1e5,1e6)")
    ap.add_argument("--lengths", default="32,128,512,2048", help="code lengths, shortest first")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--keep", type=float, default=0.02, help="fraction of the gallery CtF stage 1 keeps")
    ap.add_argument("--queries", type=int, default=64, help="test queries to rotate over")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls per gallery size")
    ap.add_argument("--no-market", action="store_true", help="skip the Market-1501-sized evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ctfreid-bench"))
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--removal", action="store_true",
                    help="only the removal section (bench_removal.py, n = 1e6): search with 10 %% removed vs "
                         "compacted, and remove_ids of 1, 1e3, 1e5 ids")
    ap.add_argument("--compare-to", metavar="REV", help="with --removal: also the single-query CtF of this commit")
    args = ap.parse_args(argv)
    if args.removal:  # the removal figures live in their own script; one entry point for the search side
        import bench_removal

        return bench_removal.main(["--seconds", str(args.budget)]
                                  + (["--compare-to", args.compare_to] if args.compare_to else []))
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    lengths = sorted(int(x) for x in args.lengths.split(","))
    try:
        import faiss
    except ImportError:
        print("this benchmark needs faiss (pip install faiss-cpu)", file=sys.stderr)
        return 2
    import numba

    numba.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    print(f"ctfreid search benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, numba {numba.__version__}, faiss {faiss.__version__}; single thread; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {"sizes": {}, "args": vars(args)}
    g, q, c, _, _ = make_data(max(sizes), args.queries, lengths, args.seed, Path(args.cache))
    for n in sizes:
        res = bench_size(n, g, q, c, lengths, args.k, args.keep, args.budget, faiss)
        report_size(n, res, lengths, args.k)
        results["sizes"][n] = res
    if not args.no_market and len(lengths) > 1:
        t = time.perf_counter()
        market = bench_market(lengths, args.keep, args.seed, Path(args.cache))
        print("\nMarket-1501-sized evaluation (3,368 queries x 15,913 gallery, full rankings in blocks of 128 "
              "queries, single thread):")
        total = 0.0
        for name, r in market.items():
            metrics = f", metrics {r['metrics_s']:.2f} s (mAP {r['mAP']:.3f})" if r["metrics_s"] is not None else ""
            print(f"  {name:>8}: ranking {r['rank_s']:.2f} s{metrics}")
            total += r["rank_s"] + (r["metrics_s"] or 0.0)
        print(f"  total {total:.2f} s (without data generation){'' if market['ctf']['metrics_s'] is not None else '; ctfreid.eval.metrics not available, rankings only'}")
        results["market"] = market
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
