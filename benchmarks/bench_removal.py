#!/usr/bin/env python3
"""Removal and the hot path: what ``CtFIndex.remove_ids`` costs, and what removed items cost searches.

    python3 benchmarks/bench_removal.py                       # n = 1e6, the codes of bench_search.py
    python3 benchmarks/bench_removal.py --compare-to d4ce6fc  # also the single-query CtF top-100 of that commit

Single thread, top-100, the synthetic multi-length codes and threshold fit of ``bench_search.py`` (stage 1
keeps about 2 %). Prints medians of interleaved blocks (``bench_search.timed_blocks``) for:

- CtF top-100 of one query on an index with 10 % of its items removed (not compacted) against a compacted
  index of the same live items, and against faiss ``IndexBinaryFlat`` at 32 bits in the same run;
- ``remove_ids`` of 1, 1,000 and 100,000 ids (a fresh copy of the index each time, below the automatic
  compaction for the first two);
- with ``--compare-to REV``: the same single-query CtF top-100 with the code of commit ``REV`` (a git
  worktree in a temporary folder), old and new run alternately in subprocesses, 3 rounds each.

    python3 benchmarks/bench_removal.py --erasure --n 1000000 [--compare-to 1306df3]

``--erasure``: what a bulk erasure costs the searches running beside it, in the service's gallery
(``ctfreid.serve.gallery.Gallery`` over a SQLite store in a temporary folder, the same codes and thresholds):
one thread searches one query at a time (top-100) back to back while the main thread erases 1,000, 10,000 and
100,000 random items in one call each; prints the search latency with no erasure running (median, p99) and
during each erasure (p99, max), with the erasure's own time. With ``--compare-to``, the commit's code and this
tree's run alternately in subprocesses, 2 rounds each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _data(n: int, seed: int = 0, n_query: int = 64):
    """Gallery codes, 64 test queries, the thresholds fit and its kept fractions. ``n_query`` picks the cached
    file (``bench_batch.py`` caches 512 queries: reusing its file at 1e7 saves minutes and 3.4 GB)."""
    from bench_search import fit_thresholds, make_data

    lengths = [32, 128, 512, 2048]
    g, q, c, _, _ = make_data(n, n_query, lengths, seed, Path(tempfile.gettempdir()) / "ctfreid-bench")
    q = {L: v[:64] for L, v in q.items()}
    g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
    thresholds, kept = fit_thresholds(c, g, 0.02)
    return g, q, thresholds, kept


def worker(n: int, seconds: float) -> dict:
    """Median single-query CtF top-100 of the ctfreid on sys.path (old or new), and faiss 32-bit."""
    import faiss
    from bench_search import timed_blocks

    from ctfreid import CtFIndex

    faiss.omp_set_num_threads(1)
    g, q, thresholds, _ = _data(n)
    index = CtFIndex()
    index.add(g)
    index.thresholds = thresholds
    flat = faiss.IndexBinaryFlat(32)
    flat.add(g[32])
    q1 = [{L: v[i : i + 1] for L, v in q.items()} for i in range(q[32].shape[0])]
    res = timed_blocks({"ctf": lambda i: index.search(q1[i], 100),
                        "faiss32": lambda i: flat.search(q[32][i : i + 1], 100)}, len(q1), seconds)
    return {"ctf": res["ctf"][0], "faiss32": res["faiss32"][0]}


def compare(rev: str, n: int, rounds: int = 3) -> None:
    runs: dict = {"old": [], "new": []}
    for name, res in alternate(Path(__file__), ["--worker", "--n", str(n)], rev, rounds):
        runs[name].append(res)
    print(f"\nsingle-query CtF top-100 at n = {n:,}: commit {rev} (old) against this tree (new), "
          f"{rounds} alternating rounds, medians")
    print("| code | CtF top-100 | faiss 32-bit top-100 | CtF / faiss |")
    print("|---|---|---|---|")
    for name in ("old", "new"):
        ctf = float(np.median([x["ctf"] for x in runs[name]]))
        fa = float(np.median([x["faiss32"] for x in runs[name]]))
        print(f"| {name} | {ctf * 1e6:.0f} µs | {fa * 1e6:.0f} µs | {ctf / fa:.2f} |")
    new, old = (float(np.median([x["ctf"] for x in runs[k]])) for k in ("new", "old"))
    print(f"new / old: {new / old:.3f}")


def removal(n: int, seconds: float) -> None:
    import faiss
    from bench_search import timed_blocks

    from ctfreid import CtFIndex

    faiss.omp_set_num_threads(1)
    g, q, thresholds, kept = _data(n)
    rng = np.random.default_rng(0)
    gone = np.sort(rng.choice(n, n // 10, replace=False))
    removed = CtFIndex()
    removed.add(g)
    removed.thresholds = thresholds
    t = time.perf_counter()
    removed.remove_ids(gone)
    t_remove = time.perf_counter() - t
    keep = np.setdiff1d(np.arange(n), gone)
    compacted = CtFIndex()
    compacted.add({L: v[keep] for L, v in g.items()}, ids=keep)
    compacted.thresholds = thresholds
    flat = faiss.IndexBinaryFlat(32)
    flat.add(g[32][keep])
    q1 = [{L: v[i : i + 1] for L, v in q.items()} for i in range(q[32].shape[0])]
    for i in range(4):
        assert np.array_equal(removed.search(q1[i], 100)[1], compacted.search(q1[i], 100)[1])
    res = timed_blocks({"removed": lambda i: removed.search(q1[i], 100),
                        "compacted": lambda i: compacted.search(q1[i], 100),
                        "faiss32": lambda i: flat.search(q[32][i : i + 1], 100)}, len(q1), seconds)
    print(f"\nn = {n:,}, thresholds {thresholds} (stage 1 keeps {kept[0]:.1%}); 10 % removed = {n // 10:,} ids "
          f"(remove_ids took {t_remove * 1e3:.0f} ms)")
    print("| index | CtF top-100, one query | vs compacted |")
    print("|---|---|---|")
    for name in ("removed", "compacted", "faiss32"):
        label = {"removed": "10 % removed, not compacted", "compacted": "compacted (same live items)",
                 "faiss32": "faiss IndexBinaryFlat 32-bit (same live items)"}[name]
        print(f"| {label} | {res[name][0] * 1e6:.0f} µs | {res[name][0] / res['compacted'][0]:.3f} |")
    print("\n| remove_ids of | time (median of 3) |")
    print("|---|---|")
    base = CtFIndex()
    base.add(g)
    for m in (1, 1_000, 100_000):
        times = []
        index = CtFIndex.from_bytes(base.to_bytes())
        for r in range(3):
            if m == 100_000 and r:  # 10 % at a time: a fresh copy each time, below the automatic compaction
                index = CtFIndex.from_bytes(base.to_bytes())
            ids = np.random.default_rng(r).choice(n, m, replace=False)
            t = time.perf_counter()
            index.remove_ids(ids)
            times.append(time.perf_counter() - t)
        note = " (includes the automatic compaction)" if m / n > 0.2 else ""
        print(f"| {m:,} ids | {np.median(times) * 1e3:.2f} ms{note} |")


def searches_beside(search, writes: dict, quiet_s: float = 3.0) -> dict:
    """Latencies (ms) of ``search(i)`` (i = 0, 1, 2, ...) run back to back in a thread: alone for ``quiet_s``
    seconds (median, p99), then during each of ``writes`` (name -> function, run in turn on this thread, a second
    apart; p99 and max of the searches that overlapped it, and the write's own seconds)."""
    import threading

    samples: list[tuple[float, float]] = []  # (start, seconds) of each search
    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            search(i)
            samples.append((t, time.perf_counter() - t))
            i += 1

    def window(a: float, b: float) -> np.ndarray:  # the searches that ran during [a, b], ms
        return np.array([s * 1e3 for t, s in samples if t + s >= a and t <= b])

    search(0)  # warm (a fresh tree compiles its kernels in its first search)
    searcher = threading.Thread(target=loop)
    searcher.start()
    out: dict = {}
    try:
        time.sleep(1.0)
        t0 = time.perf_counter()
        time.sleep(quiet_s)
        quiet = window(t0, time.perf_counter())
        out["quiet"] = {"median": float(np.median(quiet)), "p99": float(np.percentile(quiet, 99)),
                        "searches": int(quiet.size)}
        for name, write in writes.items():
            time.sleep(1.0)
            a = time.perf_counter()
            write()
            b = time.perf_counter()
            while not samples or samples[-1][0] + samples[-1][1] < b:  # the search in flight at b: until it ends
                time.sleep(0.001)
            during = window(a, b)
            out[name] = {"write_s": b - a, "p99": float(np.percentile(during, 99)), "max": float(during.max()),
                         "searches": int(during.size)}
    finally:
        stop.set()
        searcher.join()
    return out


def filled_store(directory: Path, codes: dict, n: int, meta=None, step: int = 50_000):
    """A service ``Store`` in ``directory`` holding the first ``n`` items of ``codes`` (ids 1 .. n), added ``step``
    at a time, with the metadata ``meta(i)`` of item ``i`` (default: none)."""
    from ctfreid.serve.store import ItemMeta, Store

    store = Store(directory, "bench", sorted(codes))
    for a in range(0, n, step):
        b = min(n, a + step)
        store.add({L: v[a:b] for L, v in codes.items()}, [meta(i) if meta else ItemMeta() for i in range(a, b)])
    return store


def erasure(n: int) -> dict:
    """Search latencies beside bulk erasures of a service gallery (see the module docstring), in ms."""
    from ctfreid.serve.gallery import Gallery
    from ctfreid.serve.store import ItemMeta

    g, q, thresholds, _ = _data(n)
    lengths = sorted(g)
    with tempfile.TemporaryDirectory(prefix="ctfreid-erasure-") as tmp:
        store = filled_store(Path(tmp) / "store", g, n, lambda i: ItemMeta(camera=int(i % 6), source=f"c/{i}.jpg"))
        gallery = Gallery(store, thresholds)
        q1 = [{L: v[i : i + 1] for L, v in q.items()} for i in range(q[lengths[0]].shape[0])]
        ids = np.random.default_rng(1).permutation(np.arange(1, n + 1)).tolist()  # store ids start at 1
        sizes = (1_000, 10_000, 100_000)
        starts = np.cumsum((0,) + sizes)
        erase = {str(m): (lambda a=a, m=m: gallery.erase(ids[a : a + m])) for a, m in zip(starts, sizes)}
        try:
            return searches_beside(lambda i: gallery.search(q1[i % len(q1)], 100), erase)
        finally:
            store.close()


def alternate(script: Path, argv: list[str], rev: str | None, rounds: int = 2):
    """Yields ``(name, result)``: ``script argv`` run in subprocesses that print one JSON line, with this tree's
    code ("new") and, when ``rev`` is given, alternately with the code of commit ``rev`` ("old", a git worktree in
    a temporary folder), ``rounds`` times each (once without ``rev``)."""
    repo = HERE.parent
    tmp = Path(tempfile.mkdtemp(prefix="ctfreid-old-"))
    trees = [("new", repo)]
    if rev:
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tmp / "tree"), rev],
                       check=True, capture_output=True)
        trees.insert(0, ("old", tmp / "tree"))
    try:
        for _ in range(rounds if rev else 1):
            for name, root in trees:
                env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{HERE}")
                run = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                                     cwd=str(root))
                if run.returncode:
                    raise RuntimeError(f"{name} ({root}) failed:\n{run.stderr[-3000:]}")
                yield name, json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if rev:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tmp / "tree")],
                           capture_output=True)


