#!/usr/bin/env python3
"""The gallery over Ray shards (``ctfreid.distributed.ShardedIndex``) against one in-process ``CtFIndex``.

    python3 benchmarks/bench_distributed.py                  # n = 1e6, shards 1 2 4, local Ray on this machine
    python3 benchmarks/bench_distributed.py --n 100000 --shards 1 2

The codes and threshold fit of ``bench_search.py`` (4 lengths 32/128/512/2048 = 340 bytes per item; stage 1
keeps about 2 %). Everything runs on this machine (a local Ray with one worker per shard), so the shards
share its cores: the figures measure the fan-out + merge overhead, not the speed-up of more machines.
Prints, in the same run:

- answers checked equal to the one index's (``search_hits``, 64 queries, top-100);
- single-query top-100 latency, median of interleaved blocks (``bench_search.timed_blocks``), one index vs
  1, 2, 4 shards, and the difference = fan-out + merge overhead per query;
- of that overhead: the Ray floor (one small actor call to every shard at once, no search) and the merge
  (``merge_hits`` over the shards' own top-k);
- batch throughput: 64 queries per call, top-100, queries per second (medians of interleaved calls);
- adding ``n`` items: in memory, and durably (each shard's SQLite store committed);
- recovery: SIGKILL of the shard actor of a 1-shard durable index of ``n`` items, time until a search
  answers complete again (Ray restarts the actor, which reloads its store); store bytes per item.

    python3 benchmarks/bench_distributed.py --beside-writes --n 200000 [--compare-to REV]

``--beside-writes``: one-query searches (top-100) run back to back on a durable 1-shard index of ``n`` items
while it takes a removal of n / 20 items and an add of n / 20 (each shard commits to its SQLite store, and a
removal checkpoints it); prints the search latency alone (median, p99) and during each write (p99, max), with
the write's own time, then the medians of 100 one-item adds and of their removals. With ``--compare-to``, the
commit's code and this tree's run alternately in subprocesses. ``--gallery``: the same through the service's
``Gallery`` (its SQLite store, then a durable 2-shard index), as ``ctfreid serve --ray`` searches and writes: an
erasure of n / 20 items, then an add of n / 20.

    python3 benchmarks/bench_distributed.py --restart --n 200000

``--restart``: the seconds a ``ctfreid serve --ray`` start takes to load a gallery of ``n`` items over 2 durable
shards, with the shard stores rebuilt from the gallery's store against reopened as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # after PYTHONPATH: an A/B run (--compare-to) sets it to the old tree

from bench_removal import _data, alternate, filled_store, searches_beside  # noqa: E402  (bench_search codes)


def _same(a, b) -> bool:
    return (np.array_equal(a.ids, b.ids) and np.array_equal(a.stages, b.stages)
            and np.array_equal(a.distances, b.distances))


def batch_qps(fs: dict, q, rounds: int = 5) -> dict:
    """Queries per second of each ``f(q)``, medians of ``rounds`` interleaved calls (load changes on a
    shared machine hit every method alike)."""
    times: dict = {name: [] for name in fs}
    for f in fs.values():
        f(q)
    for _ in range(rounds):
        for name, f in fs.items():
            t = time.perf_counter()
            f(q)
            times[name].append(time.perf_counter() - t)
    return {name: q[32].shape[0] / float(np.median(v)) for name, v in times.items()}


def merge_time(parts: list, k: int) -> tuple[float, float]:
    """Median time of ``merge_hits`` over the shards' own answers (each its first ``k``), for the first
    query and for the whole batch: the driver's merge step."""
    from ctfreid.search.merge import Hits, merge_hits

    res = []
    for rows in (slice(0, 1), slice(None)):
        p = [Hits(h.ids[rows], h.stages[rows], h.distances[rows], h.lengths) for h in parts]
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            merge_hits(p, k)
            ts.append(time.perf_counter() - t)
        res.append(float(np.median(ts)))
    return res[0], res[1]


