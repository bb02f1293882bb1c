"""CMC and mAP against torchreid's own code: ``eval_market1501`` from the ``torchreid==0.2.5`` sdist on PyPI
(``torchreid/reid/metrics/rank.py``, pure NumPy; its Cython import is stubbed out so the Python path runs).

torchreid's Market-1501 loader drops junk images (pid -1) before evaluating, so torchreid is given the
gallery without them while ``ctfreid.eval.metrics.evaluate_ranking`` gets the whole gallery (junk included)
and must remove them itself. Distractors (pid 0) stay in both. torchreid ranks with ``np.argsort`` (not
stable), so ``ctfreid`` is given that same order.

The sdist is cached in ``~/.cache/ctfreid-tests`` (or ``$CTFREID_TEST_CACHE``); the test skips with a
message when it cannot be downloaded (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from ctfreid.eval.metrics import evaluate_ranking

VERSION = "0.2.5"
MEMBER = f"torchreid-{VERSION}/torchreid/reid/metrics/rank.py"
CYTHON_IMPORT = "from torchreid.reid.metrics.rank_cylib.rank_cy import evaluate_cy"


def _sdist() -> Path:
    cache = Path(os.environ.get("CTFREID_TEST_CACHE", Path.home() / ".cache" / "ctfreid-tests"))
    path = cache / f"torchreid-{VERSION}.tar.gz"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"torchreid=={VERSION}", "--no-deps", "--no-binary", ":all:",
           "-d", str(cache)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot download torchreid=={VERSION} from PyPI ({e}): reference check not run")
    if not path.is_file():
        tail = " ".join((r.stderr or r.stdout).split()[-30:])
        pytest.skip(f"cannot download torchreid=={VERSION} from PyPI (pip exit {r.returncode}: {tail})")
    return path


@pytest.fixture(scope="module")
def torchreid_rank() -> types.ModuleType:
    with tarfile.open(_sdist()) as tar:
        source = tar.extractfile(MEMBER).read().decode()
    assert CYTHON_IMPORT in source, "torchreid's rank.py changed: update the stub"
    source = source.replace(CYTHON_IMPORT, "raise ImportError('Cython evaluation stubbed out by the test')")
    module = types.ModuleType("torchreid_rank")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, MEMBER, "exec"), module.__dict__)
    assert module.IS_CYTHON_AVAI is False
    return module


def _labels(rng, nq: int, ng: int, ids: int, cams: int):
    q_pids = rng.integers(1, ids + 1, nq)
    q_camids = rng.integers(0, cams, nq)
    # gallery: identities (some shared with the queries), distractors (pid 0) and junk (pid -1)
    g_pids = rng.choice(np.arange(-1, ids + 1), ng, p=None)
    g_camids = rng.integers(0, cams, ng)
    return q_pids, q_camids, g_pids, g_camids


def _compare(torchreid_rank, distmat, q_pids, q_camids, g_pids, g_camids, max_rank=20):
    keep = g_pids != -1  # torchreid's Market-1501 loader drops junk images
    order_ref = np.argsort(distmat[:, keep], axis=1)  # what torchreid computes inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmc_ref, map_ref = torchreid_rank.eval_market1501(distmat[:, keep], q_pids, g_pids[keep], q_camids,
                                                          g_camids[keep], max_rank)
    # the same order over the whole gallery: torchreid's order of the kept items, then the junk (removed anyway)
    kept_positions = np.flatnonzero(keep)
    junk = np.flatnonzero(~keep)
    indices = np.concatenate([kept_positions[order_ref], np.broadcast_to(junk, (len(q_pids), junk.size))], axis=1)
    # interleave the junk at random positions: it must be removed wherever it is
    rng = np.random.default_rng(int(distmat.shape[1]))
    perm = np.empty_like(indices)
    for q in range(indices.shape[0]):
        slots = np.sort(rng.choice(indices.shape[1], junk.size, replace=False))
        rest = np.setdiff1d(np.arange(indices.shape[1]), slots)
        perm[q, slots] = indices[q, kept_positions.size:]
        perm[q, rest] = indices[q, :kept_positions.size]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_ranking(perm, q_pids, q_camids, g_pids, g_camids, max_rank=max_rank)
    valid = [bool(np.any((g_pids[keep] == p) & (g_camids[keep] != c))) for p, c in zip(q_pids, q_camids)]
    assert m.num_valid == sum(valid)
    np.testing.assert_allclose(m.cmc, cmc_ref[: len(m.cmc)], rtol=0, atol=1e-6)
    assert m.mAP == pytest.approx(float(map_ref), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_equals_torchreid_without_ties(torchreid_rank, seed):
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(5, 40)), int(rng.integers(30, 200))
    q_pids, q_camids, g_pids, g_camids = _labels(rng, nq, ng, ids=int(rng.integers(3, 15)), cams=int(rng.integers(2, 5)))
    # continuous distances, a little closer for the same identity: no ties, non-trivial rankings
    distmat = rng.random((nq, ng)) - 0.3 * (q_pids[:, None] == g_pids[None, :])
    # stable argsort equals torchreid's argsort here (no ties): check it, then compare
    assert np.array_equal(np.argsort(distmat, axis=1, kind="stable"), np.argsort(distmat, axis=1))
    _compare(torchreid_rank, distmat, q_pids, q_camids, g_pids, g_camids)


@pytest.mark.parametrize("seed", range(6))
def test_equals_torchreid_with_ties(torchreid_rank, seed):
    """Hamming-like integer distances (many ties): same result given torchreid's own order."""
    rng = np.random.default_rng(100 + seed)
    nq, ng = int(rng.integers(5, 40)), int(rng.integers(30, 300))
    q_pids, q_camids, g_pids, g_camids = _labels(rng, nq, ng, ids=int(rng.integers(3, 15)), cams=int(rng.integers(2, 5)))
    distmat = rng.integers(0, 8, (nq, ng)).astype(np.float64) - 2.0 * (q_pids[:, None] == g_pids[None, :])
    _compare(torchreid_rank, distmat, q_pids, q_camids, g_pids, g_camids, max_rank=int(rng.integers(1, 16)))
