"""The Hamming distance loops compile to contiguous vector loads, not gathers.

numba wraps negative indices even with bounds checks off, so indexing a gallery as ``g[base + j]`` hides
from LLVM that consecutive ``j`` read consecutive words: the loop is then vectorised with masked gathers
(or not at all), 3-20x slower than contiguous loads (``_kernels``, note ``_IDX``). This checks the LLVM IR
of fresh, uncached compilations of the loops: no ``llvm.masked.gather``. Where the target has no vector
gathers LLVM never emits them, and the check holds trivially.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from ctfreid.search import _kernels

N = 1000


def ir_of(kernel, *args) -> str:
    """LLVM IR of ``kernel`` compiled afresh (the cached dispatcher keeps no IR) for ``args``."""
    fresh = numba.njit(boundscheck=False)(kernel.py_func)
    fresh(*args)
    return "\n".join(fresh.inspect_llvm().values())


@pytest.mark.parametrize("W, dtype", [(1, np.uint32), (2, np.uint64), (32, np.uint64)])
def test_distance_range_loads_contiguous_words(W, dtype):
    g, q, d = np.zeros(N * W, dtype), np.zeros(W, dtype), np.zeros(N, np.int32)
    ir = ir_of(_kernels._dist_range, q, g, np.int64(W), np.int64(0), np.int64(N), d, np.int64(0))
    assert "llvm.ctpop" in ir
    assert "llvm.masked.gather" not in ir


@pytest.mark.parametrize("W", [2, 8, 32])
def test_candidate_distances_load_contiguous_words(W):
    g, q, rows, out = np.zeros(N * W, np.uint64), np.zeros(W, np.uint64), np.arange(10), np.zeros(10, np.int32)
    ir = ir_of(_kernels._rows_dist, q, g, np.int64(W), rows, np.int64(10), out)
    assert "llvm.masked.gather" not in ir


@pytest.mark.parametrize("W, dtype", [(1, np.uint32), (2, np.uint64), (8, np.uint64)])
def test_topk_scan_loads_contiguous_words(W, dtype):
    """``_select`` inlines the block mask helpers (``_mask1``, ``_mask2``, ``_maskw``)."""
    L, k = 64 * W if dtype == np.uint64 else 32, 10
    g, q = np.zeros(N * W, dtype), np.zeros(W, dtype)
    bufi, bufd = np.zeros(N + 128, np.int64), np.zeros(N + 128, np.int32)
    ir = ir_of(_kernels._select, q, g, np.int64(W), np.int64(N), np.int64(L), np.int64(k), np.int64(L), bufi, bufd,
               np.zeros(L + 2, np.int64), np.zeros(65, np.int32), _kernels.all_live(N))
    assert "llvm.masked.gather" not in ir


def test_ctf_stage1_uses_the_64_lane_block_masks():
    """``_within1`` (stage 1 of ``ctf_topk``) computes a block's 64 distances as one ``<64 x i32>`` popcount
    (``_mask64``), not as a shift-and-OR loop over the codes (twice as slow at 1e6 codes)."""
    g, q = np.zeros(N, np.uint32), np.zeros(1, np.uint32)
    bufi, bufd = np.zeros(N + 128, np.int64), np.zeros(N + 128, np.int32)
    ir = ir_of(_kernels._within1, q, g, np.int64(N), np.int64(9), bufi, bufd, np.zeros(65, np.int32),
               _kernels.all_live(N))
    assert "llvm.ctpop.v64i32" in ir
    assert "llvm.masked.gather" not in ir