def beside_writes(n: int, gallery: bool = False) -> dict:
    """Search latencies (ms) on a durable 1-shard index beside its writes, or (``gallery``) through the service's
    gallery over a durable 2-shard index, as ``ctfreid serve --ray`` runs it (see the module docstring)."""
    import ray

    from ctfreid.distributed import ShardedIndex

    g, q, thresholds, _ = _data(n)
    m = n // 20
    q1 = [{L: v[i : i + 1] for L, v in q.items()} for i in range(q[32].shape[0])]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    d = Path(tempfile.mkdtemp(prefix="ctfreid-shard-"))
    try:
        idx = ShardedIndex(shards=2 if gallery else 1, store=d / "shards", timeout=600)
        part = lambda a, b: {L: v[a:b] for L, v in g.items()}  # noqa: E731
        rest = part(n - m, n)
        if gallery:
            from ctfreid.serve.gallery import Gallery
            from ctfreid.serve.store import ItemMeta

            store = filled_store(d / "store", g, n - m)
            gal = Gallery(store, thresholds, index=idx)  # loads the shards from the store, as the service starts
            gone = (1 + np.random.default_rng(1).choice(n - m, m, replace=False)).tolist()  # store ids: 1, 2, ...
            writes = {"remove": lambda: gal.erase(gone), "add": lambda: gal.add(rest, [ItemMeta()] * m)}
            search = lambda i: gal.search(q1[i % len(q1)], 100)  # noqa: E731
            one_add = lambda i: gal.add({L: v[i : i + 1] for L, v in rest.items()}, [ItemMeta()])[0]  # noqa: E731
            one_remove = lambda i: gal.erase([i])  # noqa: E731
        else:
            for a in range(0, n - m, 100_000):
                idx.add(part(a, min(a + 100_000, n - m)))
            idx.thresholds = thresholds
            gone = np.random.default_rng(1).choice(n - m, m, replace=False)
            writes = {"remove": lambda: idx.remove_ids(gone), "add": lambda: idx.add(rest)}
            search = lambda i: idx.search_hits(q1[i % len(q1)], 100)  # noqa: E731
            one_add = lambda i: int(idx.add({L: v[i : i + 1] for L, v in rest.items()})[0])  # noqa: E731
            one_remove = lambda i: idx.remove_ids([i])  # noqa: E731
        out = searches_beside(search, writes)
        out["one_item"] = one_item_writes(one_add, one_remove)
        idx.close()
        return out
    finally:
        ray.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def one_item_writes(add, remove, count: int = 100) -> dict:
    """Medians (ms) of ``count`` one-item adds (``add(i)`` returns the new item's id), then the removals of those
    items, one call each, nothing else running."""
    ids, added, removed = [], [], []
    for i in range(count):
        t = time.perf_counter()
        ids.append(add(i))
        added.append(time.perf_counter() - t)
    for i in ids:
        t = time.perf_counter()
        remove(i)
        removed.append(time.perf_counter() - t)
    return {"add": float(np.median(added)) * 1e3, "remove": float(np.median(removed)) * 1e3}


