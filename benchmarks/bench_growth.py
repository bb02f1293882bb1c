"""Searches while a write copies the index: the longest one-query search during an add that doubles the
buffers (or, with ``--remove``, a removal that compacts the index), against the median search before it
(same run). ``CtFIndex.add`` copies into larger buffers, and a compaction copies the live items, under the
read lock (searches go on), and both hold the write lock only to swap the copies in; before those changes
the whole copy ran under the write lock and every search waited for it.

    python3 benchmarks/bench_growth.py [--n 1048576] [--rounds 3] [--write add | remove | first-removal | small-adds]

Random codes of 32/128/512/2048 bits, thresholds {32: 9, 128: 50, 512: 200} (about 1 % kept at stage 1),
top-100, one search thread; each round builds an index of exactly ``n`` items (full buffers), searches for
0.5 s, then adds 1,000 items (the doubling copy: n x 344 bytes), or removes a random quarter of the items
(past ``COMPACT_FRACTION``: the compaction copies the other three quarters), or (``first-removal``) saves
the index, loads it as a read-only map and removes 1,000 items from it (the copy of the map into memory),
and searches 0.5 s more.

``--write small-adds``: a gallery that changes between searches. One thread alternates adds of one item with
one-query searches (and with batches of 64 queries), against the same searches with no add between them, in
the same rounds; medians, ms. The index's search scratch is kept across adds (``_Scratch``: made with room for
an eighth more items); made for the exact size, it was made anew, with fresh memory's page faults, after
every add.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ctfreid import CtFIndex

LENGTHS = (32, 128, 512, 2048)
TH = {32: 9, 128: 50, 512: 200}


WRITES = ("add", "remove", "first-removal", "small-adds")


def one_round(n: int, rng: np.random.Generator, write: str = "add") -> tuple[float, float, float]:
    """(median search ms before the write, longest search ms overlapping the write, write ms)."""
    index = CtFIndex()
    index.add({L: rng.integers(0, 256, (n, L // 8), dtype=np.uint8) for L in LENGTHS})
    if write == "first-removal":
        with tempfile.TemporaryDirectory() as d:  # the map outlives the file's name
            index.save(Path(d) / "g.ctf")
            index = CtFIndex.load(Path(d) / "g.ctf", mmap=True)
    more = {L: rng.integers(0, 256, (1000, L // 8), dtype=np.uint8) for L in LENGTHS}
    gone = rng.choice(n, n // 4 if write == "remove" else 1000, replace=False)
    queries = [{L: rng.integers(0, 256, L // 8, dtype=np.uint8) for L in LENGTHS} for _ in range(64)]
    index.search(queries[0], 100, TH)
    log: list[tuple[float, float]] = []
    stop = threading.Event()

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            index.search(queries[i % 64], 100, TH, threads=1)
            log.append((t, time.perf_counter()))
            i += 1

    th = threading.Thread(target=searcher)
    th.start()
    time.sleep(0.5)
    a0 = time.perf_counter()
    if write == "add":
        index.add(more)
    else:
        index.remove_ids(gone)
        assert index._ndead == (0 if write == "remove" else 1000)  # compacted, or not
    a1 = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    th.join()
    before = [e - s for s, e in log if e < a0]
    during = [e - s for s, e in log if s < a1 and e > a0]
    return 1e3 * float(np.median(before)), 1e3 * max(during, default=0.0), 1e3 * (a1 - a0)


def small_adds(n: int, rng: np.random.Generator, rounds: int) -> dict[str, float]:
    """Median ms of one-query searches and of batches of 64, each alone and each right after an add of one item."""
    index = CtFIndex()
    index.add({L: rng.integers(0, 256, (n, L // 8), dtype=np.uint8) for L in LENGTHS})
    more = {L: rng.integers(0, 256, (35 * rounds, L // 8), dtype=np.uint8) for L in LENGTHS}  # 30 + 5 adds a round
    queries = [{L: rng.integers(0, 256, L // 8, dtype=np.uint8) for L in LENGTHS} for _ in range(64)]
    batch = {L: np.stack([q[L] for q in queries]) for L in LENGTHS}
    index.search(queries[0], 100, TH, threads=1)
    index.search(batch, 100, TH, threads=1)
    times: dict[str, list[float]] = {"search": [], "search after an add": [], "batch of 64": [],
                                     "batch of 64 after an add": []}
    pos = 0

    def timed(name: str, f, add: bool) -> None:
        nonlocal pos
        if add:
            index.add({L: c[pos : pos + 1] for L, c in more.items()})
            pos += 1
        t = time.perf_counter()
        f()
        times[name].append(1e3 * (time.perf_counter() - t))

    for _ in range(rounds):
        for i in range(60):
            timed("search" + " after an add" * (i % 2), lambda i=i: index.search(queries[i % 64], 100, TH, threads=1),
                  bool(i % 2))
        for i in range(10):
            timed("batch of 64" + " after an add" * (i % 2), lambda: index.search(batch, 100, TH, threads=1),
                  bool(i % 2))
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", choices=WRITES, default="add",
                    help="an add that doubles the buffers, a removal of a quarter of the items (compacted), or the "
                    "first removal from a loaded map")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    if a.write == "small-adds":
        got = small_adds(a.n, rng, a.rounds)
        print(f"n = {a.n:,}, medians (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()))
        print(f"after an add / alone: one query {got['search after an add'] / got['search']:.2f}x, batch of 64 "
              f"{got['batch of 64 after an add'] / got['batch of 64']:.2f}x")
        return
    rows = [one_round(a.n, rng, a.write) for _ in range(a.rounds)]
    what = {"add": "the add", "remove": "the removal (and compaction)", "first-removal": "the first removal"}[a.write]
    print(f"n = {a.n:,}: median search before {what} / longest search during it / {what} (ms)")
    for r in rows:
        print(f"  {r[0]:.2f} / {r[1]:.1f} / {r[2]:.1f}")
    med = np.median(np.array(rows), axis=0)
    print(f"medians: {med[0]:.2f} / {med[1]:.1f} / {med[2]:.1f}; longest during {what} = {med[1] / med[0]:.1f}x the "
          "median before")


if __name__ == "__main__":
    main()
