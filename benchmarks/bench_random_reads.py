"""The memory floor of CtF's later stages: random rows of 128-, 512- and 2048-bit codes (Sec. 3.1, Eq. 2's
re-ranking), as ``_kernels._rows_dist`` reads them, against the same reads on 4 KB pages and with other
prefetch distances, all in the same run.

Each call computes the distances of ``rows`` sorted random rows of ``n`` codes (the stage-2/3/4 candidates of
one query at 1e6 codes: about 16,700 / 4,100 / 1,000), after a 48 MB read that evicts the codes from the
caches. Prints ns per row (median over rounds, variants interleaved).

- "kernel": ``_rows_dist`` on codes in NumPy memory (NumPy asks Linux for transparent huge pages for large
  arrays, ``madvise(MADV_HUGEPAGE)``, which is what a ``CtFIndex`` built with ``add`` holds);
- "4 KB pages": the same kernel on an anonymous map without that advice (each random row a TLB miss);
- "no prefetch" / "prefetch D": the kernel's loop without its software prefetch, or prefetching D rows ahead.

    python3 benchmarks/bench_random_reads.py [--n 1000000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import mmap
import time

import numpy as np
from numba import njit

from ctfreid.search import _kernels as K


@njit(cache=True, nogil=True, boundscheck=False)
def _rows_dist_pf(q, g, W, rows, c, out, dist):
    """``_rows_dist`` with the prefetch distance as an argument (0: none)."""
    for j in range(c):
        if dist:
            ahead = W * rows[min(j + dist, c - 1)]
            for w in range(0, W, 8):
                K._prefetch(g, ahead + w)
        o = np.uint64(W * rows[j])
        s = 0
        for w in range(W):
            s += K._popcnt(q[w] ^ g[o + np.uint64(w)])
        out[j] = s


def small_pages(words: int) -> tuple[np.ndarray, mmap.mmap]:
    """A uint64 array on 4 KB pages: an anonymous map with MADV_NOHUGEPAGE (NumPy would advise huge pages)."""
    m = mmap.mmap(-1, words * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, np.uint64), m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=float, default=1e6, help="codes per length (default 1e6)")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    n = int(args.n)
    rng = np.random.default_rng(0)
    flush = np.ones(6 << 20, np.uint64)  # 48 MB: more than the L3 of the machines measured here
    print(f"n = {n:,}; ns per row, median of {args.rounds} interleaved rounds")
    for bits, c in ((128, 16_700), (512, 4_100), (2048, 1_000)):
        W = bits // 64
        huge = rng.integers(0, 2**63, n * W, dtype=np.uint64)
        small, keep = small_pages(n * W)
        small[:] = huge
        q = huge[:W].copy()
        out = np.empty(c, np.int32)
        variants = {
            "kernel": lambda r: K._rows_dist(q, huge, W, r, c, out),
            "4 KB pages": lambda r: K._rows_dist(q, small, W, r, c, out),
            "no prefetch": lambda r: _rows_dist_pf(q, huge, W, r, c, out, 0),
            "prefetch 8": lambda r: _rows_dist_pf(q, huge, W, r, c, out, 8),
            "prefetch 64": lambda r: _rows_dist_pf(q, huge, W, r, c, out, 64),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rnd in range(args.rounds + 2):
            for name, f in variants.items():
                rows = np.sort(rng.choice(n, c, replace=False)).astype(np.int64)
                flush.sum()
                t0 = time.perf_counter()
                f(rows)
                if rnd >= 2:  # two warm-up rounds (compilation, page faults)
                    times[name].append(time.perf_counter() - t0)
        base = np.median(times["kernel"])
        cells = [f"{name} {np.median(t) / c * 1e9:.1f} ({np.median(t) / base:.2f}x)" for name, t in times.items()]
        print(f"{bits:>5} bits, {c:,} rows: " + " | ".join(cells), flush=True)
        del small
        keep.close()


if __name__ == "__main__":
    main()
