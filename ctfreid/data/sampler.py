"""PK sampling (Sec. 4.2): every batch holds P identities x K images (default 16 x 4 = 64).

Batch-hard triplet loss needs positives and negatives inside each batch, hence this sampler. It hands out
whole batches (``batches(epoch)``, a ``batch_sampler`` for a DataLoader); plain NumPy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctfreid.errors import CtfreidError


class PKSampler:
    """Batches of ``p * k`` dataset indices: ``p`` distinct identities, ``k`` images each.

    Each epoch, every identity's images are shuffled and cut into chunks of ``k``; the last chunk (or the only
    one, for identities with fewer than ``k`` images, a single image included) is topped up by sampling that
    identity's images with replacement. The chunks are then scheduled into the largest possible number of
    full batches with ``p`` distinct identities each (largest-remaining first, random tie-break, so
    identities with many images are not cut short); batch order is shuffled.

    The batches depend only on ``seed`` and the epoch passed to :meth:`batches`; there are
    ``num_batches`` of them every epoch (no partial batch ever occurs).
    """

    def __init__(self, pids: Sequence[int], p: int = 16, k: int = 4, seed: int = 0) -> None:
        if p < 1 or k < 1:
            raise CtfreidError(f"p and k must be >= 1, got p={p}, k={k}")
        pids = np.asarray(pids, dtype=np.int64)
        if pids.ndim != 1:
            raise CtfreidError(f"pids must be a 1-D sequence of identity labels, got shape {pids.shape}")
        ids, inverse = np.unique(pids, return_inverse=True)
        if len(ids) < p:
            raise CtfreidError(f"PK sampling needs at least p={p} identities, the data has {len(ids)}")
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(ids))
        self._groups = np.split(order, np.cumsum(counts)[:-1])  # indices of each identity
        self.p, self.k, self.seed = p, k, seed
        self._chunks = -(-counts // k)  # ceil(n / k) chunks per identity
        self.num_batches = _max_batches(self._chunks, p)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The ``num_batches`` batches of epoch ``epoch``: int64 arrays of ``p * k`` dataset indices."""
        rng = np.random.default_rng([self.seed, epoch])
        k, p, n_batches = self.k, self.p, self.num_batches
        chunks = []
        for idx in self._groups:
            idx = rng.permutation(idx)
            pad = -len(idx) % k
            if pad:
                idx = np.concatenate([idx, rng.choice(idx, pad, replace=True)])
            chunks.append(list(idx.reshape(-1, k)))
        # Keep p * n_batches chunks, at most n_batches per identity, chosen at random.
        capped = np.minimum(self._chunks, n_batches)
        owner = np.repeat(np.arange(len(chunks)), capped)
        keep = np.bincount(owner[rng.permutation(len(owner))[: p * n_batches]], minlength=len(chunks))
        # Largest-remaining-first gives exactly n_batches batches of p distinct identities: every identity
        # left with as many chunks as rounds remain is always among the p largest.
        remaining = keep.astype(np.float64)
        out = []
        for _ in range(n_batches):
            chosen = np.argpartition(-(remaining + rng.random(len(remaining))), p - 1)[:p]
            out.append(np.concatenate([chunks[i].pop() for i in chosen]))
            remaining[chosen] -= 1
        return [out[i] for i in rng.permutation(n_batches)]


def _max_batches(chunks: np.ndarray, p: int) -> int:
    """Largest B with sum(min(c_i, B)) >= p * B: the most batches of p distinct identities the chunks allow."""
    lo, hi = 1, int(chunks.sum()) // p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(chunks, mid).sum() >= p * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo
