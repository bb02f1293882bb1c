"""numba kernels for Hamming search (the hot path of Sec. 3.1); wrapped by ``hamming`` and ``coarse_to_fine``.

Kernels read packed codes as 64-bit words, or 32-bit words when the length is not a multiple of 64 bits
(see ``words``; coarse-to-fine stage 1 always uses 32-bit words), so a distance costs a few XOR +
popcount instructions per code. The wrappers choose the word type, so each kernel is compiled once per
word type a program uses (``cache=True``: once per machine).

The gallery is scanned in blocks of 64 codes. The distances of a block are computed in a loop of constant
trip count that LLVM vectorises (``vpopcnt`` on AVX-512 machines) and compared with a bound in the same
loop, giving a 64-bit mask of the codes that pass; the few passing codes are then extracted with
count-trailing-zeros, four at a time without branches. Top-k keeps lowering that bound as it goes (the
k-th distance so far), so most blocks yield an empty mask and cost only the distance computation.

A batch of CtF top-k queries (``ctf_topk_batch``) scans the gallery once per group of up to 64 queries,
in tiles of 8,192 codes that stay in L1 while every query of the group is compared with them; each query's
stage-1 hits get their stage-2 distances while the tile's longer codes are still in cache, and only the
later stages run query by query.

Conventions: distances int32, gallery positions int64, results exact and deterministic: ties always
keep gallery order (stable counting sort), whatever the word or block size.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_JIT = dict(cache=True, nogil=True, boundscheck=False)
BLOCK = 64  # codes per block: one bit each in a uint64 mask
INT32_MAX = np.iinfo(np.int32).max


@intrinsic
def _popcnt(typingctx, x):
    """Number of set bits (LLVM ctpop: one popcnt / vpopcnt); int32 for <= 32-bit inputs, else int64."""
    if not isinstance(x, types.Integer):
        return None
    rt = types.int32 if x.bitwidth <= 32 else types.int64

    def codegen(context, builder, signature, args):
        (v,) = args
        r = builder.call(builder.module.declare_intrinsic("llvm.ctpop", [v.type]), [v])
        return builder.zext(r, context.get_value_type(rt)) if v.type.width < rt.bitwidth else r

    return rt(x), codegen


@intrinsic
def _ctz(typingctx, x):
    """Index of the lowest set bit of a uint64 (LLVM cttz: tzcnt); 64 when ``x == 0``."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        (v,) = args
        fnty = ir.FunctionType(v.type, [v.type, ir.IntType(1)])
        fn = builder.module.declare_intrinsic("llvm.cttz", [v.type], fnty)
        return builder.call(fn, [v, ir.Constant(ir.IntType(1), 0)])

    return types.int64(x), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line holding ``arr[idx]`` (LLVM prefetch; never faults)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def _splat(builder, value, vt):
    """IR: ``value`` (of ``vt``'s element type) in every lane of the vector type ``vt``."""
    undef = ir.Constant(vt, ir.Undefined)
    v = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))


def _host_features() -> dict | None:
    """The CPU features the kernels are compiled for: the host's, or None when numba targets another CPU
    (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, e.g. for portable caches)."""
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return None
    return dict(llvm_binding.get_host_cpu_features())


_FEATURES = _host_features()
# AVX2 without AVX-512 (e.g. AMD Zen 2/3, Intel client cores): _ir_stage1 sums per-byte popcounts with
# vpmaddubsw / vpmaddwd, and the batch scan keeps its stage-2 candidates with the scalar loop, not _keep8
# (without AVX-512 LLVM turns its gathers and compresses into lane-by-lane extracts and stores).
AVX2_BYTE_COUNTS = _FEATURES is not None and bool(_FEATURES.get("avx2")) and not _FEATURES.get("avx512f")
VECTOR_KEEP = _FEATURES is None or bool(_FEATURES.get("avx512f"))
# AVX2 without AVX-512: a batch's weighted stage 1 reads each tile as byte planes through per-query nibble
# tables (_nibmask64) when its threshold is below 255
BYTE_PLANES = AVX2_BYTE_COUNTS
BYTE_PLANES_MAX_T = 254  # largest threshold the byte-plane masks take (their byte counts saturate at 255)


@njit(inline="always", **_JIT)
def planes_take(t):
    """Whether the byte-plane masks (``_bpmask64d``, ``_nibmask64``) are exact for the stage-1 threshold ``t``
    (Python callers: ``planes_take.py_func``, without a dispatch)."""
    return 0 <= t <= BYTE_PLANES_MAX_T


def _ir_nibbles(builder, x):
    """IR: the low and the high nibble of each byte of the ``<32 x i8>`` vector ``x``, as bytes."""
    b32, w16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
    low = ir.Constant(b32, [15] * 32)
    high = builder.bitcast(builder.lshr(builder.bitcast(x, w16), ir.Constant(w16, [4] * 16)), b32)
    return builder.and_(x, low), builder.and_(high, low)


def _ir_byte_counts(builder, x):
    """IR: the popcount of each byte of the ``<32 x i8>`` vector ``x`` (``vpshufb`` of a nibble table, twice)."""
    b32 = ir.VectorType(ir.IntType(8), 32)
    table = ir.Constant(b32, [bin(i % 16).count("1") for i in range(32)])
    pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(b32, [b32, b32]), "llvm.x86.avx2.pshuf.b")
    lo, hi = _ir_nibbles(builder, x)
    return builder.add(builder.call(pshufb, [table, lo]), builder.call(pshufb, [table, hi]))


def _ir_stage1_avx2(builder, x, vt, planes):
    """``_ir_stage1`` for ``<8k x i32>`` on AVX2 without AVX-512: LLVM's ``ctpop`` there widens each byte
    count with two unpacks, two ``vpsadbw`` and a pack per 8 lanes (5 shuffles); here the byte counts (weighted
    ones combined as bytes: at most 8 * 15 = 120) are summed per lane by ``vpmaddubsw`` and ``vpmaddwd``
    (multiplier ports). 1e6 32-bit codes, one query's masks on an AMD Zen 2: 190 against 242 us."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    b32, w16, d8 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)

    def fn(name, ret, *argtys):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(argtys)), name)

    maddubs, maddwd = fn("llvm.x86.avx2.pmadd.ub.sw", w16, b32, b32), fn("llvm.x86.avx2.pmadd.wd", d8, w16, w16)
    undef = ir.Constant(vt, ir.Undefined)
    parts = []
    for c in range(vt.count // 8):
        lanes = ir.Constant(ir.VectorType(i32, 8), list(range(8 * c, 8 * c + 8)))
        xc = builder.shuffle_vector(x, undef, lanes)
        if planes is None:
            counts = _ir_byte_counts(builder, builder.bitcast(xc, b32))
        else:
            counts = None
            for b, plane in enumerate(planes):
                pc = builder.shuffle_vector(plane, undef, lanes)
                cb = _ir_byte_counts(builder, builder.bitcast(builder.and_(xc, pc), b32))
                if b:  # 2^b times a byte count <= 8: no carry into the next byte of the 16-bit shift
                    cb = builder.bitcast(builder.shl(builder.bitcast(cb, w16), ir.Constant(w16, [b] * 16)), b32)
                counts = cb if counts is None else builder.add(counts, cb)
        pairs = builder.call(maddubs, [counts, ir.Constant(b32, [1] * 32)])
        parts.append(builder.call(maddwd, [pairs, ir.Constant(w16, [1] * 16)]))
    while len(parts) > 1:  # concatenate back to <8k x i32>
        m = parts[0].type.count
        both = ir.Constant(ir.VectorType(i32, 2 * m), list(range(2 * m)))
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], both) for i in range(0, len(parts), 2)]
    return parts[0]


def _ir_stage1(builder, x, vt, planes, avx2=None):
    """IR of ``_word_dist`` on the vector ``x = q ^ g`` of type ``vt``: its popcount, or with ``planes`` (the
    4 weight planes, each splat to ``vt``) ``sum_b 2^b popcount(x & plane_b)``. ``avx2``: use
    ``_ir_stage1_avx2`` (default ``AVX2_BYTE_COUNTS``; 32-bit lanes only)."""
    if (AVX2_BYTE_COUNTS if avx2 is None else avx2) and vt.element.width == 32 and vt.count % 8 == 0:
        return _ir_stage1_avx2(builder, x, vt, planes)
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]),
                                           f"llvm.ctpop.v{vt.count}i{vt.element.width}")
    if planes is None:
        return builder.call(ctpop, [x])
    d = None
    for b, plane in enumerate(planes):
        c = builder.call(ctpop, [builder.and_(x, plane)])
        if b:
            c = builder.shl(c, ir.Constant(vt, [b] * vt.count))
        d = c if d is None else builder.add(d, c)
    return d


@intrinsic
def _mask64(typingctx, arr, base, q, hi):
    """Mask of the 64 codes ``arr[base:base + 64]`` (a ``uint32`` or ``uint64`` word view, one word per
    code) whose distance to the word ``q`` is ``<= hi``: one vector load, XOR, popcount and compare on
    ``<64 x iN>`` and a bitcast of the ``<64 x i1>`` result (``vpopcnt`` + ``vpcmp`` into mask registers on
    AVX-512), where a shift-and-OR loop over the codes compiles to narrow vectors and one masked OR per 4
    codes (twice as slow: 1e6 32-bit codes, one query, 148 against 71 us). Reads through the array's data
    pointer: ``base`` is trusted (full blocks only)."""
    if not (isinstance(arr, types.Array) and arr.dtype in (types.uint32, types.uint64)
            and isinstance(base, types.Integer)):
        return None
    word = types.int64 if arr.dtype == types.uint64 else types.int32

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        width = word.bitwidth
        vt = ir.VectorType(ir.IntType(width), BLOCK)

        def splat(i):
            return _splat(builder, context.cast(builder, args[i], signature.args[i], word), vt)

        x = builder.load(builder.bitcast(builder.gep(ary.data, [args[1]]), vt.as_pointer()), align=width // 8)
        d = _ir_stage1(builder, builder.xor(x, splat(2)), vt, None)
        return builder.bitcast(builder.icmp_signed("<=", d, splat(3)), ir.IntType(BLOCK))

    return types.uint64(arr, base, q, hi), codegen


@intrinsic
def _wmask64(typingctx, arr, base, q, wp, hi):
    """``_mask64`` for a weighted stage 1: the mask of the 64 codes ``arr[base:base + 64]`` (``uint32``, one
    word per code) whose weighted distance ``sum_b 2^b popcount((q ^ g) & wp[b])`` (``wp``: the 4 weight
    planes of the query's word, ``_word_planes``) is ``<= hi``, computed on ``<64 x i32>`` vectors (an AND,
    popcount and shift per plane) and compared into a mask without storing the distances."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint32 and isinstance(base, types.Integer)
            and isinstance(wp, types.UniTuple) and wp.count == WEIGHT_PLANES):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vt = ir.VectorType(ir.IntType(32), BLOCK)

        def splat(value, ty):
            return _splat(builder, context.cast(builder, value, ty, types.int32), vt)

        x = builder.load(builder.bitcast(builder.gep(ary.data, [args[1]]), vt.as_pointer()), align=4)
        x = builder.xor(x, splat(args[2], signature.args[2]))
        planes = [splat(builder.extract_value(args[3], b), signature.args[3].dtype) for b in range(WEIGHT_PLANES)]
        d = _ir_stage1(builder, x, vt, planes)
        return builder.bitcast(builder.icmp_signed("<=", d, splat(args[4], signature.args[4])), ir.IntType(BLOCK))

    return types.uint64(arr, base, q, wp, hi), codegen


@intrinsic
def _range_mask64(typingctx, arr, base, lo, hi):
    """Mask of the 64 distances ``arr[base:base + 64]`` (``int32``, computed before) within ``[lo, hi]``: one
    vector load and two compares on ``<64 x i32>``, where a shift-and-OR loop over them stays scalar. Reads
    through the array's data pointer: ``base`` is trusted (full blocks only)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(base, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vt = ir.VectorType(ir.IntType(32), BLOCK)

        def splat(i):
            return _splat(builder, context.cast(builder, args[i], signature.args[i], types.int32), vt)

        x = builder.load(builder.bitcast(builder.gep(ary.data, [args[1]]), vt.as_pointer()), align=4)
        inside = builder.and_(builder.icmp_signed(">=", x, splat(2)), builder.icmp_signed("<=", x, splat(3)))
        return builder.bitcast(inside, ir.IntType(BLOCK))

    return types.uint64(arr, base, lo, hi), codegen


def _bytes_arrays(*tys) -> bool:
    """Whether every numba type in ``tys`` is a ``uint8`` array (the byte-plane intrinsics' arguments)."""
    return all(isinstance(t, types.Array) and t.dtype == types.uint8 for t in tys)


_TABLE_WORDS = types.UniTuple(types.uint64, 16)  # a query's 128 bytes of nibble tables as values (_table_words)


@intrinsic
def _table_words(typingctx, tables):
    """A query's nibble tables (``uint8 [128]``, ``_nibble_tables``) as a tuple of 16 ``uint64`` values, the form
    the byte-plane masks take. Loaded once before a loop over blocks, they stay in registers: read from the
    array in the loop, LLVM reloads all 8 tables for every 32 codes, since the loop's stores (hits, distances)
    might alias them (AMD Zen 2, one query's stage 1 at 1e6 codes: 153 -> 132 us)."""
    if not _bytes_arrays(tables):
        return None

    def codegen(context, builder, signature, args):
        t = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        words = builder.bitcast(t.data, i64.as_pointer())
        out = ir.Constant(context.get_value_type(_TABLE_WORDS), ir.Undefined)
        for w in range(16):
            out = builder.insert_value(out, builder.load(builder.gep(words, [ir.Constant(i64, w)]), align=1), w)
        return out

    return _TABLE_WORDS(tables), codegen


def _ir_at(builder, data, offset):
    """IR: the ``<32 x i8>`` pointer at byte ``offset`` (an i64 value) of an array's data pointer ``data``."""
    return builder.bitcast(builder.gep(data, [offset]), ir.VectorType(ir.IntType(8), 32).as_pointer())


def _ir_lookup(builder, table, idx):
    """IR: ``table[idx]`` for each byte of the ``<32 x i8>`` vectors (``idx < 16``, the table repeated in both
    halves): ``vpshufb`` on ``BYTE_PLANES`` hosts, elsewhere a lane-by-lane form that is never run."""
    i32, b32 = ir.IntType(32), ir.VectorType(ir.IntType(8), 32)
    if BYTE_PLANES:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(b32, [b32, b32]), "llvm.x86.avx2.pshuf.b")
        return builder.call(fn, [table, idx])
    out = ir.Constant(b32, ir.Undefined)
    for j in range(32):
        e = builder.extract_element(table, builder.extract_element(idx, ir.Constant(i32, j)))
        out = builder.insert_element(out, e, ir.Constant(i32, j))
    return out