def compare_erasure(rev: str | None, n: int) -> None:
    """``erasure`` in subprocesses: this tree, and alternately the commit ``rev`` when given."""
    print(f"\nsearches (one query, top-100) beside bulk erasures, gallery of {n:,} items, ms")
    print("| code | no erasure: median / p99 | erasure of 1,000: p99 / max (erase s) | 10,000 | 100,000 |")
    print("|---|---|---|---|---|")
    for name, res in alternate(Path(__file__), ["--erasure-worker", "--n", str(n)], rev):
        cells = [f"{res['quiet']['median']:.2f} / {res['quiet']['p99']:.2f}"]
        cells += [f"{res[s]['p99']:.2f} / {res[s]['max']:.1f} ({res[s]['write_s']:.2f})"
                  for s in ("1000", "10000", "100000")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per block set")
    ap.add_argument("--compare-to", metavar="REV", help="also time the single-query CtF of this commit")
    ap.add_argument("--erasure", action="store_true", help="searches beside bulk erasures of a service gallery")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--erasure-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.n, args.seconds)))
        return 0
    if args.erasure_worker:
        print(json.dumps(erasure(args.n)))
        return 0
    if args.erasure:
        compare_erasure(args.compare_to, args.n)
        return 0
    removal(args.n, args.seconds)
    if args.compare_to:
        compare(args.compare_to, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
