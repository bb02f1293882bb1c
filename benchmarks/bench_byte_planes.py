#!/usr/bin/env python3
"""One query's 32-bit stage 1 as it runs (``_kernels._within1``: popcount masks, the hits' positions and
distances) against byte-plane masks over planes laid out beforehand (``_bpmask64`` + ``_extract_pos``, the
layout the batch scan builds per tile), on the codes and threshold fit of ``bench_search.py``. Measures what
byte planes kept in the index would save a single query on AVX2 hosts; nothing in ctfreid keeps them yet.

    python3 benchmarks/bench_byte_planes.py --n 1e6

Both must find the same hits; CPU time, median of ``--rounds`` rounds of 64 distinct queries, us a query.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ctfreid.search import _kernels as K  # noqa: E402


@njit
def lay_out(g1, nfull, out):
    """All full blocks' byte planes, 256 bytes a block (``_byte_planes``, tile by tile)."""
    for t0 in range(0, nfull, K.TILE):
        K._byte_planes(g1, t0, min(nfull, t0 + K.TILE), out[256 * t0 :])


@njit
def plane_hits(planes, q0, hi, live, nfull, pos):
    """Positions of the codes within ``hi`` among the full blocks, from the planes; returns their count."""
    tables = np.zeros(128, np.uint8)
    K._query_tables(None, 0, q0, tables)
    m = 0
    for b in range(nfull):
        m = K._extract_pos(K._bpmask64(planes, 256 * b, tables, hi) & live[b], b * K.BLOCK, pos, m)
    return m


def main() -> None:
    from bench_search import fit_thresholds, make_data

    from ctfreid import CtFIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1e6")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n = int(float(args.n))
    g, q, c, _, _ = make_data(n, 512, [32, 128, 512, 2048], 0, Path(tempfile.gettempdir()) / "ctfreid-bench")
    g = {L: np.ascontiguousarray(v[:n]) for L, v in g.items()}
    th, _ = fit_thresholds(c, g, 0.02)
    index = CtFIndex()
    index.add(g)
    nfull = n // K.BLOCK
    g1 = K.words32(index._stage_views()[0]).reshape(n)
    live, hi = index._live, th[32]
    planes = np.empty(256 * nfull, np.uint8)
    lay_out(g1, nfull, planes)
    Q1 = K.words32(np.ascontiguousarray(q[32][:64])).reshape(64)
    ids, d0 = np.empty(n + 2 * K.BLOCK, np.int64), np.empty(n + 2 * K.BLOCK, np.int32)
    dd, pos = np.zeros(K.BLOCK + 1, np.int32), np.empty(n + 8 * K.BLOCK, np.int64)
    for i in range(64):  # compile, and the same hits
        c1 = K._within1(Q1[i : i + 1], g1, nfull * K.BLOCK, hi, ids, d0, dd, live)
        assert c1 == plane_hits(planes, Q1[i], hi, live, nfull, pos) and np.array_equal(ids[:c1], pos[:c1])
    now, stored = [], []
    for _ in range(args.rounds):
        t = time.process_time()
        for i in range(64):
            K._within1(Q1[i : i + 1], g1, nfull * K.BLOCK, hi, ids, d0, dd, live)
        now.append((time.process_time() - t) / 64 * 1e6)
        t = time.process_time()
        for i in range(64):
            plane_hits(planes, Q1[i], hi, live, nfull, pos)
        stored.append((time.process_time() - t) / 64 * 1e6)
    print(f"n = {n:,}, threshold {hi}: _within1 {np.median(now):.0f} us a query, "
          f"stored byte planes {np.median(stored):.0f} (masks and positions only)")


if __name__ == "__main__":
    main()