def _ir_block_mask(builder, tw, hi, nibbles, out=None):
    """IR of the byte-plane masks: the ``i64`` mask of the 64 codes of a block whose distance through a query's
    nibble tables (``tw``, a ``_table_words`` value), summed with saturation at 255, is ``<= hi`` (an ``i64``
    value; exact for ``hi <= 254``). ``nibbles(half)``: the 8 ``<32 x i8>`` vectors of codes ``32 half ..
    32 half + 31``, vector ``2 p + h`` holding nibble h (0: low) of byte p of each. ``out``: a data pointer
    that receives the 64 distances, saturated at 255, or None."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    b32 = ir.VectorType(i8, 32)
    sat = cgutils.get_or_insert_function(builder.module, ir.FunctionType(b32, [b32, b32]), "llvm.uadd.sat.v32i8")
    both = ir.Constant(ir.VectorType(i32, 32), list(range(16)) * 2)
    tables = []
    for j in range(8):  # table j: words 2j and 2j + 1, repeated in both halves of a <32 x i8>
        v = ir.Constant(ir.VectorType(i64, 2), ir.Undefined)
        for h in range(2):
            v = builder.insert_element(v, builder.extract_value(tw, 2 * j + h), ir.Constant(i32, h))
        tb = builder.bitcast(v, ir.VectorType(i8, 16))
        tables.append(builder.shuffle_vector(tb, tb, both))
    hi = _splat(builder, builder.trunc(hi, i8), b32)
    halves = []
    for half in range(2):
        acc = None
        for j, x in enumerate(nibbles(half)):
            v = _ir_lookup(builder, tables[j], x)
            acc = v if acc is None else builder.call(sat, [acc, v])
        halves.append(builder.zext(builder.bitcast(builder.icmp_unsigned("<=", acc, hi), i32), i64))
        if out is not None:
            builder.store(acc, _ir_at(builder, out, ir.Constant(i64, 32 * half)), align=1)
    return builder.or_(halves[0], builder.shl(halves[1], ir.Constant(i64, 32)))


def _ir_block_planes(builder, data, b):
    """IR: the byte planes of block ``b`` (an i64 value) of the flat ``uint32`` codes at ``data``, as
    ``planes[half][p]``: the ``<32 x i8>`` of byte p (little-endian) of codes ``64 b + 32 half ..``. Byte
    shuffles of 32 codes at a time (``shufflevector``), where a loop of byte stores cost 2.6 ns a code wherever
    LLVM did not vectorise it (AMD Zen 2: ``lay_planes`` of 1e6 codes 2.6 -> 0.24 ms)."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    src = builder.bitcast(data, i8.as_pointer())
    first = builder.mul(b, ir.Constant(i64, 256))

    def shuffle(x, y, idx):
        return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 32), idx))

    planes = []
    for half in range(2):  # 128 bytes, four vectors of 8 codes
        v = [builder.load(_ir_at(builder, src, builder.add(first, ir.Constant(i64, 128 * half + 32 * r))), align=4)
             for r in range(4)]
        # pairs of vectors (16 codes): planes 0 and 1, planes 2 and 3, 16 bytes each
        pairs = [[shuffle(v[2 * h], v[2 * h + 1], [4 * c + p + e for e in (0, 1) for c in range(16)])
                  for p in (0, 2)] for h in range(2)]
        planes.append([shuffle(pairs[0][p // 2], pairs[1][p // 2],
                               [16 * (p % 2) + 32 * e + c for e in (0, 1) for c in range(16)]) for p in range(4)])
    return planes


def _int64(context, builder, signature, args, i):
    """IR: intrinsic argument ``i`` cast to ``int64``."""
    return context.cast(builder, args[i], signature.args[i], types.int64)


@intrinsic
def _bpmask64d(typingctx, planes, base, tw, hi, out):
    """The stage-1 mask of one block of 64 codes from its byte planes ``planes[base:base + 256]`` (``uint8``:
    plane p holds byte p of the 64 codes, ``lay_planes``) and a query's nibble tables (``_table_words`` of
    ``_nibble_tables``: the weighted distance of the low / high nibble of byte p for each of its 16 values): the
    codes whose distance, summed with saturation at 255, is ``<= hi`` (exact for ``hi <= 254``); each code's
    distance, saturated at 255, goes to ``out[:64]`` (``uint8``, exact for the codes within ``hi``), so the
    hits' distances need no second read of their codes. 8 ``vpshufb`` and 8 saturating byte adds per 32 codes,
    where ``_wmask64`` needs four byte counts a code. AVX2 hosts only (``BYTE_PLANES``); elsewhere it compiles
    to a lane-by-lane shuffle that is never run. Reads through the arrays' data pointers: ``base`` is trusted."""
    if not _bytes_arrays(planes, out) or tw != _TABLE_WORDS or not isinstance(base, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        g = context.make_array(signature.args[0])(context, builder, args[0])
        o = context.make_array(signature.args[4])(context, builder, args[4])
        base = _int64(context, builder, signature, args, 1)

        def nibbles(half):
            at = [_ir_at(builder, g.data, builder.add(base, ir.Constant(base.type, 64 * p + 32 * half)))
                  for p in range(4)]
            return [nib for ptr in at for nib in _ir_nibbles(builder, builder.load(ptr, align=1))]

        return _ir_block_mask(builder, args[2], _int64(context, builder, signature, args, 3), nibbles, o.data)

    return types.uint64(planes, base, tw, hi, out), codegen


def _block_layout(typingctx, g1, b, buf, o, nibbles: bool):
    """Typing and code generation of ``_planes_block`` (``nibbles`` False) and ``_nibble_block`` (True): block
    ``b`` of the flat ``uint32`` codes ``g1`` into ``buf`` from byte ``o`` on, through the arrays' data pointers
    (full blocks only, trusted offsets)."""
    if not (isinstance(g1, types.Array) and g1.dtype == types.uint32 and _bytes_arrays(buf)
            and isinstance(b, types.Integer) and isinstance(o, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        g = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(signature.args[2])(context, builder, args[2])
        o = _int64(context, builder, signature, args, 3)

        def store(x, offset):
            builder.store(x, _ir_at(builder, out.data, builder.add(o, ir.Constant(o.type, offset))), align=1)

        for half, planes in enumerate(_ir_block_planes(builder, g.data, _int64(context, builder, signature, args, 1))):
            for p, x in enumerate(planes):
                if nibbles:
                    for h, nibs in enumerate(_ir_nibbles(builder, x)):
                        store(nibs, 64 * (2 * p + h) + 32 * half)
                else:
                    store(x, 64 * p + 32 * half)
        return context.get_dummy_value()

    return types.void(g1, b, buf, o), codegen


@intrinsic
def _nibble_block(typingctx, g1, b, nib, dst):
    """Block ``b`` of the 32-bit codes ``g1`` (flat ``uint32``) as nibble planes in ``nib[dst:dst + 512]``: at
    ``dst + 64 (2 p + h)`` nibble h (0: low) of byte p of its 64 codes, one a byte, the layout ``_nibmask64``
    reads. Full blocks only; trusted offsets."""
    return _block_layout(typingctx, g1, b, nib, dst, nibbles=True)


@intrinsic
def _nibmask64(typingctx, nib, base, tw, hi):
    """``_bpmask64d``'s mask from a block's nibble planes (``nib[base:base + 512]``, ``_nibble_block``), without
    the distances: 8 ``vpshufb`` (each reading its index from memory) and 8 saturating adds per 32 codes, no
    nibble split. For a batch, whose queries all read the same tile: the split is made once per sub-tile rather
    than once per query (AMD Zen 2, stage 1 of a batch of 64 at 1e6 codes, sub-tiles of 32 blocks: 133 -> 105 us
    a query). Fast on ``BYTE_PLANES`` hosts only. Trusted offsets."""
    if not _bytes_arrays(nib) or tw != _TABLE_WORDS or not isinstance(base, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        N = context.make_array(signature.args[0])(context, builder, args[0])
        base = _int64(context, builder, signature, args, 1)

        def nibbles(half):
            return [builder.load(_ir_at(builder, N.data, builder.add(base, ir.Constant(base.type, 64 * j + 32 * half))),
                                 align=1) for j in range(8)]

        return _ir_block_mask(builder, args[2], _int64(context, builder, signature, args, 3), nibbles)

    return types.uint64(nib, base, tw, hi), codegen


@intrinsic
def _keep8(typingctx, g1, g2, pos, r, q0, q2a, q2b, hi2, ids, d0, d1, c, wp):
    """The 8 stage-1 hits ``pos[r:r + 8]`` of one query against 128-bit stage-2 codes (``g2``: two uint64
    words per code): gathers their 32-bit (``g1``) and 128-bit codes, and appends the positions, stage-1
    and stage-2 distances of those with a stage-2 distance ``<= hi2`` to ``ids`` / ``d0`` / ``d1`` from
    ``c`` on, in order; returns the new count. Vector gathers, ``vpopcnt`` and register compresses on
    ``<8 x i64>`` (LLVM's generic intrinsics; AVX-512 where present), each followed by a full 8-lane store,
    where the scalar loop costs about twice as much per hit on cached codes. Reads and writes through the
    arrays' data pointers: all must be C-contiguous, ``r + 8 <= len(pos)`` and ``c + 8 <= len(ids)``
    (lanes past the kept ones are written too), positions valid (trusted). ``wp``: the 4 weight planes of a
    weighted stage 1 (``_word_planes``; the stage-1 distances are then weighted), or None."""
    ok = (all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 for a in (g1, g2, pos, ids, d0, d1))
          and (g1.dtype, g2.dtype, pos.dtype, ids.dtype, d0.dtype, d1.dtype)
          == (types.uint32, types.uint64, types.int64, types.int64, types.int32, types.int32)
          and (isinstance(wp, types.NoneType) or (isinstance(wp, types.UniTuple) and wp.count == WEIGHT_PLANES)))
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        arrays = {i: context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 2, 8, 9, 10)}
        i1, i8, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v64, v32, vmask = ir.VectorType(i64, 8), ir.VectorType(i32, 8), ir.VectorType(i1, 8)
        every = ir.Constant(vmask, [1] * 8)

        def arg(i, ty):
            return context.cast(builder, args[i], signature.args[i], ty)

        def splat(v, vt):
            return _splat(builder, v, vt)

        def fn(name, ret, *argtys):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(argtys)), name)

        def gather(data, byte_offsets, vt, align):  # data + byte_offsets, one element per lane
            vptr = ir.VectorType(data.type, 8)
            addresses = builder.inttoptr(builder.add(splat(builder.ptrtoint(data, i64), v64), byte_offsets), vptr)
            name = f"llvm.masked.gather.v8i{vt.element.width}.v8p0"
            return builder.call(fn(name, vt, vptr, i32, vmask, vt),
                                [addresses, ir.Constant(i32, align), every, ir.Constant(vt, ir.Undefined)])

        p = builder.load(builder.bitcast(builder.gep(arrays[2].data, [arg(3, types.int64)]), v64.as_pointer()), align=8)
        g2 = arrays[1].data
        offsets = builder.shl(p, ir.Constant(v64, [4] * 8))  # 16 bytes per code
        lo = gather(g2, offsets, v64, 8)
        hi = gather(g2, builder.add(offsets, ir.Constant(v64, [8] * 8)), v64, 8)
        ctpop64 = fn("llvm.ctpop.v8i64", v64, v64)
        dist2 = builder.trunc(builder.add(builder.call(ctpop64, [builder.xor(lo, splat(arg(5, types.uint64), v64))]),
                                          builder.call(ctpop64, [builder.xor(hi, splat(arg(6, types.uint64), v64))])), v32)
        w1 = gather(arrays[0].data, builder.shl(p, ir.Constant(v64, [2] * 8)), v32, 4)
        wt = signature.args[12]  # the weight planes' type: None for the Hamming stage 1
        planes = None if isinstance(wt, types.NoneType) else [
            splat(context.cast(builder, builder.extract_value(args[12], b), wt.dtype, types.uint32), v32)
            for b in range(WEIGHT_PLANES)]
        dist1 = _ir_stage1(builder, builder.xor(w1, splat(arg(4, types.uint32), v32)), v32, planes)
        keep = builder.icmp_signed("<=", dist2, splat(arg(7, types.int32), v32))
        c = arg(11, types.int64)
        for values, out in ((p, arrays[8]), (dist1, arrays[9]), (dist2, arrays[10])):
            # compress in a register, then one full-width store (the lanes past the kept ones are overwritten
            # by the next call): the memory form of vpcompress that llvm.masked.compressstore becomes is
            # microcoded on AMD Zen 4 (the stage-1 survivors at 1e6 took 2x as long as this)
            vt = values.type
            packed = builder.call(fn(f"llvm.experimental.vector.compress.v8i{vt.element.width}", vt, vt, vmask, vt),
                                  [values, keep, ir.Constant(vt, ir.Undefined)])
            target = builder.bitcast(builder.gep(out.data, [c]), vt.as_pointer())
            builder.store(packed, target, align=vt.element.width // 8)
        kept = builder.call(fn("llvm.ctpop.i64", i64, i64), [builder.zext(builder.bitcast(keep, i8), i64)])
        return builder.add(c, kept)

    return types.int64(g1, g2, pos, r, q0, q2a, q2b, hi2, ids, d0, d1, c, wp), codegen


def _readonly(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only in place: every caller passes a fresh array or view of its own (one more view
    would cost 0.3 us a call)."""
    a.flags.writeable = False
    return a


def words(codes: np.ndarray) -> np.ndarray:
    """The word view the kernels read: ``uint64[n, L // 64]``, or ``uint32[n, L // 32]`` when L % 64 != 0.

    ``codes`` must be C-contiguous ``uint8[n, L // 8]`` with 8-byte aligned data. Choosing the word type
    here, not inside the kernels, compiles only the variants a program uses; views are always read-only
    so that writable, read-only and memory-mapped inputs share one compiled variant.
    """
    return _readonly(codes.view(np.uint64) if codes.shape[1] % 8 == 0 else codes.view(np.uint32))


def words32(codes: np.ndarray) -> np.ndarray:
    """Read-only ``uint32`` word view: the coarse-to-fine stage 1 always uses it (32- and 64-bit first
    stages stay on the fast 1- and 2-word paths), so the CtF kernels have a single specialisation."""
    return _readonly(codes.view(np.uint32))


def words64(codes: np.ndarray) -> np.ndarray:
    """Read-only ``uint64`` word view; codes whose length is not a multiple of 64 are zero-padded (a copy),
    which leaves every Hamming distance unchanged."""
    if codes.shape[1] % 8:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 8 - codes.shape[1] % 8), np.uint8)], axis=1)
    return _readonly(codes.view(np.uint64))


def stage_pad(n_later: int) -> tuple[np.ndarray, ...]:
    """Dummy stages that pad the later-stage tuple to a multiple of 8 (at least 8): one compiled variant
    for pyramids of 2 to 9 lengths."""
    return (_readonly(np.zeros((1, 1), np.uint64)),) * (-n_later % 8 if n_later else 8)


# --------------------------------------------------------------------------------------------- distances
# _IDX: numba wraps negative indices (a[-1] is the last item) even with boundscheck off, so ``g[base + j]``
# costs a compare and select per load that stops LLVM from vectorising the loop (the 32-bit distances of a
# gallery: 0.9 against 0.04 ns a code). Hot loops index slices with their own loop counters, which numba
# knows to be non-negative, or use unsigned indices.
# ``g`` is always the flat word view of a whole gallery (callers make one view per call; the slices of _IDX
# inside the inlined block helpers measured no slower than indexing ``g``) and ``W`` its words per code;
# explicit loops for W = 1 and 2 let LLVM vectorise across codes, longer codes vectorise along the words.
# numba does not inline one jitted function into another at the LLVM level, and a call per block of 64
# codes costs 2-7x in the scans, so the per-block helpers are inlined by numba (inline="always");
# everything else stays a plain call.
@njit(**_JIT)
def _dist_range(q, g, W, base, m, dd, off):
    """``dd[off + j] = popcount(q ^ code[base + j])`` for ``j < m`` (callers pass ints, not literals,
    so that numba compiles one variant per word type)."""
    o = dd[off : off + m]  # slices: indices that are loop counters vectorise (see _IDX)
    if W == 1:
        q0 = q[0]
        gg = g[base : base + m]
        for j in range(m):
            o[j] = _popcnt(q0 ^ gg[j])
    elif W == 2:
        q0 = q[0]
        q1 = q[1]
        gg = g[2 * base : 2 * (base + m)]
        for j in range(m):
            o[j] = _popcnt(q0 ^ gg[2 * j]) + _popcnt(q1 ^ gg[2 * j + 1])
    else:
        gg = g[W * base : W * (base + m)].reshape((m, W))
        for j in range(m):
            s = 0
            for w in range(W):
                s += _popcnt(q[w] ^ gg[j, w])
            o[j] = s


# One mask helper per word count: a block loop must not contain the other cases' branches, which stop
# LLVM from vectorising it; ``_select`` picks the helper once per query.
@njit(inline="always", **_JIT)
def _mask1(q, g, W, base, dd, hi):
    """Mask of the 64 codes at ``base`` whose distance is ``<= hi``: 1 word/code (``_mask64``; ``dd`` unused:
    no store of the distances, ``_extract1`` recomputes the few it needs)."""
    return _mask64(g, base, q[0], hi)


@njit(inline="always", **_JIT)
def _mask2(q, g, W, base, dd, hi):
    """``_mask1`` for 2 words per code."""
    q0 = q[0]
    q1 = q[1]
    h = np.int32(hi)
    mask = np.uint64(0)
    gg = g[2 * base : 2 * (base + BLOCK)]  # see _IDX
    for j in range(BLOCK):
        d = np.int32(_popcnt(q0 ^ gg[2 * j]) + _popcnt(q1 ^ gg[2 * j + 1]))
        dd[j] = d
        mask |= np.uint64(d <= h) << np.uint64(j)
    return mask


@njit(inline="always", **_JIT)
def _maskw(q, g, W, base, dd, hi):
    """``_mask1`` for W >= 3 words per code (vectorised along the words)."""
    for j in range(BLOCK):
        o = np.uint64(W * (base + j))  # unsigned: see _IDX
        s = 0
        for w in range(W):
            s += _popcnt(q[w] ^ g[o + np.uint64(w)])
        dd[j] = s
    h = np.int32(hi)
    mask = np.uint64(0)
    for j in range(BLOCK):
        mask |= np.uint64(dd[j] <= h) << np.uint64(j)
    return mask


@njit(**_JIT)
def _tail_mask(q, g, W, base, m, dd, hi):
    """``_mask1``/``_mask2``/``_maskw`` for the last, partial block of ``m < 64`` codes."""
    _dist_range(q, g, W, base, m, dd, np.int64(0))
    mask = np.uint64(0)
    for j in range(m):
        mask |= np.uint64(dd[j] <= hi) << np.uint64(j)
    return mask


@njit(inline="always", **_JIT)
def _extract(mask, base, dd, bufi, bufd, cnt):
    """Append the codes of ``mask`` (gallery position, distance) to the buffers; returns the new count.

    The first four are written without branches (``dd`` has a spare slot 64 for an exhausted mask and
    the buffers 4 spare slots); more than four hits per block is rare in a selective scan.
    """
    c = _popcnt(mask)
    j = _ctz(mask)
    bufi[cnt] = base + j
    bufd[cnt] = dd[j]
    mask &= mask - np.uint64(1)
    j = _ctz(mask)
    bufi[cnt + 1] = base + j
    bufd[cnt + 1] = dd[j]
    mask &= mask - np.uint64(1)
    j = _ctz(mask)
    bufi[cnt + 2] = base + j
    bufd[cnt + 2] = dd[j]
    mask &= mask - np.uint64(1)
    j = _ctz(mask)
    bufi[cnt + 3] = base + j
    bufd[cnt + 3] = dd[j]
    mask &= mask - np.uint64(1)
    if c > 4:
        r = cnt + 4
        while mask:
            j = _ctz(mask)
            bufi[r] = base + j
            bufd[r] = dd[j]
            r += 1
            mask &= mask - np.uint64(1)
    return cnt + c


@njit(inline="always", **_JIT)
def _extract1(mask, base, q0, g, bufi, bufd, cnt, wp):
    """``_extract`` for 1 word per code: recomputes the distance of each hit from the code (an L1 hit)
    instead of reloading it from the block's distance buffer, whose scalar reloads of just-written
    vector stores stall on store forwarding (~6 % of the 32-bit scan). An exhausted mask reads code
    ``base + (64 & 63)``, which exists, for the spare slots. ``wp``: the weight planes of a weighted stage
    1 (``_word_dist``), or None."""
    c = _popcnt(mask)
    j = _ctz(mask) & 63
    bufi[cnt] = base + j
    bufd[cnt] = _word_dist(q0 ^ g[base + j], wp)
    mask &= mask - np.uint64(1)
    j = _ctz(mask) & 63
    bufi[cnt + 1] = base + j
    bufd[cnt + 1] = _word_dist(q0 ^ g[base + j], wp)
    mask &= mask - np.uint64(1)
    j = _ctz(mask) & 63
    bufi[cnt + 2] = base + j
    bufd[cnt + 2] = _word_dist(q0 ^ g[base + j], wp)
    mask &= mask - np.uint64(1)
    j = _ctz(mask) & 63
    bufi[cnt + 3] = base + j
    bufd[cnt + 3] = _word_dist(q0 ^ g[base + j], wp)
    mask &= mask - np.uint64(1)
    if c > 4:
        r = cnt + 4
        while mask:
            j = _ctz(mask)
            bufi[r] = base + j
            bufd[r] = _word_dist(q0 ^ g[base + j], wp)
            r += 1
            mask &= mask - np.uint64(1)
    return cnt + c


@njit(**_JIT)
def _rows_dist(q, g, W, rows, c, out):
    """``out[j] = popcount(q ^ code[rows[j]])`` for ``j < c`` (gathers candidate codes, 64-bit words).

    Candidates are spread over the gallery, so each read is a cache miss (~220 ns here): the code some
    candidates ahead is prefetched to keep more misses in flight. Distances measured at 1e7 codes (random
    rows): 64 codes ahead for 128-bit codes, 32 for 512-bit codes, 12 for longer ones (12 to 96 measured
    alike). The loop along the words vectorises (it once needed an unrolled 512-bit copy, see _IDX: random
    rows of 2e6 codes, 17.1 ns a code unrolled against 15.5 for this loop, same-process A/B).
    """
    if W == 2:
        q0 = q[0]
        q1 = q[1]
        for j in range(c):
            _prefetch(g, 2 * rows[min(j + 64, c - 1)])
            o = np.uint64(2 * rows[j])  # unsigned: no wrap-around select per load (see _IDX)
            out[j] = _popcnt(q0 ^ g[o]) + _popcnt(q1 ^ g[o + np.uint64(1)])
    else:
        dist = 32 if W <= 8 else 12
        for j in range(c):
            ahead = W * rows[min(j + dist, c - 1)]
            for w in range(0, W, 8):  # every cache line of the code (also the last, if unaligned)
                _prefetch(g, ahead + w)
            _prefetch(g, ahead + W - 1)
            o = np.uint64(W * rows[j])
            s = 0
            for w in range(W):  # vectorised along the words (unsigned index: see _IDX)
                s += _popcnt(q[w] ^ g[o + np.uint64(w)])
            out[j] = s


@njit(**_JIT)
def _dist_tiles(Q, q0, qb, g, W, n, out):
    """``out[a, j] = Hamming(Q[q0 + a], code j)`` for ``a < qb``, gallery tile by tile: a batch of queries
    reads each ~128 KB tile of the gallery while it is in the L2 cache (long codes are memory-bound)."""
    tile = max(BLOCK, (1 << 17) // (8 * W))
    for t0 in range(0, n, tile):
        m = min(tile, n - t0)
        for a in range(qb):
            _dist_range(Q[q0 + a], g, W, t0, m, out[a], t0)


@njit(**_JIT)
def distances(Q, G, out):
    """``out[i, j] = Hamming(Q[i], G[j])``; ``Q``/``G`` are word views ``[., W]`` (see ``words``)."""
    n, W = G.shape
    _dist_tiles(Q, np.int64(0), Q.shape[0], G.reshape(n * W), W, n, out)


# ------------------------------------------------------------------------------------------ counting sort
def _at(order, r):
    """``order[r]``, or ``r`` when ``order`` is None (the identity permutation, without an array)."""


@overload(_at, inline="always")
def _at_impl(order, r):
    if isinstance(order, types.NoneType):
        return lambda order, r: r
    return lambda order, r: order[r]


SORT_TABLES_MIN = 256  # _sort_by_key: four count tables for this many items
SORT_SCRATCH_MIN = 512  # _sort_by_key: scatter into an L1 scratch for this many items
SORT_SCRATCH_MAX = 3072  # ... up to this many (24 KB of int64)


@njit(**_JIT)
def _sort_by_key(keys, order, c, L, out_order, out_keys):
    """Stable counting sort of ``order[:c]`` by ``keys[order[r]]`` (values in [0, L]; ``order=None``: 0..c-1).

    Writes the sorted entries of ``order`` to ``out_order[:c]`` and the sorted keys to ``out_keys[:c]``.
    Only the bins between the smallest and the largest key are visited, so sorting a few candidates by
    a long code does not cost O(L).

    A plain counting sort is one chain through memory: each item loads its bin's next slot, which the
    item before may just have stored (distances take few distinct values), and the CPU holds such loads
    back until the store before them is done. So items go four at a time: four slot loads, the slots of
    equal bins among the four raised by the equal bins before them (stable), then four stores: one round
    trip per four items. From SORT_TABLES_MIN items on, the counts use four tables (one allocation), one per
    item of the four. Between SORT_SCRATCH_MIN and SORT_SCRATCH_MAX items, the positions are scattered into
    a scratch array that stays in the L1 cache and then copied out in order: scattered stores into a cold
    output row wait on its cache lines, one copy does not (more items: the scratch leaves L1 and the copy
    costs more than it saves). AMD Zen 2, one
    thread, ``benchmarks/bench_rank.py`` medians, µs a query: ``hamming_rank`` at 32 bits 13.5 -> 9.8
    (2,276 items), 33 -> 29 (7,365), 80 -> 68 (15,913); ``weighted_rank`` 14.8 -> 12.6, 40 -> 36, 89 -> 78.
    The former version cut the items into four chunks with a table each, which was no faster there.
    """
    if c == 0:
        return
    lo = L
    hi = 0
    for r in range(c):
        v = keys[_at(order, r)]
        lo = min(lo, v)
        hi = max(hi, v)
    nb = hi - lo + 1
    big = c >= SORT_TABLES_MIN  # (fewer items: one count table)
    tables = np.zeros(4 * nb if big else nb, np.int64)  # one allocation: a sort of few candidates is short
    t0 = tables[:nb]
    t1 = tables[nb : 2 * nb]
    t2 = tables[2 * nb : 3 * nb]
    t3 = tables[3 * nb :]
    c4 = c - c % 4
    ulo = np.uint64(lo)
    h4 = c4 if big else 0
    for r in range(0, h4, 4):
        t0[np.uint64(keys[_at(order, r)]) - ulo] += 1
        t1[np.uint64(keys[_at(order, r + 1)]) - ulo] += 1
        t2[np.uint64(keys[_at(order, r + 2)]) - ulo] += 1
        t3[np.uint64(keys[_at(order, r + 3)]) - ulo] += 1
    for r in range(h4, c):
        t0[np.uint64(keys[_at(order, r)]) - ulo] += 1
    pos = 0
    for b in range(nb):  # t0: each bin's first slot
        start = pos
        pos += t0[b]
        if big:
            pos += t1[b] + t2[b] + t3[b]
        t0[b] = start
        for r in range(start, pos):  # sorted keys: a run of lo + b
            out_keys[r] = lo + b
    scratch = SORT_SCRATCH_MIN <= c <= SORT_SCRATCH_MAX
    dst = np.empty(c, out_order.dtype) if scratch else out_order
    for r in range(0, c4, 4):
        a0 = _at(order, r)
        a1 = _at(order, r + 1)
        a2 = _at(order, r + 2)
        a3 = _at(order, r + 3)
        v0 = np.uint64(keys[a0]) - ulo
        v1 = np.uint64(keys[a1]) - ulo
        v2 = np.uint64(keys[a2]) - ulo
        v3 = np.uint64(keys[a3]) - ulo
        p0 = t0[v0]
        p1 = t0[v1] + (v1 == v0)
        p2 = t0[v2] + (v2 == v0) + (v2 == v1)
        p3 = t0[v3] + (v3 == v0) + (v3 == v1) + (v3 == v2)
        t0[v0] = p0 + 1  # in item order: the last store of a bin holds its next free slot
        t0[v1] = p1 + 1
        t0[v2] = p2 + 1
        t0[v3] = p3 + 1
        dst[np.uint64(p0)] = a0
        dst[np.uint64(p1)] = a1
        dst[np.uint64(p2)] = a2
        dst[np.uint64(p3)] = a3
    for r in range(c4, c):
        a = _at(order, r)
        v = np.uint64(keys[a]) - ulo
        p = t0[v]
        t0[v] = p + 1
        dst[np.uint64(p)] = a
    if scratch:
        out_order[:c] = dst


@njit(**_JIT)
def _sort_identity(keys, c, L, out_order, out_keys):
    """``_sort_by_key`` with ``order = 0..c-1`` (compiled without the order array)."""
    _sort_by_key(keys, None, c, L, out_order, out_keys)


@njit(**_JIT)
def counting_sort_rows(D, L, out):
    """Row-wise stable ascending counting sort of int32 distances in [0, L]: ``out[i]`` = argsort of ``D[i]``."""
    n = D.shape[1]
    keys_out = np.empty(n, np.int32)
    for i in range(D.shape[0]):
        _sort_identity(D[i], n, L, out[i], keys_out)


# --------------------------------------------------------------------------------------- full rankings
@njit(**_JIT)
def _rank_one(q, g, W, L, d, outD, outI):
    """Full ranking of one query (distances, histogram of L + 1 bins, prefix sum, stable scatter)."""
    n = d.shape[0]
    _dist_range(q, g, W, np.int64(0), n, d, np.int64(0))
    _sort_identity(d, n, L, outI, outD)


@njit(**_JIT)
def rank(Q, G, L, outD, outI):
    """Full rankings ``outI[i]`` (stable: ties keep gallery order) and sorted distances ``outD[i]``;
    distances for batches of up to 32 queries at a time (``_dist_tiles``), at most ~16 MB of them."""
    n, W = G.shape
    g = G.reshape(n * W)
    nq = Q.shape[0]
    qb_max = max(1, min(32, nq, (1 << 22) // max(n, 1)))
    d = np.empty((qb_max, n), np.int32)
    for q0 in range(0, nq, qb_max):
        qb = min(qb_max, nq - q0)
        _dist_tiles(Q, q0, qb, g, W, n, d)
        for a in range(qb):
            _sort_identity(d[a], n, L, outI[q0 + a], outD[q0 + a])


# ------------------------------------------------------------------------------------------------ top-k
@njit(**_JIT)
def _compact(bufi, bufd, cnt, k, hist, L):
    """Keep, in order, the first ``k`` buffered codes of the ranking; returns (new count, k-th distance).

    The buffer is in gallery order, so among codes at the k-th distance the earliest are kept.
    """
    hist[: L + 1] = 0
    for c in range(cnt):
        hist[bufd[c]] += 1
    acc = 0
    t = 0
    while acc + hist[t] < k:
        acc += hist[t]
        t += 1
    room = k - acc  # codes at distance exactly t that still fit
    w = 0
    for c in range(cnt):
        v = bufd[c]
        keep = v < t or (v == t and room > 0)
        if v == t and room > 0:
            room -= 1
        if keep:
            bufi[w] = bufi[c]
            bufd[w] = v
            w += 1
    return w, t


@njit(**_JIT)
def _select(q, g, W, n, L, k, hi, bufi, bufd, hist, dd, live):
    """Scan the gallery for the first ``k`` codes of the ranking among those with ``d <= hi``.

    Returns how many codes the buffers hold, in gallery order (unsorted); with ``k >= n`` that is every
    code within ``hi`` (the coarse stage of CtF). Whenever the buffer is full it keeps only the first
    ``k`` and lowers the bound to (k-th distance - 1): later codes at the k-th distance rank after the
    k codes already seen, so the block mask skips them. The buffers need ``min(k, n) + 4096 + 128``
    slots, or ``n + 128`` with ``k >= n``. The first compaction comes after ``4 k + 512`` buffered codes
    at most, so that small galleries also get a tight bound early. ``live``: one word per block of 64
    codes, bit j set iff code ``64 b + j`` is live (removed codes never enter the buffers).
    """
    cap = min(bufi.shape[0] - BLOCK - 4, 4 * k + 512)
    tau = hi
    cnt = 0
    nfull = n // BLOCK
    # three copies of one loop, each with its own inlined mask helper (see _mask1)
    if W == 1:
        q0 = q[0]
        for b in range(nfull):
            if tau < 0:
                break  # k codes at distance 0 already: nothing later can enter
            mask = _mask1(q, g, W, b * BLOCK, dd, tau) & live[b]
            cnt = _extract1(mask, b * BLOCK, q0, g, bufi, bufd, cnt, None)
            if cnt > cap:
                cnt, t = _compact(bufi, bufd, cnt, k, hist, L)
                tau = t - 1
    elif W == 2:
        for b in range(nfull):
            if tau < 0:
                break
            mask = _mask2(q, g, W, b * BLOCK, dd, tau) & live[b]
            cnt = _extract(mask, b * BLOCK, dd, bufi, bufd, cnt)
            if cnt > cap:
                cnt, t = _compact(bufi, bufd, cnt, k, hist, L)
                tau = t - 1
    else:
        for b in range(nfull):
            if tau < 0:
                break
            mask = _maskw(q, g, W, b * BLOCK, dd, tau) & live[b]
            cnt = _extract(mask, b * BLOCK, dd, bufi, bufd, cnt)
            if cnt > cap:
                cnt, t = _compact(bufi, bufd, cnt, k, hist, L)
                tau = t - 1
    m = n - nfull * BLOCK
    if m > 0 and tau >= 0:
        base = nfull * BLOCK
        mask = _tail_mask(q, g, W, base, m, dd, tau) & live[nfull]
        cnt = _extract(mask, base, dd, bufi, bufd, cnt)
    if cnt > k:
        cnt, t = _compact(bufi, bufd, cnt, k, hist, L)
    return cnt


@njit(**_JIT)
def _within1(q, g, n, hi, bufi, bufd, dd, live):
    """All codes within ``hi`` in gallery order, 1 word per code (the CtF stage 1 at 32 bits): the loop of
    ``_select`` without its bound updates and compaction checks; returns the count. The buffers need
    ``n + 128`` slots."""
    q0 = q[0]
    h = np.int32(hi)
    cnt = 0
    nfull = n // BLOCK
    for b in range(nfull):
        base = b * BLOCK
        cnt = _extract1(_mask1(q, g, 1, base, dd, h) & live[b], base, q0, g, bufi, bufd, cnt, None)
    m = n - nfull * BLOCK
    if m > 0:
        base = nfull * BLOCK
        mask = _tail_mask(q, g, 1, base, m, dd, hi) & live[nfull]
        cnt = _extract(mask, base, dd, bufi, bufd, cnt)
    return cnt


@njit(**_JIT)
def _within_planes(Q1, P1, i, SP, g, n, hi, bufi, bufd, live):
    """``_within1`` (or ``_within_weighted`` for one word a code) of query ``i`` (weight planes ``P1``, or None)
    from the stage-1 codes' byte planes kept by the index (``SP``: 256 bytes a full block, ``lay_planes``) and
    the query's nibble tables (``_query_tables``), for ``0 <= hi <= BYTE_PLANES_MAX_T`` (fast on ``BYTE_PLANES``
    hosts): a lookup per nibble in place of a byte
    count per weight plane, so a weighted stage 1 costs what a Hamming one does. The hits' distances come from
    the masks' own sums (``_bpmask64d``): read from the codes instead, they are a second stream from memory
    (AMD Zen 2, stage 1 of one query at 1e6 codes: 220 us, 179 from the sums, 249 for ``_within1``; at 1e7:
    4,990, 3,450 and 3,709)."""
    q = Q1[i]
    q0 = q[0]
    wp = _planes_of(P1, i)
    tables = np.zeros(128, np.uint8)
    _query_tables(P1, i, q0, tables)
    cnt = 0
    nfull = n // BLOCK
    d8 = np.zeros(BLOCK + 1, np.uint8)  # a block's distances (slot 64: read for an exhausted mask)
    dd = np.zeros(BLOCK + 1, np.int32)
    tw = _table_words(tables)
    for b in range(nfull):
        cnt = _extract(_bpmask64d(SP, 256 * b, tw, hi, d8) & live[b], b * BLOCK, d8, bufi, bufd, cnt)
    m = n - nfull * BLOCK
    if m > 0:
        base = nfull * BLOCK
        cnt = _extract1(_tail_hits(q, wp, g, base, m, dd, hi) & live[nfull], base, q0, g, bufi, bufd, cnt, wp)
    return cnt


@njit(**_JIT)
def topk(Q, G, L, k, live, outD, outI):
    """First ``k`` of each query's Hamming ranking (ties: lower gallery index first), without sorting
    the gallery; pads with -1 / int32 max when ``k > n``."""
    n, W = G.shape
    g = G.reshape(n * W)
    cap = min(k, n) + 4096 + 2 * BLOCK
    bufi = np.empty(cap, np.int64)
    bufd = np.empty(cap, np.int32)
    hist = np.zeros(L + 2, np.int64)
    dd = np.zeros(BLOCK + 1, np.int32)
    sorted_pos = np.empty(cap, np.int64)
    for i in range(Q.shape[0]):
        oD = outD[i]
        oI = outI[i]
        cnt = _select(Q[i], g, W, n, L, k, L, bufi, bufd, hist, dd, live)
        _sort_identity(bufd, cnt, L, sorted_pos, oD)
        for r in range(cnt):
            oI[r] = bufi[sorted_pos[r]]
        oI[cnt:] = -1
        oD[cnt:] = INT32_MAX


# -------------------------------------------------------------------------------------- coarse-to-fine
# Stage 1 (the shortest code) comes as its own 32-bit word view (``words32``). The later stages' gallery codes
# come as a tuple of 64-bit word views (codes whose length is not a multiple of 64 are zero-padded by the
# caller, which does not change distances), padded with dummies to a multiple of 8 stages so that
# pyramids of 2 to 9 lengths share one compiled specialisation; their query codes as one array ``Qr``
# [nq, total words] with stage s - 1 in columns ``qoff[s - 1]:qoff[s]``. ``S`` is the number of stages.
# (Few, large arguments: numba unboxes every array argument on each call.)
@njit(**_JIT)
def _count_within(sortedD, n, t):
    """Number of leading entries of the ascending ``sortedD`` that are <= t (binary search)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if sortedD[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_JIT)
def _rows_wdist(q, P, g, W, rows, c, out):
    """``_rows_dist`` weighted by the planes ``P`` (``[WEIGHT_PLANES, W]`` 64-bit words, as the codes):
    ``out[j] = sum_b 2^b popcount((q ^ code[rows[j]]) & P[b])``, with the same prefetches."""
    if W == 2:  # the query's words and planes in registers, as _rows_dist does
        q0, q1 = q[0], q[1]
        p0, p1 = _word_planes(P, 0), _word_planes(P, 1)
        for j in range(c):
            _prefetch(g, 2 * rows[min(j + 64, c - 1)])
            o = np.uint64(2 * rows[j])
            out[j] = _word_dist(q0 ^ g[o], p0) + _word_dist(q1 ^ g[o + np.uint64(1)], p1)
        return
    dist = 32 if W <= 8 else 12
    for j in range(c):
        ahead = W * rows[min(j + dist, c - 1)]
        for w in range(0, W, 8):
            _prefetch(g, ahead + w)
        _prefetch(g, ahead + W - 1)
        o = np.uint64(W * rows[j])
        t = 0
        for w in range(W):
            t += _word_dist(q[w] ^ g[o + np.uint64(w)], _word_planes(P, w))
        out[j] = t


@njit(**_JIT)
def _later_dist(Qr, qoff, Gr, s, i, rows, c, out, Pr=None):
    """Distances at stage ``s >= 1`` of query ``i`` to the gallery codes ``rows[:c]``; the query's
    stage-s words are ``Qr[i, qoff[s - 1]:qoff[s]]``. ``Pr``: ``(planes, weighted)``, the weight planes of
    the later stages (``[nq, WEIGHT_PLANES, words]``, columns as ``Qr``; a stage without weights has plane 0
    all ones) and whether stage s is weighted (``weighted[s]``: else its Hamming distances, 4x less
    arithmetic); or None for Hamming distances (compiled apart)."""
    n, W = Gr[s - 1].shape
    if Pr is None or not Pr[1][s]:
        _rows_dist(Qr[i, qoff[s - 1] : qoff[s]], Gr[s - 1].reshape(n * W), W, rows, c, out)
    else:
        _rows_wdist(Qr[i, qoff[s - 1] : qoff[s]], Pr[0][i, :, qoff[s - 1] : qoff[s]], Gr[s - 1].reshape(n * W), W,
                    rows, c, out)


@njit(**_JIT)
def ctf_rank(Q1, G1, L1, Qr, qoff, Gr, Ls, S, thr, outD, outI, P1=None, Lw=0, Pr=None):
    """Full CtF rankings of a batch (Sec. 3.1, Fig. 1): rank everything by the shortest code, then re-rank
    the candidates within each threshold by the next longer code, stably, in place at the head.

    ``Ls[s]``: code length of stage s; ``thr[s]``: threshold (>= 0) of stage s, for s < S - 1. ``P1`` /
    ``Lw``: the weight planes and largest distance of a weighted stage 1, ``Pr``: of the later stages (as
    ``ctf_topk``).

    The head (the c1 stage-1 candidates) is ordered as ``ctf_topk`` orders its candidates
    (``_ctf_finish`` with k = c1, one packed key per part instead of a counting sort per stage): numbered in
    stage-1 order, which breaks ties as the gallery position does after D[0], since D[0] is in the key.
    """
    n, W1 = G1.shape
    g1 = G1.reshape(n * W1)
    d = np.empty(n, np.int32)
    big = n + 2 * BLOCK
    # _ctf_finish's scratch without the part for scanning beyond the candidates (k = c1: never needed)
    ws64 = np.empty(big + 4 * n, np.int64)
    ws32 = np.empty(S * big + n, np.int32)
    ids = np.empty(n, np.int64)
    D = np.empty((S, n), np.int32)
    counts = np.empty(S, np.int64)
    live = np.empty(0, np.uint64)  # not read: every candidate is placed before any further scan
    for i in range(Q1.shape[0]):
        if P1 is None:  # stage 1: 32-bit words, cheap to scan per query
            _rank_one(Q1[i], g1, W1, L1, d, outD[i], outI[i])
        else:
            _wdist(Q1[i], P1[i], g1, W1, n, d)
            _sort_identity(d, n, Lw, outI[i], outD[i])
        _rank_head(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, i, ids, D, ws64, ws32, counts, live, outD[i], outI[i],
                   Pr)


@njit(**_JIT)
def _rank_head(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, i, ids, D, ws64, ws32, counts, live, oD, oI, Pr=None):
    """Query ``i`` of a full CtF ranking once ``oD``/``oI`` hold its stage-1 ranking: re-rank the head (the
    candidates within ``thr[0]``) through the later stages, in place."""
    c1 = _count_within(oD, n, thr[0])
    if c1 == 0:
        return
    ids[:c1] = oI[:c1]
    D[0, :c1] = oD[:c1]
    _later_dist(Qr, qoff, Gr, 1, i, ids, c1, D[1], Pr)
    _ctf_finish(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, c1, live, i, c1, ids, D, ws64, ws32,
                oD[:c1], oI[:c1], counts, Pr)


@njit(**_JIT)
def _bits(v):
    """Number of bits of the non-negative integer ``v`` (0 for 0)."""
    b = 0
    while v > 0:
        b += 1
        v >>= 1
    return b


@njit(**_JIT)
def _part_first(D, Ls, thr, s, mem, w, m, bj, keys, skey, ids, oI, oD, pos):
    """Write to ``oI/oD[pos:]`` the first ``m`` of the candidates ``mem[:w]`` whose finest stage is ``s``
    (stage-1 candidate numbers, ascending, each ``< 2 ** bj``), ordered by (D[s], D[s - 1], ..., D[0],
    number): the order the chain of stable re-rankings gives them (Sec. 3.1); returns the new ``pos``.

    Only those that can be among the first ``m`` (``D[s]`` up to the m-th smallest) are sorted. Up to 128
    of them, each gets one key, its number and distances packed in bit fields (``D[r] <= thr[r]`` for
    ``r < s``, so the fields are short), and its place is the number of smaller keys: a vectorised count
    without branches, 2-3x faster than the counting sorts, an insertion sort or ``np.sort`` on the orders
    of real queries. More of them (or keys over 62 bits): stable counting sorts by D[0], D[1], ..., D[s],
    least significant first (``np.sort`` of the keys was slower).
    ``mem`` is overwritten; ``keys`` (int64) and ``skey`` (int32) are scratch of ``w`` entries."""
    if m <= 0 or w == 0:
        return pos
    ds = D[s]
    if w > m:  # keep only the values of D[s] up to the m-th smallest
        vlo = Ls[s]
        vhi = 0
        for r in range(w):
            v = ds[mem[r]]
            vlo = min(vlo, v)
            vhi = max(vhi, v)
        h = np.zeros(vhi - vlo + 1, np.int64)
        for r in range(w):
            h[ds[mem[r]] - vlo] += 1
        acc = 0
        t = 0
        while acc + h[t] < m:
            acc += h[t]
            t += 1
        tk = vlo + t
        w2 = 0
        for r in range(w):  # branch-free filter; keeps the order
            x = mem[r]
            mem[w2] = x
            w2 += ds[x] <= tk
        w = w2
    m = min(m, w)
    top = bj
    for r in range(s):
        top += _bits(thr[r])
    if w <= 128 and top + _bits(Ls[s]) <= 62:
        sh = np.empty(s, np.int64)  # field offsets of D[0] .. D[s - 1]
        o = bj
        for r in range(s):
            sh[r] = o
            o += _bits(thr[r])
        for u in range(w):
            x = mem[u]
            key = (np.int64(ds[x]) << top) | x
            for r in range(s):
                key |= np.int64(D[r, x]) << sh[r]
            keys[u] = key
        low = (np.int64(1) << bj) - 1
        for u in range(w):  # rank = number of smaller keys (unique: they hold the number)
            v = keys[u]
            rk = 0
            for j in range(w):
                rk += keys[j] < v
            if rk < m:
                x = v & low
                oI[pos + rk] = ids[x]
                oD[pos + rk] = ds[x]
        return pos + m
    # least significant key first: stable counting sorts by D[0], D[1], ..., D[s]
    src = mem
    dst = keys
    for r in range(s + 1):
        _sort_by_key(D[r], src, w, Ls[r], dst, skey)
        src, dst = dst, src
    for r in range(m):
        x = src[r]
        oI[pos + r] = ids[x]
        oD[pos + r] = ds[x]
    return pos + m


@njit(**_JIT)
def _beyond1(q, g1, n, L1, t1, live, k, oI, oD, pos):
    """The stage-1 ranking beyond the candidates, for codes of one 32-bit word: the live codes with a
    distance ``> t1``, by distance and then gallery position, written to ``oI``/``oD[pos:k]``; returns the
    new ``pos``. Walks the distances t1 + 1, t1 + 2, ... with one vector mask of 64 codes per block and
    distance (``_mask64``), which beats a top-k scan (``_select``) when few codes are missing: on a
    gallery of 2,276 codes, ~0.1 us a distance against ~6 us for the scan (which extracts and compacts
    its first 4 k + 512 codes before its bound tightens)."""
    q0 = q[0]
    nfull = n // BLOCK
    mt = n - nfull * BLOCK
    prev = np.empty(nfull + 1, np.uint64)  # the codes within the last distance walked, per block
    dd = np.zeros(BLOCK + 1, np.int32)
    for b in range(nfull):
        prev[b] = _mask64(g1, b * BLOCK, q0, t1) & live[b]
    if mt > 0:
        prev[nfull] = _tail_mask(q, g1, 1, nfull * BLOCK, mt, dd, t1) & live[nfull]
    u = t1 + 1
    while pos < k and u <= L1:
        for b in range(nfull + (mt > 0)):
            if b < nfull:
                m = _mask64(g1, b * BLOCK, q0, u) & live[b]
            else:
                m = _tail_mask(q, g1, 1, nfull * BLOCK, mt, dd, u) & live[nfull]
            eq = m & ~prev[b]  # the codes at distance exactly u, in gallery order
            prev[b] = m
            while eq and pos < k:
                oI[pos] = b * BLOCK + _ctz(eq)
                oD[pos] = u
                pos += 1
                eq &= eq - np.uint64(1)
            if pos >= k:
                break
        u += 1
    return pos


@njit(**_JIT)
def _ctf_finish(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, c1, ids, D, ws64, ws32, oD, oI, oC, Pr=None):
    """Query ``i`` of ``ctf_topk`` from its stage-1 candidates on: gallery positions ``ids[:c1]`` in gallery
    order, their stage-1 and stage-2 distances in ``D[0, :c1]`` and ``D[1, :c1]`` (``D``: [S, >= c1]).
    Computes the later stages' distances into ``D[2:]``, writes the first ``k`` to ``oD``/``oI`` and the
    candidate counts to ``oC[1:]``; ``g1``: the flat stage-1 word view (``W1`` words per code)."""
    big, rcap = n + 2 * BLOCK, min(k, n) + 4096 + 2 * BLOCK
    rows = ws64[big : big + n]
    lst = ws64[big + n : big + 2 * n]
    keys = ws64[big + 2 * n : big + 3 * n]
    rej = ws64[big + 3 * n : big + 4 * n]
    tmp = ws32[S * big : S * big + n]
    # forward: distances of the surviving candidates, stage by stage; lst holds their numbers, rej those
    # that stop at each stage s (D[s] > thr[s]) in rej[pe[s - 1]:pe[s]]
    pe = np.zeros(S, np.int64)
    c = c1
    oC[1] = c1  # oC[s]: items ranked at stage s (s >= 1; stage 0 ranks every live code)
    nr = 0
    if S == 2:
        for j in range(c1):
            lst[j] = j
    else:  # branch-free compaction, gallery order kept
        ds = D[1]
        t = thr[1]
        w = 0
        for j in range(c1):
            lst[w] = j
            rej[nr] = j
            rows[w] = ids[j]
            w += ds[j] <= t
            nr += ds[j] > t
        c = w
        oC[2] = c
        pe[1] = nr
    for s in range(2, S - 1):
        _later_dist(Qr, qoff, Gr, s, i, rows, c, tmp, Pr)
        ds = D[s]
        t = thr[s]
        w = 0
        for j in range(c):
            x = lst[j]
            d = tmp[j]
            ds[x] = d
            lst[w] = x
            rej[nr] = x
            rows[w] = rows[j]
            w += d <= t
            nr += d > t
        c = w
        oC[s + 1] = c
        pe[s] = nr
    if S > 2:
        _later_dist(Qr, qoff, Gr, S - 1, i, rows, c, tmp, Pr)
        ds = D[S - 1]
        for j in range(c):
            ds[lst[j]] = tmp[j]
    bj = _bits(c1)
    pos = _part_first(D, Ls, thr, S - 1, lst, c, k, bj, keys, tmp, ids, oI, oD, 0)
    for s in range(S - 2, 0, -1):  # then the candidates that stopped at stage s (rare with k << candidates)
        if pos >= k:
            break
        part = rej[pe[s - 1] : pe[s]]
        pos = _part_first(D, Ls, thr, s, part, pe[s] - pe[s - 1], k - pos, bj, keys, tmp, ids, oI, oD, pos)
    if pos < k and c1 < n and W1 == 1:  # fewer than k candidates: the stage-1 ranking beyond them
        pos = _beyond1(Q1[i], g1, n, L1, thr[0], live, k, oI, oD, pos)
    elif pos < k and c1 < n:  # the same for longer first stages, with a top-k scan
        rbufi = ws64[big + 4 * n : big + 4 * n + rcap]
        rpos = ws64[big + 4 * n + rcap : big + 4 * n + 2 * rcap]
        rbufd = ws32[S * big + n : S * big + n + rcap]
        rsorted = ws32[S * big + n + rcap : S * big + n + 2 * rcap]
        hist = np.zeros(L1 + 2, np.int64)
        dd = np.zeros(BLOCK + 1, np.int32)
        cnt = _select(Q1[i], g1, W1, n, L1, k, L1, rbufi, rbufd, hist, dd, live)
        _sort_identity(rbufd, cnt, L1, rpos, rsorted)
        for r in range(c1, cnt):
            oI[pos] = rbufi[rpos[r]]
            oD[pos] = rsorted[r]
            pos += 1
    oI[pos:] = -1
    oD[pos:] = INT32_MAX


@njit(**_JIT)
def _ctf_one(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32, oD, oI, oC, Pr=None, SP=None):
    """Query ``i`` of ``ctf_topk`` on its own: stage 1 and 2 into the workspace, then ``_ctf_finish``."""
    big = n + 2 * BLOCK
    ids = ws64[:big]
    D = ws32[: S * big].reshape(S, big)  # D[s, j]: stage-s distance of stage-1 candidate j
    dd = np.zeros(BLOCK + 1, np.int32)
    if SP is not None and W1 == 1 and planes_take(thr[0]):
        c1 = _within_planes(Q1, None, i, SP, g1, n, thr[0], ids, D[0], live)
    elif W1 == 1:
        c1 = _within1(Q1[i], g1, n, thr[0], ids, D[0], dd, live)
    else:
        c1 = _select(Q1[i], g1, W1, n, L1, n, thr[0], ids, D[0], np.zeros(L1 + 2, np.int64), dd, live)
    _later_dist(Qr, qoff, Gr, 1, i, ids, c1, D[1], Pr)
    _ctf_finish(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, c1, ids, D, ws64, ws32, oD, oI, oC, Pr)


@njit(**_JIT)
def ctf_topk(Q1, G1, L1, Qr, qoff, Gr, Ls, S, thr, k, live, ws64, ws32, outD, outI, outC, P1=None, Lw=0, Pr=None,
             SP=None):
    """First ``k`` of the CtF rankings of a batch without ranking the whole gallery (arguments as for
    ``ctf_rank``; ``ws64``/``ws32``: scratch from ``ctf_workspace``, reusable across calls), one query
    after the other (``ctf_topk_batch``: a batch at once, same answers).

    Stage 1 collects the codes within ``thr[0]`` in gallery order (the stage-1 candidates, numbered
    0 .. c1 - 1); each later stage s computes its distances ``D[s]`` for the candidates of stage s - 1,
    gathered in gallery order (monotone reads), and keeps those within ``thr[s]``, still in gallery
    order: no sort of the candidates. The CtF ranking starts with the last stage's candidates ordered by
    (D[S-1], ..., D[0], gallery position), then, for s = S-2 .. 1, the stage-(s-1) candidates beyond
    ``thr[s]`` in the same kind of order, then the stage-1 ranking beyond ``thr[0]``; only the parts
    that reach the first ``k`` are built, and within a part only the entries that can be among them are
    sorted. The rest of the stage-1 ranking is found by a second, top-k scan. ``outC[i, s]`` (s >= 1)
    receives the number of codes ranked at stage s (the per-stage candidate counts, for free).

    ``P1`` / ``Lw``: the weight planes and largest distance of a weighted stage 1 (``thr[0]`` bounds the
    weighted distance), same semantics (``_ctf_one_weighted``); compiled apart from the Hamming path.
    ``Pr``: weight planes of the later stages (``_later_dist``); ``Ls[s]`` is then the largest distance of
    stage s (``15 L`` for a weighted one), which sizes the sort keys. ``SP``: the byte planes of the stage-1
    codes' full blocks (``lay_planes``; ``CtFIndex`` keeps them on ``BYTE_PLANES`` hosts), or None: stage 1 then
    reads them (``_within_planes``) when its threshold allows, same answers.
    """
    n, W1 = G1.shape
    g1 = G1.reshape(n * W1)
    if P1 is None:  # (the other branch is pruned at compile time: the Hamming path allocates nothing more)
        for i in range(Q1.shape[0]):
            _ctf_one(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32, outD[i], outI[i], outC[i],
                     Pr, SP)
    else:
        wscratch = _weighted_scratch(n)
        for i in range(Q1.shape[0]):
            _ctf_one_weighted(Q1, P1, g1, W1, n, Lw, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32, wscratch,
                              outD[i], outI[i], outC[i], Pr, SP)


# A batch scans the gallery in tiles of TILE blocks (32 KB of 32-bit codes: stays in L1 while every query
# of the batch is compared with it; the tile's 128-bit codes, 128 KB, stay in L2 for their stage 2).
# 128 blocks measured 2-5 % faster than 64 and 256 at 1e6 codes (batch of 64, 1 and 2 threads), 32 slower.
TILE = 128
# top-k of this many queries (per thread) or more: ctf_topk_batch, else ctf_topk query by query. Below it the
# tile scan neither prefetches a tile's stage-2 codes nor keeps them with vector gathers, and ctf_topk's one
# long gather of every stage-1 candidate's stage-2 code keeps more reads in flight than a tile's ~130. Since
# its stage 1 uses the vector masks of the tile scan (_within1 with _mask64), ctf_topk is the faster of the two
# up to 16 queries on an AMD Zen 4 (bench_batch.py, 1 thread: 1e4: 39 against 58 us for one query, 1e5: 75 /
# 77, 1e6: 363 / 419; batches of 4 and 8 at 1e6: 314-326 / 366; 16: even; 32 and 64: the tile scan 4-15 %
# faster). On the Intel machine of earlier sessions the tile scan was faster for one query than ctf_topk with
# its former scalar stage 1 (1e6: 405 / 443 us); not measured there since. ctf_topk also serves a first stage
# other than 32 bits, and a query whose candidates overflow the batch buffers.
BATCH_MIN_QUERIES = 16
# Two cases take the tile scan with fewer queries (AMD Zen 2, 1 thread, us a query, ctf_topk query by query
# against the tile scan, the same answers; benchmarks/README.md, thirteenth session):
# - from BATCH_LARGE_N codes on (8 MB of 32-bit codes, more than the last-level cache keeps between queries),
#   a quarter as many: the scan streams from memory, and sharing it pays sooner. Batches of 4 / 8: 1e6
#   593 / 663 and 586 / 583; 2e6 1,475 / 1,434 and 1,450 / 1,206; 1e7 7,769 / 6,710 and 7,753 / 5,923.
# - a weighted stage 1 on byte-plane hosts (BYTE_PLANES, threshold below 255), from BYTE_PLANES_TILE_WORK
#   queries x codes on and BYTE_PLANES_TILE_MIN_N codes (not WEIGHTED_TILE_MIN_N): its byte-plane masks cost
#   what Hamming ones do, the one-query weighted masks 3x as much, so the tile pays from 2-4 queries at 3e4
#   to one at 1e6. One query / batches of 2 / 8 / 64: 1e6 1,281 / 1,078, 1,235 / 884, 1,157 / 652; 1e5
#   185 / 179, 148 / 119, 117 / 72; 3e4 117 / 129, 78 / 78, -, 37 / 23; 1.5e4 batches of 8 / 16 / 64: 33 / 31,
#   28 / 25, 25 / 20; 1e4 16 / 64: 24 / 22, 19 / 17; 7,365 16 / 64: 21 / 21, 17 / 16; 4,096: 13 / 14 at 64.
BATCH_LARGE_N = 1 << 21
BYTE_PLANES_TILE_WORK = 1 << 17
BYTE_PLANES_TILE_MIN_N = 5000
_MEASURED_MIN_QUERIES = BATCH_MIN_QUERIES  # the rules above were measured with it; setting it scales them
BATCH_FILTER_MIN_N = 1 << 16  # larger galleries: a batch keeps only the stage-2 candidates (faster from 1e5)
TILE_PREFETCH_QUERIES = 16  # this many queries or more: load each tile's stage-2 codes first (~20 % faster)
# Byte-plane hosts: every query of a batch reads a tile as nibble planes (_nibmask64) made once per sub-tile of
# this many blocks (16 KB: they stay in L1 while the batch reads them). 16 and 32 measured alike, 64 slower.
SUBTILE = 32


@njit(inline="always", **_JIT)
def _extract_pos(mask, base, out, m):
    """Append the gallery positions of ``mask`` to ``out[m:]``; returns the new count (``_extract``
    without distances: four slots without branches, ``out`` has 4 spare slots)."""
    c = _popcnt(mask)
    out[m] = base + _ctz(mask)
    mask &= mask - np.uint64(1)
    out[m + 1] = base + _ctz(mask)
    mask &= mask - np.uint64(1)
    out[m + 2] = base + _ctz(mask)
    mask &= mask - np.uint64(1)
    out[m + 3] = base + _ctz(mask)
    mask &= mask - np.uint64(1)
    if c > 4:
        r = m + 4
        while mask:
            out[r] = base + _ctz(mask)
            r += 1
            mask &= mask - np.uint64(1)
    return m + c


@njit(inline="always", **_JIT)
def _append_tile(q0, g1, q2, g2, W2, hi2, pos, m, tmp, ids, D, c, vec, wp):
    """Append those of the tile hits ``pos[:m]`` of one query whose stage-2 distance is ``<= hi2`` to its
    candidates (``ids``, ``D[0]``, ``D[1]`` from ``c`` on; branch-free, in gallery order) with their
    stage-1 and stage-2 distances, computed while the tile's codes are in cache; returns the new count.
    ``vec`` (the tile's stage-2 codes were loaded first) and 128-bit stage 2: eight hits at a time with vector
    gathers and compresses (``_keep8``; its gathers stall on codes still in memory: one query at 1e6 took
    838 against 596 us without it on a Zen 4). The other hits get their stage-2 distances in ``tmp`` first: a
    loop of independent gathers, each prefetching the code 16 hits ahead (for groups too small to prefetch
    the whole tile; ~5 % faster for 1 query). ``wp``: the query's 4 weight planes of a weighted stage 1
    (``_ctf_one_weighted``), or None."""
    d0 = D[0]
    d1 = D[1]
    r0 = 0  # hits before r0 are done
    if W2 == 2 and vec and VECTOR_KEEP:
        while r0 + 8 <= m:
            c = _keep8(g1, g2, pos, r0, q0, q2[0], q2[1], hi2, ids, d0, d1, c, wp)
            r0 += 8
    for r in range(r0, m):
        p = pos[r]
        _prefetch(g2, W2 * pos[min(r + 16, m - 1)])
        o = np.uint64(W2 * p)  # unsigned: see _IDX
        if W2 == 2:
            tmp[r] = _popcnt(q2[0] ^ g2[o]) + _popcnt(q2[1] ^ g2[o + np.uint64(1)])
        else:
            d = 0
            for w in range(W2):
                d += _popcnt(q2[w] ^ g2[o + np.uint64(w)])
            tmp[r] = d
    for r in range(r0, m):
        p = pos[r]
        d = tmp[r]
        ids[c] = p
        d0[c] = _word_dist(q0 ^ g1[p], wp)
        d1[c] = d
        c += d <= hi2
    return c


def _word_dist(x, wp):
    """The distance of one word ``x = q ^ g`` (32 or 64 bits): Hamming, or weighted by the planes ``wp`` (the
    word's 4 weight planes as a tuple, ``_word_planes``): ``sum_b 2^b popcount(x & wp[b])``."""


@overload(_word_dist, inline="always")
def _word_dist_impl(x, wp):
    if isinstance(wp, types.NoneType):
        return lambda x, wp: _popcnt(x)
    return lambda x, wp: (_popcnt(x & wp[0]) + (_popcnt(x & wp[1]) << 1) + (_popcnt(x & wp[2]) << 2)
                          + (_popcnt(x & wp[3]) << 3))


def _later_word(x, Pr, i, c):
    """The distance of one 64-bit word ``x = q ^ g`` of a later stage (column ``c`` of ``Qr``): Hamming, or
    weighted by query ``i``'s planes ``Pr[0][i, :, c]`` (``Pr`` as in ``_later_dist``)."""


@overload(_later_word, inline="always")
def _later_word_impl(x, Pr, i, c):
    if isinstance(Pr, types.NoneType):
        return lambda x, Pr, i, c: _popcnt(x)
    return lambda x, Pr, i, c: _word_dist(x, _word_planes(Pr[0][i], c))


def _planes_of(P1, i, w=0):
    """Query ``i``'s 4 weight planes of word ``w`` of its first code (a tuple), or None without weights."""


@overload(_planes_of, inline="always")
def _planes_of_impl(P1, i, w=0):
    if isinstance(P1, types.NoneType):
        return lambda P1, i, w=0: None
    return lambda P1, i, w=0: _word_planes(P1[i], w)


@njit(inline="always", **_JIT)
def _word_planes(P, w=0):
    """The 4 weight planes ``P[:, w]`` of word ``w`` of a first code, as a tuple (``_word_dist``)."""
    return (P[0, w], P[1, w], P[2, w], P[3, w])


def _tile_hits(q0, wp, g1, t0, t1, hi, live, pos):
    """The stage-1 hits of blocks ``t0 .. t1 - 1`` in ``pos[:m]`` (returns m): Hamming masks (``_mask64``),
    or weighted ones (``_wmask64``)."""


@overload(_tile_hits, inline="always")
def _tile_hits_impl(q0, wp, g1, t0, t1, hi, live, pos):
    if isinstance(wp, types.NoneType):
        def hamming(q0, wp, g1, t0, t1, hi, live, pos):
            m = 0
            for b in range(t0, t1):
                m = _extract_pos(_mask64(g1, b * BLOCK, q0, hi) & live[b], b * BLOCK, pos, m)
            return m
        return hamming

    def weighted(q0, wp, g1, t0, t1, hi, live, pos):
        m = 0
        for b in range(t0, t1):
            m = _extract_pos(_wmask64(g1, b * BLOCK, q0, wp, hi) & live[b], b * BLOCK, pos, m)
        return m
    return weighted


def _tail_hits(q, wp, g1, base, m, dd, hi):
    """``_tail_mask`` of the last, partial block for the Hamming or the weighted stage 1."""


@overload(_tail_hits, inline="always")
def _tail_hits_impl(q, wp, g1, base, m, dd, hi):
    if isinstance(wp, types.NoneType):
        return lambda q, wp, g1, base, m, dd, hi: _tail_mask(q, g1, 1, base, m, dd, hi)

    def weighted(q, wp, g1, base, m, dd, hi):
        mask = np.uint64(0)
        for j in range(m):
            v = _word_dist(q[0] ^ g1[base + j], wp)
            mask |= np.uint64(v <= hi) << np.uint64(j)
        return mask
    return weighted


@njit(**_JIT)
def _nibble_tables(q0, wp, out):
    """``out[:128]``: the nibble tables of the byte-plane masks for the query word ``q0`` and its 4 weight planes
    ``wp``: entry ``32 p + 16 h + v`` is the weighted distance of nibble h of byte p of a code to the query's,
    when the code's nibble is v (the weights of its set bits in ``v ^ q``; at most 4 * 15 = 60)."""
    for p in range(4):
        for h in range(2):
            shift = 8 * p + 4 * h
            qn = (np.uint32(q0) >> np.uint32(shift)) & np.uint32(15)
            for v in range(16):
                d = 0
                x = np.uint32(v) ^ qn
                for i in range(4):
                    if (x >> np.uint32(i)) & np.uint32(1):
                        j = np.uint32(shift + i)
                        for b in range(WEIGHT_PLANES):
                            d += np.int64((wp[b] >> j) & np.uint32(1)) << b
                out[32 * p + 16 * h + v] = d


def _query_tables(P1, i, q0, out):
    """``_nibble_tables`` of query ``i`` (word ``q0``, weight planes ``P1[i]``; without weights, weight 1 on
    every bit: the Hamming distance)."""


@overload(_query_tables, inline="always")
def _query_tables_impl(P1, i, q0, out):
    if isinstance(P1, types.NoneType):
        def hamming(P1, i, q0, out):
            zero = np.uint32(0)
            _nibble_tables(q0, (np.uint32(0xFFFFFFFF), zero, zero, zero), out)
        return hamming
    return lambda P1, i, q0, out: _nibble_tables(q0, _word_planes(P1[i], 0), out)


@intrinsic
def _planes_block(typingctx, g1, b, buf, o):
    """Block ``b`` of the 32-bit codes ``g1`` (flat ``uint32``) as byte planes in ``buf[o:o + 256]``: plane p
    (byte p of each code) of its 64 codes at ``o + 64 p`` (``_ir_block_planes``). Full blocks only; trusted
    offsets."""
    return _block_layout(typingctx, g1, b, buf, o, nibbles=False)


@njit(**_JIT)
def lay_planes(g1, b0, b1, out):
    """The byte planes of blocks ``b0 .. b1 - 1`` of the 32-bit codes ``g1`` (flat ``words32`` view, full blocks
    only) into ``out[256 b0 : 256 b1]``: ``out[256 b + 64 p + j]`` is byte p of code ``64 b + j``
    (``_planes_block``). The ``SP`` that ``CtFIndex`` keeps for ``ctf_topk`` and ``ctf_topk_batch``."""
    for b in range(b0, b1):
        _planes_block(g1, b, out, 256 * b)


@njit(**_JIT)
def _scan_tiles(Q1, g1, n, hi, hi2, Qr, qoff, G2, live, a0, na, bufI, bufD, cnt, c1, P1):
    """Stage 1 (and the stage-2 distances of its candidates) of queries ``a0 .. a0 + na - 1``: for each
    tile of the gallery, every query's 64-code masks (``_mask64``, ``live`` applied); query ``a``'s hits
    with a stage-2 distance ``<= hi2`` are appended to ``bufI[a]``/``bufD[a, 0:2]`` in gallery order.
    ``c1[a]``: its number of stage-1 candidates; ``cnt[a]``: how many were kept, or more than the
    buffer's capacity once it overflowed (the caller then searches that query on its own). ``P1``: weight
    planes of a weighted stage 1 (``ctf_topk``; compiled apart), or None. On AVX2 hosts without AVX-512
    (``BYTE_PLANES``) the queries read the tile a sub-tile (``SUBTILE`` blocks) at a time, laid out as nibble
    planes (``_nibble_block``, 16 KB), through their nibble tables (``_nibmask64``): per code a byte lookup and a
    saturating add per nibble, shared by the Hamming and the weighted stage 1 (AMD Zen 2, batch of 64 at 1e6,
    1 thread, as byte planes split per query: Hamming 478 -> 417 us a query, weighted 874 -> 410). Not from the
    planes that ``CtFIndex`` keeps (``lay_planes``): the hits' stage-1 distances then come from codes no longer in
    cache (batches of 16 at 1e6, 1 thread: 526 -> 578 us a query)."""
    cap = bufI.shape[1]
    n2, W2 = G2.shape
    g2 = G2.reshape(n2 * W2)
    nfull = n // BLOCK
    ntiles = max(1, -(-nfull // TILE))
    pos = np.empty((TILE + 1) * BLOCK + 4, np.int64)  # a tile's hits (the last tile: + the partial block)
    tmp = np.empty((TILE + 1) * BLOCK, np.int32)
    dd = np.zeros(BLOCK + 1, np.int32)
    vec = na >= TILE_PREFETCH_QUERIES  # so many queries read most cache lines of a tile's stage-2 codes
    bp = BYTE_PLANES and planes_take(hi)  # masks from nibble planes (_nibmask64; Hamming: weights 1)
    tables = np.zeros((na if bp else 0, 128), np.uint8)
    nib = np.empty(512 * SUBTILE if bp else 0, np.uint8)
    if bp:
        for a in range(na):
            _query_tables(P1, a0 + a, Q1[a0 + a, 0], tables[a])
    for t in range(ntiles):
        t0 = t * TILE
        t1 = min(nfull, t0 + TILE)
        if vec:
            # bring them in with one sequential load a line (the hardware streams them) rather than a prefetch
            # instruction a line: on an AMD Zen 4, batches of 64 at 1e6 codes, three sets of alternating runs,
            # us a query: 1 thread 294 / 319 / 301 -> 256 / 307 / 259, 2 threads 169 / 189 / 172 -> 155 / 198 / 167;
            # neither: 340-410 on 1 thread
            touch = np.uint64(0)
            for w in range(W2 * t0 * BLOCK, W2 * t1 * BLOCK, 8):
                touch ^= g2[np.uint64(w)]  # unsigned: see _IDX
            tmp[0] = np.int32(touch & np.uint64(1))  # a use, so that the loads stay
        step = SUBTILE if bp else TILE  # nibble planes: the queries read a sub-tile at a time
        nsub = max(1, -(-(t1 - t0) // step))  # (at least one: the last tile may be only the partial block)
        for u in range(nsub):
            s0 = t0 + u * step
            s1 = min(t1, s0 + step)
            if bp:
                for b in range(s0, s1):
                    _nibble_block(g1, b, nib, 512 * (b - s0))
            for a in range(na):
                c = cnt[a]
                if c > cap:
                    continue
                q0 = Q1[a0 + a, 0]
                wp = _planes_of(P1, a0 + a)
                if bp:
                    m = 0
                    tw = _table_words(tables[a])
                    for b in range(s0, s1):
                        m = _extract_pos(_nibmask64(nib, 512 * (b - s0), tw, hi) & live[b], b * BLOCK, pos, m)
                else:
                    m = _tile_hits(q0, wp, g1, s0, s1, hi, live, pos)
                if t == ntiles - 1 and u == nsub - 1 and n > nfull * BLOCK:  # the last, partial block
                    mask = _tail_hits(Q1[a0 + a], wp, g1, nfull * BLOCK, n - nfull * BLOCK, dd, hi) & live[nfull]
                    m = _extract_pos(mask, nfull * BLOCK, pos, m)
                c1[a] += m
                if c + m > cap:
                    cnt[a] = cap + 1
                else:
                    q2 = Qr[a0 + a, qoff[0] : qoff[1]]
                    cnt[a] = _append_tile(q0, g1, q2, g2, W2, hi2, pos, m, tmp, bufI[a], bufD[a], c, vec, wp)


@njit(**_JIT)
def ctf_topk_batch(Q1, G1, L1, Qr, qoff, Gr, Ls, S, thr, k, live, ws64, ws32, hi2, bufI, bufD, outD, outI, outC,
                   P1=None, Lw=0, Pr=None, SP=None):
    """``ctf_topk`` for a batch at once, same answers: stage 1 scans the gallery once per group of
    ``bufI.shape[0]`` queries, tile by tile (``_scan_tiles``), instead of once per query; the later stages
    run per query (``_ctf_finish``). Stage-1 codes of one 32-bit word (``G1``: [n, 1]). ``bufI``/``bufD``:
    candidate buffers from ``batch_buffers``.

    Only the stage-1 candidates with a stage-2 distance ``<= hi2`` are kept (``hi2 >= thr[1]``; less
    memory traffic): they rank before all the others (Sec. 3.1), so the first ``k`` come from them alone
    when at least ``k`` are kept (or all were). Otherwise, and when a query has more candidates than the
    buffers hold, that query is searched on its own (``_ctf_one``). ``P1``/``Lw``: the weight planes and the
    largest distance of a weighted stage 1 (as ``ctf_topk``, same answers), compiled apart from the
    Hamming scan; a weighted query with fewer than ``k`` kept is searched on its own. ``Pr``: weighted later
    stages after stage 2 (as ``ctf_topk``; stage 2, computed in the scan, must be Hamming). ``SP``: the stored
    byte planes (as ``ctf_topk``), for the queries searched on their own (the tile scan lays out its own)."""
    n, W1 = G1.shape
    g1 = G1.reshape(n * W1)
    nq = Q1.shape[0]
    G, cap = bufI.shape
    cnt = np.zeros(G, np.int64)
    c1 = np.zeros(G, np.int64)
    if P1 is not None:  # (pruned at compile time for the Hamming scan, which allocates nothing more)
        wscratch = _weighted_scratch(n)
    else:
        wscratch = None
    for a0 in range(0, nq, G):
        na = min(G, nq - a0)
        cnt[:] = 0
        c1[:] = 0
        _scan_tiles(Q1, g1, n, thr[0], hi2, Qr, qoff, Gr[0], live, a0, na, bufI, bufD, cnt, c1, P1)
        for a in range(na):
            i = a0 + a
            if P1 is not None:  # (pruned at compile time for the Hamming scan)
                if cnt[a] > cap or cnt[a] < k:
                    _ctf_one_weighted(Q1, P1, g1, W1, n, Lw, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32,
                                      wscratch, outD[i], outI[i], outC[i], Pr)
                    continue
            if cnt[a] > cap or (cnt[a] < k and cnt[a] < c1[a]):
                _ctf_one(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32, outD[i], outI[i], outC[i],
                         Pr, SP)
            else:
                _ctf_finish(Q1, g1, W1, n, L1, Qr, qoff, Gr, Ls, S, thr, k, live, i, cnt[a], bufI[a], bufD[a],
                            ws64, ws32, outD[i], outI[i], outC[i], Pr)
                outC[i, 1] = c1[a]


@njit(**_JIT)
def hit_keys(Q1, G1, Qr, qoff, Gr, S, thr, P, outD, outS, P1=None, Pr=None):
    """The coarse-to-fine sort key of given hits (see ``ctfreid.search.merge``): for query ``i`` and gallery
    position ``P[i, r] >= 0``, the distance at every length up to the finest stage the item reaches
    (``outD[i, r, s]``, -1 beyond) and the number of stages (``outS[i, r]``): stage ``s + 1`` is reached
    iff the distance at stage ``s`` is ``<= thr[s]``. Padding (``P < 0``) gets stages 0 and distances -1.
    ``P1``: stage 1 is weighted by the planes ``P1[i]``, ``Pr``: the later stages by ``Pr[i]`` (as in ``ctf_topk``).
    Costs ``k x S`` distance computations per query, nothing per gallery item."""
    W1 = G1.shape[1]
    for i in range(P.shape[0]):
        for r in range(P.shape[1]):
            p = P[i, r]
            for s in range(S):
                outD[i, r, s] = -1
            if p < 0:
                outS[i, r] = 0
                continue
            d = 0
            for w in range(W1):
                d += _word_dist(Q1[i, w] ^ G1[p, w], _planes_of(P1, i, w))
            outD[i, r, 0] = d
            st = 1
            for s in range(1, S):
                if d > thr[s - 1]:
                    break
                g = Gr[s - 1]
                d = 0
                for w in range(g.shape[1]):
                    d += _later_word(Qr[i, qoff[s - 1] + w] ^ g[p, w], Pr, i, qoff[s - 1] + w)
                outD[i, r, s] = d
                st += 1
            outS[i, r] = st


# ------------------------------------------------------------------------- asymmetric (weighted) stage 1
# The query's shortest code may come with an integer weight per bit (``ctfreid.search.asymmetric``): stage 1
# then ranks by the weighted distance sum_i w_i [q_i != g_i] instead of the Hamming distance; the later
# stages are unchanged. The weights come as WEIGHT_PLANES bit planes laid out as the code's 32-bit words
# (``P[i, b, w]``: bit b of the weights of the bits of word w), so one distance is
# sum_b 2^b popcount((q ^ g) & P[b]): an AND and a popcount per plane instead of one popcount.
WEIGHT_PLANES = 4


@njit(**_JIT)
def weight_planes(wts, out):
    """``out[i, b, w]`` (zeroed ``uint32 [nq, WEIGHT_PLANES, L // 32]``): bit b of the weights ``wts[i, :]``
    (``uint8 [nq, L]``) packed as the codes are (``numpy.packbits`` order, read as little-endian 32-bit
    words: bit ``j`` of a word is bit ``7 - j % 8`` of its byte ``j // 8``); returns the largest weight."""
    top = 0
    for i in range(wts.shape[0]):
        for j in range(wts.shape[1]):
            v = wts[i, j]
            top = max(top, v)
            pos = np.uint32((j % 32 // 8) * 8 + 7 - j % 8)
            for b in range(WEIGHT_PLANES):
                out[i, b, j // 32] |= np.uint32((v >> b) & 1) << pos
    return top


@njit(**_JIT)
def _wdist(q, P, g, W, n, d):
    """``d[j]`` = weighted distance of one query (words ``q``, planes ``P``: [WEIGHT_PLANES, W]) to code
    ``j < n`` of the flat word view ``g`` (``W`` words a code)."""
    o = d[:n]  # slices: indices that are loop counters vectorise (see _IDX)
    if W == 1:
        q0 = q[0]
        wp = _word_planes(P)
        gg = g[:n]
        for j in range(n):
            o[j] = _word_dist(q0 ^ gg[j], wp)
    else:
        gg = g[: n * W].reshape((n, W))
        for j in range(n):
            s = 0
            for w in range(W):
                s += _word_dist(q[w] ^ gg[j, w], _word_planes(P, w))
            o[j] = s


@njit(**_JIT)
def weighted_distances(Q1, P1, G1, out):
    """``out[i, j]`` = weighted distance of query ``i`` (words ``Q1[i]``, planes ``P1[i]``) to code ``j``."""
    n, W1 = G1.shape
    g1 = G1.reshape(n * W1)
    for i in range(Q1.shape[0]):
        _wdist(Q1[i], P1[i], g1, W1, n, out[i])


@njit(**_JIT)
def weighted_rank(Q1, P1, G1, Lw, outD, outI):
    """Full rankings by the weighted distance (in [0, ``Lw``]; stable counting sort: ties keep gallery order)."""
    n, W1 = G1.shape
    g1 = G1.reshape(n * W1)
    d = np.empty(n, np.int32)
    for i in range(Q1.shape[0]):
        _wdist(Q1[i], P1[i], g1, W1, n, d)
        _sort_identity(d, n, Lw, outI[i], outD[i])


@njit(inline="always", **_JIT)
def _live_bit(live, j):
    """Whether gallery position ``j`` is live (bit ``j % 64`` of ``live[j // 64]``), as a bool."""
    return ((live[np.uint64(j) >> np.uint64(6)] >> (np.uint64(j) & np.uint64(63))) & np.uint64(1)) != np.uint64(0)


BEYOND_WINDOW = 8  # first window of distances _beyond_weighted collects in one pass (doubled as needed)
# Up to this many codes, a weighted stage 1 of one query (without byte planes) computes every distance once, into
# an L2-resident array, and takes both its candidates and, when they are fewer than k, the ranking beyond them
# from it (_in_range) instead of scanning the codes for each. Intel Xeon (AVX-512), one thread, CUHK03 codes of
# a default calibration, top-100, cycles a query for stage 1 (both parts), before / after: 2,276 codes
# 11.1k / 7.6k, 7,365 codes 9.1k / 7.9k; at 1e5 codes the scan is 7 % faster (the array leaves L2).
WEIGHTED_KEEP_MAX_N = 1 << 14


@njit(**_JIT)
def _in_range(d, n, lo, hi, live, bufi, bufd, start=0, cnt=0):
    """The live codes whose distance ``d[j]`` (computed before) is within ``[lo, hi]``, in gallery order, into the
    buffers (``n + 128`` slots; ``d`` needs a spare slot after the last code); returns the count. ``start`` (a
    multiple of 64) / ``cnt``: only the codes from ``start`` on, appended after ``cnt`` buffered ones."""
    nfull = n // BLOCK
    for b in range(start // BLOCK, nfull):
        base = b * BLOCK
        cnt = _extract(_range_mask64(d, base, lo, hi) & live[b], base, d[base:], bufi, bufd, cnt)
    for j in range(nfull * BLOCK, n):  # the partial block, branch-free, order kept
        v = d[j]
        bufi[cnt] = j
        bufd[cnt] = v
        cnt += (v >= lo) & (v <= hi) & _live_bit(live, j)
    return cnt


@njit(**_JIT)
def _beyond_weighted(d, n, t1, Lw, live, k, oI, oD, pos, bufi, bufd, order, keys):
    """The weighted stage-1 ranking beyond the candidates, from every code's distance ``d``: the live codes
    with ``d > t1``, by distance and then gallery position, written to ``oI``/``oD[pos:k]``; returns the new
    ``pos``. One pass collects the codes in a window of distances (``BEYOND_WINDOW`` first) with a vector
    mask of 64 codes per block, then a counting sort orders them; while that is too few, the next window,
    twice as wide. Usually one pass. On the 2,276 codes of the CUHK03 dev gallery (a weighted calibration
    keeping 4.4 %: 61 % of the queries need this part for top-100), top-100 took 5.1 us a query with this,
    7.3 with a histogram of every distance and one placement pass, 5.2 with one pass per distance (t1 = 0,
    everything beyond: 5.0, 9.2 with a pass per distance); the Hamming stage 1 4.4 in the same process. ``bufi``/``bufd``/``order``/``keys``: scratch of ``n + 128``."""
    lo = t1 + 1
    win = BEYOND_WINDOW
    while pos < k and lo <= Lw:
        hi = min(Lw, lo + win - 1)
        cnt = _in_range(d, n, lo, hi, live, bufi, bufd)
        _sort_identity(bufd, cnt, hi, order, keys)
        for r in range(min(cnt, k - pos)):
            oI[pos] = bufi[order[r]]
            oD[pos] = keys[r]
            pos += 1
        lo = hi + 1
        win *= 2
    return pos


@njit(**_JIT)
def _within_weighted(q, P, g, W, n, hi, bufi, bufd, live, d):
    """All live codes within weighted distance ``hi`` in gallery order (``_within1`` for a weighted stage 1;
    the buffers need ``n + 128`` slots); returns the count. Codes of one word: 64-code masks (``_wmask64``),
    the hits' distances computed again (``_extract1``), then the partial block's distances into ``d``; longer
    ones (rare: stage 1 is 32 bits in the paper): every distance into ``d`` first (``_in_range`` either way)."""
    if W != 1:
        _wdist(q, P, g, W, n, d)
        return _in_range(d, n, 0, hi, live, bufi, bufd)
    cnt = 0
    nfull = n // BLOCK
    q0 = q[0]
    wp = _word_planes(P)
    for b in range(nfull):
        base = b * BLOCK
        cnt = _extract1(_wmask64(g, base, q0, wp, hi) & live[b], base, q0, g, bufi, bufd, cnt, wp)
    start = nfull * BLOCK
    _wdist(q, P, g[start:], 1, n - start, d[start:])
    return _in_range(d, n, 0, hi, live, bufi, bufd, start, cnt)


@njit(**_JIT)
def _weighted_scratch(n):
    """Scratch of ``_ctf_one_weighted`` for ``n`` codes: every code's distance and ``_beyond_weighted``'s
    buffers. Untouched pages cost nothing: a large gallery never needs the ranking beyond its candidates."""
    return (np.empty(n + BLOCK + 1, np.int32), np.empty(n + 2 * BLOCK, np.int64),
            np.empty(n + 2 * BLOCK, np.int32), np.empty(n + 2 * BLOCK, np.int64), np.empty(n + 2 * BLOCK, np.int32))


@njit(**_JIT)
def _ctf_one_weighted(Q1, P1, g1, W1, n, Lw, Qr, qoff, Gr, Ls, S, thr, k, live, i, ws64, ws32, scratch, oD, oI, oC,
                      Pr=None, SP=None):
    """``_ctf_one`` for a weighted stage 1 (``scratch``: ``_weighted_scratch(n)``): the candidates within
    ``thr[0]`` are collected in gallery order (``_within_weighted``; up to ``WEIGHTED_KEEP_MAX_N`` codes from
    every distance computed first), re-ranked by the later stages (``_ctf_finish``) and followed, when fewer
    than ``k``, by the rest of the weighted stage-1 ranking (``_beyond_weighted``, from those distances, or on
    larger galleries from every distance computed again: keeping them from the scan cost 70 us a query at 1e6
    codes, where the beyond part is never needed)."""
    d, bufi, bufd, order, keys = scratch
    big = n + 2 * BLOCK
    ids = ws64[:big]
    D = ws32[: S * big].reshape(S, big)
    t1 = thr[0]
    kept = False  # d holds every code's distance
    if SP is not None and W1 == 1 and planes_take(t1):
        c1 = _within_planes(Q1, P1, i, SP, g1, n, t1, ids, D[0], live)
    elif n <= WEIGHTED_KEEP_MAX_N:
        _wdist(Q1[i], P1[i], g1, W1, n, d)
        c1 = _in_range(d, n, 0, t1, live, ids, D[0])
        kept = True
    else:
        c1 = _within_weighted(Q1[i], P1[i], g1, W1, n, t1, ids, D[0], live, d)
    _later_dist(Qr, qoff, Gr, 1, i, ids, c1, D[1], Pr)
    kk = min(k, c1)
    if kk > 0:
        _ctf_finish(Q1, g1, W1, n, int(Ls[0]), Qr, qoff, Gr, Ls, S, thr, kk, live, i, c1, ids, D, ws64, ws32,
                    oD[:kk], oI[:kk], oC, Pr)
    else:
        oC[1:] = 0
    pos = kk
    if kk < k and c1 < n:
        if not kept:
            _wdist(Q1[i], P1[i], g1, W1, n, d)
        pos = _beyond_weighted(d, n, t1, Lw, live, k, oI, oD, kk, bufi, bufd, order, keys)
    oI[pos:] = -1
    oD[pos:] = INT32_MAX


@njit(**_JIT)
def erase_slots(codes, planes, pos):
    """Zeros over the slots ``pos``: their rows of each ``uint8 [slots, bytes]`` array in the tuple ``codes``,
    and their four bytes in ``planes`` (the byte-plane layout of ``lay_planes``; an empty array for none).
    Compiled without the GIL, so that the searches of other threads go on during an erasure (NumPy's fancy
    assignment held it: 10-20 ms for 1e5 slots of 4 lengths)."""
    for a in codes:  # a homogeneous tuple: one loop body
        for p in pos:
            a[p, :] = 0
    if planes.shape[0]:
        for p in pos:
            at = 256 * (p >> 6) + (p & 63)
            for b in range(4):
                planes[at + 64 * b] = 0


def all_live(n: int) -> np.ndarray:
    """The ``live`` mask of ``n`` codes with none removed: one all-ones word per block of 64 (and one for
    the partial block)."""
    return np.full(n // BLOCK + 1, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)


def ctf_workspace(n: int, k: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Scratch (int64, int32) for ``ctf_topk`` on ``n`` codes, top-``k`` and ``S`` stages: about
    (44 + 4 S) bytes per code, of which a call touches only the candidates. Reusing it avoids the page
    faults of fresh memory."""
    big, rcap = n + 2 * BLOCK, min(k, n) + 4096 + 2 * BLOCK
    return np.empty(big + 4 * n + 2 * rcap, np.int64), np.empty(S * big + n + 2 * rcap, np.int32)


def batch_shape(n: int, nq: int, S: int, budget: int = 1 << 28, room: int | None = None) -> tuple[int, int]:
    """(queries at a time G, candidates a query cap) of ``ctf_topk_batch``'s buffers for ``nq`` queries on
    ``n`` codes and ``S`` stages: room for ``room`` (default ``n / 64``) kept candidates a query (those within
    the first two thresholds; a query with more is searched on its own) plus a tile's stage-1 hits, and
    ``G <= min(nq, 64)`` queries within ``budget`` bytes (only the pages of actual candidates are touched). Groups of 64 were
    fastest at 1e4 to 1e6 codes (larger ones spread the appends over more cache lines than L1 holds);
    at 1e7 each group streams the 128-bit codes through the cache once."""
    cap = min(n, (n // 64 if room is None else room) + TILE * BLOCK) + 2 * BLOCK
    return max(1, min(nq, 64, budget // (cap * (8 + 4 * S)))), cap


# A weighted stage 1 (4 AND + popcount a code) takes the tile scan from this many codes on: a batch of 64 on one
# thread, us a query, query by query against the tile scan: 1e4 9.1 / 11.0, 1e5 68 / 53, 1e6 467 / 411
# (benchmarks/bench_asymmetric.py, AMD Zen 4). Its masks cost ~4x the Hamming ones, so the shared reads of a
# tile gain less than for the Hamming scan.
WEIGHTED_TILE_MIN_N = 1 << 16
# With the index's byte planes a weighted query costs what a Hamming one does in ctf_topk, while the tile scan
# still pays the weights in each hit's stage-1 distance: batches of 16 / 64 on one thread, us a query, query by
# query / tile scan (bench_small_batches.py --weighted, 4-bit weights, AMD Zen 2): 2,276 14 / 17, 10 / 12; 1e4
# 18 / 22, 14 / 17; 3e4 24 / 29, 20 / 23; 1e5 54 / 61, 52 / 59; 3e5 171 / 183, 154 / 143; 1e6 593 / 547, 541 / 456.
PLANES_WEIGHTED_TILE_MIN_N = 1 << 18


def tile_scan(nq: int, L1: int, n: int = 0, weighted: bool = False, t1: int = -1, planes: bool = False) -> bool:
    """Whether a top-k of ``nq`` queries (per thread) with an ``L1``-bit first stage on ``n`` codes runs
    ``ctf_topk_batch`` (else ``ctf_topk``): for 32-bit first stages (one word a code), from
    ``BATCH_MIN_QUERIES`` queries on and a quarter as many from ``BATCH_LARGE_N`` codes on; weighted, from
    ``WEIGHTED_TILE_MIN_N`` codes on, except for a threshold ``t1`` that the byte-plane masks take: then from
    ``BYTE_PLANES_TILE_MIN_N`` codes and ``BYTE_PLANES_TILE_WORK`` queries x codes on (see ``BATCH_LARGE_N``).
    With the byte planes kept by the index (``planes``, ``lay_planes``) the one-query kernel reads them, and such
    a weighted stage 1 takes the Hamming rule from ``PLANES_WEIGHTED_TILE_MIN_N`` codes on, the one-query kernel
    below. (``BATCH_MIN_QUERIES`` scales every case: out of reach, it forces ``ctf_topk``.)"""
    if L1 != 32:
        return False
    if weighted and BYTE_PLANES and planes_take.py_func(t1):
        if planes:  # the Hamming rule, from PLANES_WEIGHTED_TILE_MIN_N codes on
            if n < PLANES_WEIGHTED_TILE_MIN_N:
                return False
        elif n < BYTE_PLANES_TILE_MIN_N:
            return False
        else:
            return nq * n * _MEASURED_MIN_QUERIES >= BYTE_PLANES_TILE_WORK * BATCH_MIN_QUERIES
    elif weighted and n < WEIGHTED_TILE_MIN_N:
        return False
    return nq >= max(1, BATCH_MIN_QUERIES // (4 if n >= BATCH_LARGE_N else 1))


def kept_stage(n: int, Ls) -> int:
    """The stage whose candidates the buffers of ``ctf_topk_batch`` keep on ``n`` codes of lengths ``Ls``
    (an index into the per-stage counts ``outC``): with a third stage and more than ``BATCH_FILTER_MIN_N``
    codes only those within the stage-2 threshold (2: ranked at stage 3; less memory traffic), else every
    stage-1 candidate (1)."""
    return 2 if len(Ls) > 2 and n > BATCH_FILTER_MIN_N else 1


def stage2_keep(n: int, thr: np.ndarray, Ls) -> int:
    """``hi2`` of ``ctf_topk_batch`` on ``n`` codes of lengths ``Ls`` (:func:`kept_stage`): the stage-2
    threshold, or the stage-2 length (keep all)."""
    return int(thr[1]) if kept_stage(n, Ls) == 2 else int(Ls[1])


def batch_buffers(G: int, cap: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate buffers of ``ctf_topk_batch``: ids ``int64 [G, cap]``, distances ``int32 [G, S, cap]``."""
    return np.empty((G, cap), np.int64), np.empty((G, S, cap), np.int32)


def stage_offsets(lengths: list[int]) -> np.ndarray:
    """``qoff`` for a pyramid of code lengths (see ``ctf_rank``): 64-bit words, zero-padded."""
    return np.array([0] + [-(-L // 64) for L in lengths[1:]], np.int64).cumsum()


def later_queries(qs: tuple[np.ndarray, ...], qoff: np.ndarray, padded: bool | None = None) -> np.ndarray:
    """``Qr`` for the later stages' packed query codes ``qs[1:]`` (see ``ctf_rank``); ``padded``: whether some
    length needs zero padding to 64-bit words (computed when None)."""
    if padded is None:
        padded = 8 * int(qoff[-1]) != sum(q.shape[1] for q in qs[1:])
    if not padded:
        return _readonly(np.concatenate(qs[1:], axis=1).view(np.uint64))
    Qr = np.zeros((qs[0].shape[0], int(qoff[-1])), np.uint64)
    b = Qr.view(np.uint8)
    for s, q in enumerate(qs[1:]):
        b[:, 8 * qoff[s] : 8 * qoff[s] + q.shape[1]] = q
    return _readonly(Qr)
