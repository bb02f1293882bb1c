"""ctfreid: fast person re-identification with multi-length binary codes.

Implements "Faster Person Re-Identification" (Wang, Gong, Cheng, Hou, ECCV 2020): the All-in-One code
pyramid, Distance Threshold Optimization (DTO) and coarse-to-fine (CtF) Hamming search.

The search side needs only NumPy (and numba); the model side needs the ``train`` extra (torch).
Names are imported lazily so ``import ctfreid`` stays cheap; every name of ``__all__`` keeps working across
reorganisations of the subpackages (tests/test_layout.py resolves each one).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CtFIndex": "ctfreid.search.index",
    "Hits": "ctfreid.search.merge",
    "merge_hits": "ctfreid.search.merge",
    "set_num_threads": "ctfreid.search.parallel",
    "get_num_threads": "ctfreid.search.parallel",
    "pack_codes": "ctfreid.codes",
    "unpack_codes": "ctfreid.codes",
    "binarize": "ctfreid.codes",
    "check_codes": "ctfreid.codes",
    "hamming_distances": "ctfreid.search.hamming",
    "hamming_rank": "ctfreid.search.hamming",
    "hamming_topk": "ctfreid.search.hamming",
    "counting_sort": "ctfreid.search.hamming",
    "ctf_rank": "ctfreid.search.coarse_to_fine",
    "ctf_search": "ctfreid.search.coarse_to_fine",
    "fit_thresholds": "ctfreid.search.thresholds",
    "evaluate_ranking": "ctfreid.eval.metrics",
    "EncodedSet": "ctfreid.encoded",
    "load_encoded": "ctfreid.encoded",
    "save_encoded": "ctfreid.encoded",
    "CtfreidError": "ctfreid.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctfreid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
