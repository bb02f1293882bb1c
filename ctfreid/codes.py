"""Binary code format: packed ``uint8[n, L // 8]`` in ``numpy.packbits`` bit order.

A code of ``L`` bits is stored as ``L // 8`` bytes, most significant bit first within each byte (the
layout of ``numpy.packbits`` and of faiss binary indexes), so codes move between ctfreid and faiss
without conversion. Lengths are multiples of 32 between 32 and 4096 bits.

A set of codes of several lengths for the same images is a ``dict`` from length (bits) to packed array,
e.g. ``{32: uint8[n, 4], 128: uint8[n, 16], 512: uint8[n, 64], 2048: uint8[n, 256]}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ctfreid.errors import CtfreidError

MIN_BITS = 32
MAX_BITS = 4096

CodeSet = dict[int, np.ndarray]


def check_length(length: int, name: str = "code length") -> int:
    """Return ``length`` as int if it is a multiple of 32 in [32, 4096], else raise ``ValueError``."""
    try:
        ok = int(length) == length
    except (TypeError, ValueError):
        ok = False
    if not ok or length % 32 or not MIN_BITS <= length <= MAX_BITS:
        raise CtfreidError(f"{name} must be a multiple of 32 between {MIN_BITS} and {MAX_BITS} bits, got {length!r}")
    return int(length)


def check_codes(codes: np.ndarray, name: str = "codes", length: int | None = None) -> np.ndarray:
    """Validate packed codes and return them as a C-contiguous ``uint8[n, L // 8]`` array.

    Raises ``ValueError`` naming ``name`` when the dtype is not uint8, the array is not 2-D, the width is
    not a whole number of 32-bit words, or (when ``length`` is given) the width is not ``length // 8``.
    """
    if not isinstance(codes, np.ndarray):
        raise CtfreidError(f"{name} must be a numpy uint8 array of shape (n, L // 8), got {type(codes).__name__}")
    if codes.dtype != np.uint8:
        raise CtfreidError(f"{name} must have dtype uint8 (packed bits), got {codes.dtype}")
    if codes.ndim != 2:
        raise CtfreidError(f"{name} must be 2-D (n, L // 8), got shape {codes.shape}")
    if length is not None:
        length = check_length(length)
        if codes.shape[1] != length // 8:
            raise CtfreidError(
                f"{name} must have {length // 8} bytes per row for {length}-bit codes, got shape {codes.shape}"
            )
    else:
        check_length(codes.shape[1] * 8, f"{name} code length (bytes per row x 8)")
    return np.ascontiguousarray(codes)


def check_code_set(codes: Mapping[int, np.ndarray], name: str = "codes") -> CodeSet:
    """Validate a ``{length: packed codes}`` dict: valid lengths, matching widths, equal row counts.

    Returns a new dict sorted by length (shortest first).
    """
    if not isinstance(codes, Mapping) or not codes:
        raise CtfreidError(f"{name} must be a non-empty dict {{length: uint8[n, length // 8]}}, got {codes!r:.80}")
    out: CodeSet = {}
    n = None
    keys = {check_length(key, f"{name} key"): key for key in codes}  # checked before sorting: "32" and 64 do not sort
    for length_i in sorted(keys):
        arr = check_codes(codes[keys[length_i]], f"{name}[{length_i}]", length_i)
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise CtfreidError(
                f"{name}[{length_i}] has {arr.shape[0]} rows but the shorter codes have {n}: "
                "every length must hold the same items"
            )
        out[length_i] = arr
    return out


def pack_codes(bits: np.ndarray, name: str = "bits") -> np.ndarray:
    """Pack a ``[n, L]`` array of bits into ``uint8[n, L // 8]`` codes.

    Accepts bool, {0, 1} or {-1, +1} values (+1 and 1 and True become bit 1). ``L`` must be a multiple of 32.
    """
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise CtfreidError(f"{name} must be 2-D (n, L), got shape {bits.shape}")
    check_length(bits.shape[1], f"{name} length (columns)")
    if bits.dtype == np.bool_:
        ones = bits
    else:
        if not (np.issubdtype(bits.dtype, np.integer) or np.issubdtype(bits.dtype, np.floating)):
            raise CtfreidError(f"{name} must hold bool, {{0, 1}} or {{-1, +1}} values, got dtype {bits.dtype}")
        values = np.unique(bits)
        if np.all(np.isin(values, (0, 1))):
            ones = bits == 1
        elif np.all(np.isin(values, (-1, 1))):
            ones = bits == 1
        else:
            raise CtfreidError(
                f"{name} must hold bool, {{0, 1}} or {{-1, +1}} values, got values such as {values[:5].tolist()}"
            )
    return np.packbits(ones, axis=1)


def unpack_codes(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    """Unpack ``uint8[n, L // 8]`` codes into a ``uint8[n, L]`` array of {0, 1}."""
    return np.unpackbits(check_codes(codes, name), axis=1)


def to_signs(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    """Unpack codes into an ``int8[n, L]`` array of {-1, +1} (the paper's b = sgn(.))."""
    return unpack_codes(codes, name).astype(np.int8) * 2 - 1


def binarize(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Eq. 2 without the BN: ``b = sgn(v)`` packed; a value > 0 is bit 1, a value <= 0 is bit 0."""
    features = np.asarray(features)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
        raise CtfreidError(f"{name} must be a real-valued 2-D array (n, L), got {features.dtype} {features.shape}")
    check_length(features.shape[1], f"{name} length (columns)")
    if np.issubdtype(features.dtype, np.floating) and not np.isfinite(features).all():
        raise CtfreidError(f"{name} must be finite, got NaN or infinite values")
    return np.packbits(features > 0, axis=1)