def compare_beside_writes(rev: str | None, n: int, gallery: bool = False) -> None:
    m = n // 20
    what = "the service's gallery over a durable 2-shard index" if gallery else "a durable 1-shard index"
    print(f"\none-query searches (top-100) through {what} of {n:,} items beside its writes, ms")
    print(f"| code | no write: median / p99 | removal of {m:,}: p99 / max (write s) | add of {m:,} | one-item add / "
          "removal: median |")
    print("|---|---|---|---|---|")
    argv = ["--beside-writes-worker", "--n", str(n)] + (["--gallery"] if gallery else [])
    for name, res in alternate(Path(__file__), argv, rev):
        cells = [f"{res['quiet']['median']:.2f} / {res['quiet']['p99']:.2f}"]
        cells += [f"{res[w]['p99']:.2f} / {res[w]['max']:.1f} ({res[w]['write_s']:.2f})" for w in ("remove", "add")]
        cells.append(f"{res['one_item']['add']:.2f} / {res['one_item']['remove']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def restart(n: int, rounds: int = 2) -> None:
    """Seconds a ``ctfreid serve --ray`` start takes to load a gallery of ``n`` items over 2 durable shards: with the
    shard stores rebuilt from the gallery's store (what every start did before they were reopened) against
    reopened as they are (the gallery then checks the ids and sends nothing); alternating, ``rounds`` each."""
    import ray

    from ctfreid.cli.serve import _sharded
    from ctfreid.serve.gallery import Gallery

    g, _, thresholds, _ = _data(n)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    d = Path(tempfile.mkdtemp(prefix="ctfreid-restart-"))
    try:
        store = filled_store(d, g, n)
        factory = _sharded(argparse.Namespace(store=str(d), shards=2, ray=""))
        print(f"\na serve --ray start over 2 durable shards, gallery of {n:,} items, seconds")
        print("| shard stores | start (shards opened + gallery loaded) |")
        print("|---|---|")
        for mode in ["rebuilt", "reopened"] * rounds:
            if mode == "rebuilt":
                shutil.rmtree(d / "shards", ignore_errors=True)
            t = time.perf_counter()
            index = factory("bench", store)
            gal = Gallery(store, thresholds, index=index)
            took = time.perf_counter() - t
            assert len(gal) == n
            index.close()
            print(f"| {mode} | {took:.1f} |", flush=True)
        store.close()
    finally:
        ray.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--n-query", type=int, default=64, help="queries in the cached code file (64 of them are used)")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of single-query timing per shard count")
    ap.add_argument("--chunks", type=int, default=4,
                    help="add the gallery in this many equal parts (n / 4: the buffers end exactly full, no doubling)")
    ap.add_argument("--recovery-n", type=int, default=1_000_000, help="items in the shard killed for recovery (<= n)")
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--beside-writes", action="store_true", help="searches beside a durable shard's writes")
    ap.add_argument("--compare-to", metavar="REV", help="with --beside-writes: also the code of this commit")
    ap.add_argument("--gallery", action="store_true",
                    help="with --beside-writes: through the service's gallery over 2 durable shards (serve --ray)")
    ap.add_argument("--restart", action="store_true", help="a serve --ray start: shard stores rebuilt or reopened")
    ap.add_argument("--beside-writes-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.restart:
        restart(args.n)
        return 0
    if args.beside_writes_worker:
        print(json.dumps(beside_writes(args.n, args.gallery)))
        return 0
    if args.beside_writes:
        compare_beside_writes(args.compare_to, args.n, args.gallery)
        return 0

    import ray
    from bench_search import timed_blocks

    from ctfreid.distributed import ShardedIndex
    from ctfreid.search.index import CtFIndex

    n, k = args.n, args.k
    g, q, thresholds, kept = _data(n, n_query=args.n_query)
    nq = q[32].shape[0]
    q1 = [{L: v[i:i + 1] for L, v in q.items()} for i in range(nq)]
    print(f"n = {n:,}, {nq} queries, top-{k}, thresholds {thresholds} (kept {[round(x, 3) for x in kept]}), "
          f"{os.cpu_count()} cores", flush=True)
    step = -(-n // max(1, args.chunks))
    parts = [{L: v[a:a + step] for L, v in g.items()} for a in range(0, n, step)]  # views: no copies
    one = CtFIndex()
    t = time.perf_counter()
    for p in parts:
        one.add(p)
    del p  # from here on the codes are read from the one index (views): the loaded copy is freed (1e7: 3.4 GB)
    g = {L: one.codes(L) for L in g}
    parts = [{L: v[a:a + step] for L, v in g.items()} for a in range(0, n, step)]
    one.thresholds = thresholds
    res: dict = {"n": n, "k": k, "cores": os.cpu_count(), "one_add_s": time.perf_counter() - t, "shards": {}}
    ref = one.search_hits(q, k)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for S in args.shards:
        idx = ShardedIndex(shards=S, timeout=600)
        try:
            t = time.perf_counter()
            for p in parts:
                idx.add(p)
            add_s = time.perf_counter() - t
            idx.thresholds = thresholds
            exact = _same(idx.search_hits(q, k), ref)
            lat = timed_blocks({"one": lambda i: one.search(q1[i], k), "sharded": lambda i: idx.search(q1[i], k)},
                               nq, args.budget)
            rpc = []
            for _ in range(200):  # the floor: one small actor call per shard, all at once, no search
                t = time.perf_counter()
                ray.get([a.info.remote() for a in idx.actors])
                rpc.append(time.perf_counter() - t)
            rpc_s = float(np.median(rpc))
            merge_1, merge_b = merge_time(ray.get([a.search_hits.remote(q, k, thresholds) for a in idx.actors]), k)
            qps = batch_qps({"one": lambda x: one.search(x, k), "sharded": lambda x: idx.search(x, k)}, q)
            qps_one, qps_sh = qps["one"], qps["sharded"]
        finally:
            idx.close()
        r = {"merge_one_query_s": merge_1, "merge_batch_s": merge_b, "rpc_s": rpc_s, "add_s": add_s, "exact": exact, "one_query_s": lat["one"][0], "sharded_query_s": lat["sharded"][0],
             "overhead_s": lat["sharded"][0] - lat["one"][0], "batch_qps_one": qps_one, "batch_qps_sharded": qps_sh}
        res["shards"][S] = r
        print(f"  {S} shard(s): exact {exact}; one query {r['sharded_query_s'] * 1e3:.2f} ms vs one index "
              f"{r['one_query_s'] * 1e3:.2f} ms (overhead {r['overhead_s'] * 1e3:+.2f} ms); batch of {nq}: "
              f"{qps_sh:,.0f} q/s vs {qps_one:,.0f} q/s; add {add_s:.1f} s; of the overhead: {S} null actor "
              f"calls {rpc_s * 1e3:.2f} ms, merge {merge_1 * 1e6:.0f} µs (batch of {nq}: {merge_b * 1e3:.2f} ms)",
              flush=True)

    if not args.no_recovery:
        d = Path(tempfile.mkdtemp(prefix="ctfreid-shard-"))
        try:
            idx = ShardedIndex(shards=1, store=d, timeout=600)
            t = time.perf_counter()
            nr = min(n, args.recovery_n)
            for a in range(0, nr, 100_000):  # durable adds: committed to the shard's SQLite store
                idx.add({L: v[a:min(a + 100_000, nr)] for L, v in g.items()})
            durable_add_s = time.perf_counter() - t
            idx.thresholds = thresholds
            db = d / "shard-0" / "gallery.sqlite"
            store_bytes = db.stat().st_size
            ref_r = ref if nr == n else None
            if ref_r is None:  # the answers of one index over the same nr items
                small = CtFIndex()
                small.add({L: v[:nr] for L, v in g.items()})
                small.thresholds = thresholds
                ref_r = small.search_hits(q, k)
                del small
            pid = idx.shard_info()[0]["pid"]
            t = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            h = idx.search_hits(q, k)
            recover_s = time.perf_counter() - t
            res["recovery"] = {"durable_add_s": durable_add_s, "recover_s": recover_s, "complete": h.partial == (),
                               "exact": _same(h, ref_r), "store_bytes_per_item": store_bytes / nr, "n": nr}
            idx.close()
            print(f"  durable add of {nr:,} items (1 shard, SQLite WAL synchronous=FULL): {durable_add_s:.1f} s; "
                  f"store {store_bytes / nr:.0f} bytes/item; SIGKILLed shard answering again (complete "
                  f"{h.partial == ()}, exact {_same(h, ref_r)}) after {recover_s:.1f} s", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
