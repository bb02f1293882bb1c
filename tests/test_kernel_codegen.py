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
    # AVX2 without AVX-512: the byte counts summed by vpmaddubsw / vpmaddwd (_ir_stage1_avx2)
    assert ("llvm.x86.avx2.pmadd.ub.sw" if _kernels.AVX2_BYTE_COUNTS else "llvm.ctpop.v64i32") in ir
    assert "llvm.masked.gather" not in ir


def _block_distances(avx2: bool):
    """An njit function ``f(g, base, q, planes, out)``: ``out[:64]`` = the distances of the 64 codes
    ``g[base:base + 64]`` to the word ``q`` as ``_ir_stage1`` computes them (``avx2``: its AVX2 path), weighted
    by the 4 weight planes ``planes`` (uint32 [4]) unless they are all zero."""
    from llvmlite import ir as llir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def dist64(typingctx, arr, base, q, planes, weighted, out):
        def codegen(context, builder, signature, args):
            g, p, o = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 5))
            vt = llir.VectorType(llir.IntType(32), 64)

            def splat(v):
                return _kernels._splat(builder, v, vt)

            x = builder.load(builder.bitcast(builder.gep(g.data, [args[1]]), vt.as_pointer()), align=4)
            x = builder.xor(x, splat(context.cast(builder, args[2], signature.args[2], types.uint32)))
            wp = [splat(builder.load(builder.gep(p.data, [llir.Constant(llir.IntType(64), b)]))) for b in range(4)]
            target = builder.bitcast(o.data, vt.as_pointer())
            with builder.if_else(args[4]) as (then, otherwise):
                with then:
                    builder.store(_kernels._ir_stage1(builder, x, vt, wp, avx2=avx2), target, align=4)
                with otherwise:
                    builder.store(_kernels._ir_stage1(builder, x, vt, None, avx2=avx2), target, align=4)
            return context.get_dummy_value()

        return types.void(arr, base, q, planes, weighted, out), codegen

    @numba.njit
    def f(g, base, q, planes, out):
        dist64(g, base, q, planes, bool(planes.any()), out)

    return f


@pytest.mark.parametrize("avx2", [False, True])
def test_stage1_block_distances_match_numpy(avx2):
    """Both ways ``_ir_stage1`` can compile (LLVM's vector popcount; per-byte counts summed by vpmaddubsw /
    vpmaddwd, chosen on AVX2 hosts without AVX-512) give the Hamming and 4-bit weighted distances of NumPy's
    bit counts, on random codes and weights, all-zero and all-one words included."""
    import llvmlite.binding as llvm_binding

    if avx2 and not llvm_binding.get_host_cpu_features().get("avx2"):
        pytest.skip("the AVX2 path needs an AVX2 host")
    rng = np.random.default_rng(3)
    g = rng.integers(0, 2**32, 64 * 8, dtype=np.uint64).astype(np.uint32)
    g[:2] = (0, 2**32 - 1)
    f = _block_distances(avx2)
    bits = np.unpackbits(g.view(np.uint8).reshape(-1, 4)[:, ::-1], axis=1)[:, ::-1]  # bit j of each word
    for q in (np.uint32(0), np.uint32(2**32 - 1), *rng.integers(0, 2**32, 6, dtype=np.uint64).astype(np.uint32)):
        qbits = np.unpackbits(np.array([q]).view(np.uint8)[::-1])[::-1]
        for weights in (None, rng.integers(0, 16, 32)):
            planes = np.zeros(4, np.uint32)
            if weights is not None:  # plane b: the bits whose weight has bit b set
                for b in range(4):
                    planes[b] = sum(1 << j for j in range(32) if weights[j] >> b & 1)
            w = np.ones(32, np.int64) if weights is None else weights
            for base in (0, 64 * 7):
                out = np.zeros(64, np.int32)
                f(g, np.int64(base), q, planes, out)
                expected = ((bits[base:base + 64] != qbits) * w).sum(axis=1)
                np.testing.assert_array_equal(out, expected)


def test_weighted_masks_from_byte_planes_match_numpy():
    """``_bpmask64d`` (one query's stage 1 from the index's planes; on hosts without AVX2 its lane-by-lane form)
    from ``lay_planes`` and ``_nibble_tables`` (as ``_table_words``): the codes whose 4-bit weighted distance
    (NumPy: the weights of the differing bits) is ``<= hi``, for thresholds up to 254, where distances of up to
    480 saturate at 255, and every distance, saturated; and ``_nibmask64`` (a batch's masks) from the codes'
    nibble planes (``_nibble_block``): the same masks."""
    import numba

    @numba.njit
    def masks(g, q0, planes4, hi, out, sums):
        buf = np.empty(256 * 2, np.uint8)
        tables = np.empty(128, np.uint8)
        _kernels._nibble_tables(q0, (planes4[0], planes4[1], planes4[2], planes4[3]), tables)
        _kernels.lay_planes(g, 0, 2, buf)
        tw = _kernels._table_words(tables)
        nib = np.empty(512 * 2, np.uint8)
        for b in range(2):
            _kernels._nibble_block(g, b, nib, 512 * b)
            out[0, b] = _kernels._bpmask64d(buf, 256 * b, tw, hi, sums[64 * b :])
            out[1, b] = _kernels._nibmask64(nib, 512 * b, tw, hi)

    rng = np.random.default_rng(11)
    g = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    bits = np.unpackbits(g.view(np.uint8).reshape(-1, 4)[:, ::-1], axis=1)[:, ::-1]  # bit j of each word
    for trial in range(6):
        q = np.uint32(rng.integers(0, 2**32)) if trial else np.uint32(0)
        g[:3] = (q, ~q, q ^ np.uint32(1))  # distance 0, every bit, one bit
        bits = np.unpackbits(g.view(np.uint8).reshape(-1, 4)[:, ::-1], axis=1)[:, ::-1]
        qbits = np.unpackbits(np.array([q]).view(np.uint8)[::-1])[::-1]
        weights = np.full(32, 15) if trial == 1 else rng.integers(0, 16, 32)  # trial 1: distances up to 480
        planes = np.array([sum(1 << j for j in range(32) if weights[j] >> b & 1) for b in range(4)], np.uint32)
        dist = ((bits != qbits) * weights).sum(axis=1)
        for hi in (0, 1, 30, 60, 120, 200, 254):
            out, sums = np.zeros((2, 2), np.uint64), np.zeros(128, np.uint8)
            masks(g, q, planes, hi, out, sums)
            for form in range(2):  # from the byte planes, then from the nibble planes
                got = np.array([(int(out[form, j // 64]) >> (j % 64)) & 1 for j in range(128)], bool)
                np.testing.assert_array_equal(got, dist <= hi, err_msg=f"trial {trial}, hi {hi}, form {form}")
            np.testing.assert_array_equal(sums, np.minimum(dist, 255), err_msg=f"trial {trial}, hi {hi}")
