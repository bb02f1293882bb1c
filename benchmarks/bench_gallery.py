#!/usr/bin/env python3
"""The service's in-memory gallery (``ctfreid.serve.gallery.Gallery``) over N stored items, in process:
start-up (reading the SQLite store into the index and the filter fields), memory beyond the codes, and a
top-100 search with and without a camera filter.

    python3 benchmarks/bench_gallery.py [--n 300000]

Items have codes of 32/128/512/2048 bits (random), a pid, a camera (1-8), a time and a source name like
``cam3/frame_00000123.jpg``. Memory is the process's resident set after start-up (freed heap returned to
the system with ``malloc_trim``) minus before; "beyond the codes" subtracts the codes and ids themselves
(348 bytes an item). To compare two versions, run the script with each on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import tempfile
import time

import numpy as np


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    from ctfreid.serve.gallery import Filter, Gallery
    from ctfreid.serve.store import ItemMeta, Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=float, default=3e5)
    args = ap.parse_args()
    n, lengths = int(args.n), [32, 128, 512, 2048]
    folder = tempfile.mkdtemp()
    try:
        store = Store(folder, "bench", lengths)
        rng = np.random.default_rng(0)
        for a in range(0, n, 50_000):
            m = min(50_000, n - a)
            metas = [ItemMeta(pid=int(p), camera=int(c), time=1.7e9 + a + i, source=f"cam{c}/frame_{a + i:08d}.jpg")
                     for i, (p, c) in enumerate(zip(rng.integers(0, 5000, m), rng.integers(1, 9, m)))]
            store.add({L: rng.integers(0, 256, (m, L // 8), dtype=np.uint8) for L in lengths}, metas)
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        gallery = Gallery(store, {32: 9, 128: 53, 512: 205})
        start = time.perf_counter() - t0
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        grown = rss() - before
        beyond = (grown - n * (sum(lengths) // 8 + 8)) / n
        print(f"n = {n:,}: start-up {start:.2f} s; resident memory +{grown / 2**20:.0f} MiB, "
              f"{beyond:.0f} bytes an item beyond the codes (index buffers' growth slack included)")
        q = {L: rng.integers(0, 256, (1, L // 8), dtype=np.uint8) for L in lengths}
        for name, flt in (("no filter", None), ("camera = 3", Filter(camera=3))):
            gallery.search(q, 100, flt=flt)
            times = []
            for _ in range(21):
                t0 = time.perf_counter()
                gallery.search(q, 100, flt=flt)
                times.append(time.perf_counter() - t0)
            print(f"  search top-100, {name}: {np.median(times) * 1e3:.2f} ms (median of 21)")
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
