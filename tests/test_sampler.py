"""PK sampler: P identities x K images per batch, deterministic per seed and epoch; torch-free."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctfreid.data.sampler import PKSampler


def pids_from_counts(counts: list[int], seed: int = 0) -> list[int]:
    """Identity labels (arbitrary values) with the given image counts, in shuffled dataset order."""
    labels = np.repeat(np.arange(len(counts)) * 7 + 3, counts)
    return np.random.default_rng(seed).permutation(labels).tolist()


def indices(sampler: PKSampler, epoch: int = 0) -> list[int]:
    return [int(i) for b in sampler.batches(epoch) for i in b]


def check_batches(sampler: PKSampler, pids: list[int], epoch: int = 0) -> list[list[int]]:
    batches = [b.tolist() for b in sampler.batches(epoch)]
    assert len(batches) == sampler.num_batches
    pk = sampler.p * sampler.k
    for batch in batches:
        assert len(batch) == pk
        per_id = Counter(pids[i] for i in batch)
        assert len(per_id) == sampler.p and set(per_id.values()) == {sampler.k}
    return batches


def test_p_by_k_batches_on_uneven_identities():
    counts = [9, 4, 4, 1, 2, 13, 5, 7, 3, 6, 1, 8]
    pids = pids_from_counts(counts)
    s = PKSampler(pids, p=4, k=4, seed=0)
    batches = check_batches(s, pids)
    assert len(batches) == s.num_batches
    for b in batches:  # images of an identity inside a batch are that identity's images
        assert all(0 <= i < len(pids) for i in b)


@pytest.mark.parametrize("counts, p, k, expected", [
    # Hand-worked: chunks of k per identity (ceil), largest number of batches with p distinct identities.
    ([8, 4, 4, 1], 2, 4, 2),  # chunks 2,1,1,1 -> 5 chunks, 2 batches of 2
    ([12, 1, 1], 2, 4, 2),  # chunks 3,1,1: (A,B), (A,C); the third chunk of A cannot pair
    ([40, 1, 1], 2, 4, 2),
    ([4, 4, 4, 4], 4, 4, 1),
    ([8] * 8, 4, 4, 4),  # 16 chunks, 4 batches
    ([1, 1, 1], 3, 4, 1),  # single images: used with replacement
    ([5, 5, 5], 2, 2, 4),  # chunks 3,3,3 = 9 -> 4 batches of 2
])
def test_number_of_batches(counts, p, k, expected):
    pids = pids_from_counts(counts)
    s = PKSampler(pids, p=p, k=k)
    assert s.num_batches == expected
    check_batches(s, pids)


def test_brute_force_batch_count_small_cases():
    # Oracle: the most batches of p distinct identities, by exhaustive search over chunk assignments.
    def best(chunks: tuple[int, ...], p: int) -> int:
        from itertools import combinations

        memo: dict = {}

        def go(c):
            if c in memo:
                return memo[c]
            alive = [i for i, v in enumerate(c) if v > 0]
            out = 0
            for combo in combinations(alive, p):
                nxt = list(c)
                for i in combo:
                    nxt[i] -= 1
                out = max(out, 1 + go(tuple(sorted(nxt))))
            memo[c] = out
            return out

        return go(tuple(sorted(chunks)))

    rng = np.random.default_rng(0)
    for _ in range(25):
        counts = rng.integers(1, 12, size=int(rng.integers(3, 7))).tolist()
        p = int(rng.integers(2, len(counts) + 1))
        k = int(rng.integers(1, 5))
        s = PKSampler(pids_from_counts(counts), p=p, k=k)
        assert s.num_batches == best(tuple(-(-c // k) for c in counts), p), (counts, p, k)


def test_every_image_once_when_chunks_fit():
    pids = pids_from_counts([8] * 8)
    s = PKSampler(pids, p=4, k=4, seed=1)
    assert sorted(indices(s)) == list(range(64))  # 16 chunks in 4 batches: no image dropped or repeated


def test_single_image_identity_repeated_k_times():
    pids = pids_from_counts([1, 1, 1, 1])
    s = PKSampler(pids, p=4, k=3)
    batch = indices(s)
    assert sorted(batch) == sorted([i for i in range(4) for _ in range(3)])


def test_deterministic_and_epoch_aware():
    pids = pids_from_counts([6, 9, 4, 3, 7, 5, 8, 2], seed=3)
    a, b = PKSampler(pids, p=3, k=2, seed=7), PKSampler(pids, p=3, k=2, seed=7)
    e0 = indices(a, 0)
    assert e0 == indices(b, 0) == indices(a, 0)  # same seed, same epoch, however often asked
    e1 = indices(a, 1)
    assert e1 != e0 and len(e1) == len(e0)
    assert indices(PKSampler(pids, p=3, k=2, seed=8), 0) != e0
    for epoch in range(3):
        check_batches(a, pids, epoch)


def test_dataloader_batches():
    pids = pids_from_counts([5, 4, 6, 3, 4])
    s = PKSampler(pids, p=2, k=3, seed=0)
    loader = DataLoader(torch.tensor(pids), batch_sampler=s.batches(0))
    batches = [b.tolist() for b in loader]
    assert len(batches) == s.num_batches
    for b in batches:
        assert sorted(Counter(b).values()) == [3, 3]


def test_bad_input():
    with pytest.raises(ValueError, match="at least p=4 identities"):
        PKSampler([1, 1, 2, 2, 3], p=4, k=2)
    with pytest.raises(ValueError, match="p and k"):
        PKSampler([1, 2], p=0, k=2)
    with pytest.raises(ValueError, match="1-D"):
        PKSampler([[1, 2], [3, 4]], p=1, k=1)


def test_sampler_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from ctfreid.data.sampler import PKSampler; "
            "print(PKSampler([1, 1, 2, 2], p=2, k=2).num_batches)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
