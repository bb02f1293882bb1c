"""Code format (packed bits, as faiss binary indexes): packing helpers, faiss layout compatibility, validation errors."""

import numpy as np
import pytest
from reference import ref_distances

from ctfreid.codes import (
    binarize,
    check_code_set,
    check_codes,
    pack_codes,
    to_signs,
    unpack_codes,
)
from ctfreid.search.hamming import hamming_distances


@pytest.mark.parametrize("length", [32, 96, 128, 4096])
def test_pack_unpack_roundtrip_all_input_kinds(length):
    rng = np.random.default_rng(length)
    bits = rng.integers(0, 2, (7, length))
    packed = pack_codes(bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, length // 8)
    np.testing.assert_array_equal(unpack_codes(packed), bits)
    np.testing.assert_array_equal(pack_codes(bits.astype(bool)), packed)
    np.testing.assert_array_equal(pack_codes(2 * bits - 1), packed)  # +-1 ints
    np.testing.assert_array_equal(pack_codes((2 * bits - 1).astype(np.float32)), packed)  # +-1 floats
    np.testing.assert_array_equal(to_signs(packed), 2 * bits - 1)
    features = rng.normal(size=(7, length))
    np.testing.assert_array_equal(binarize(features), pack_codes(features > 0))
    np.testing.assert_array_equal(binarize(features), pack_codes(np.sign(features)))


def test_bit_order_is_numpy_packbits_big_endian():
    bits = np.zeros((1, 32), dtype=np.uint8)
    bits[0, 0] = 1  # first bit -> most significant bit of byte 0
    bits[0, 31] = 1  # last bit -> least significant bit of byte 3
    np.testing.assert_array_equal(pack_codes(bits), [[0x80, 0, 0, 0x01]])
    assert binarize(np.array([[0.0, -1.0, 2.0] + [0.0] * 29]))[0, 0] == 0x20  # v > 0 is bit 1, v <= 0 is bit 0


@pytest.mark.parametrize("length", [32, 128, 512])
def test_distances_match_faiss_index_binary_flat(length):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    gallery = rng.integers(0, 256, (300, length // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (4, length // 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(length)
    index.add(gallery)
    fd, fi = index.search(queries, 300)
    ours = hamming_distances(queries, gallery)
    np.testing.assert_array_equal(np.sort(ours, axis=1), fd)
    np.testing.assert_array_equal(np.take_along_axis(ours, fi, axis=1), fd)
    np.testing.assert_array_equal(ours, ref_distances(queries, gallery))


def test_pack_codes_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(np.zeros((2, 40)))
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(np.zeros(32))
    with pytest.raises(ValueError, match=r"\{0, 1\} or \{-1, \+1\}"):
        pack_codes(np.full((2, 32), 2))
    with pytest.raises(ValueError, match=r"\{0, 1\} or \{-1, \+1\}"):
        pack_codes(np.array([[0, -1] * 16]))
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.array([["a"] * 32]))


def test_check_codes_errors_name_the_array():
    good = np.zeros((3, 16), dtype=np.uint8)
    assert check_codes(good, "gallery", 128).shape == (3, 16)
    with pytest.raises(ValueError, match="gallery must have dtype uint8"):
        check_codes(good.astype(np.int32), "gallery")
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        check_codes(good[0], "gallery")
    with pytest.raises(ValueError, match="16 bytes per row for 128-bit"):
        check_codes(good[:, :8], "gallery", 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_codes(good[:, :6], "gallery")
    with pytest.raises(ValueError, match="numpy uint8 array"):
        check_codes([[1, 2, 3, 4]], "gallery")
    with pytest.raises(ValueError, match=r"codes\[128\] has 2 rows"):
        check_code_set({32: np.zeros((3, 4), np.uint8), 128: np.zeros((2, 16), np.uint8)})


def test_binarize_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        binarize(np.ones((2, 33)))
    with pytest.raises(ValueError, match="finite"):
        binarize(np.full((1, 32), np.nan))


def test_binarize_refuses_complex_features():
    with pytest.raises(ValueError, match="real-valued"):
        binarize(np.ones((2, 32), np.complex64))


def test_check_code_set_refuses_a_string_length_among_integers():
    codes = {"32": np.zeros((1, 4), np.uint8), 64: np.zeros((1, 8), np.uint8)}  # before: a raw TypeError from sorted
    with pytest.raises(ValueError, match="codes key must be a multiple of 32"):
        check_code_set(codes)
    assert list(check_code_set({64: codes[64], 32: codes["32"]})) == [32, 64]
