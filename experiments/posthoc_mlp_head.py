#!/usr/bin/env python3
"""Is a nonlinear 32-bit head better than a linear one on the same features? (issue #16, a probe.)

    python3 experiments/posthoc_mlp_head.py RUN [--bits 32] [--heads linear,mlp512] [--seeds 0,1]

On a trained run's ``train.npz`` features (bn(v_2048)), a new head is trained for 60 epochs with the
recipe's losses (label-smoothed cross-entropy of a bias-free classifier on ``tanh(bn(head(x)))`` plus the
batch-hard triplet on the relaxed Hamming distance, P x K = 16 x 4 batches, Adam): ``linear`` (one FC, as a
code of the pyramid) or ``mlpH`` (FC to H, BN, ReLU, FC). The sign codes of query / gallery are evaluated
like the trained codes (Market-1501 protocol, Hamming distance; Rank-1 / mAP in %), beside the run's own
trained 32-bit and 2048-bit codes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from posthoc_short_codes import hamming_metrics  # noqa: E402


def head(kind: str, bits: int) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Linear(2048, bits, bias=False), nn.BatchNorm1d(bits))
    h = int(kind.removeprefix("mlp"))
    return nn.Sequential(nn.Linear(2048, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, bits, bias=False),
                         nn.BatchNorm1d(bits))


def triplet(t: torch.Tensor, y: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss on the relaxed Hamming distance ``(1 - <t_i, t_j> / L) / 2``."""
    d = (1 - t @ t.T / t.shape[1]) / 2
    same = y[:, None] == y[None]
    return F.relu((d * same).max(1).values - (d + same * 9).min(1).values + margin).mean()


def train_head(z: dict, kind: str, bits: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = torch.tensor(z["train"]["features"])
    ids, y = np.unique(z["train"]["pids"], return_inverse=True)
    yt = torch.tensor(y)
    net, clf = head(kind, bits), nn.Linear(bits, len(ids), bias=False)
    opt = torch.optim.Adam(list(net.parameters()) + list(clf.parameters()), 1e-3, weight_decay=5e-4)
    by_id = [np.flatnonzero(y == i) for i in range(len(ids))]
    for epoch in range(60):
        for group in opt.param_groups:
            group["lr"] = 1e-3 if epoch < 40 else 1e-4
        order = rng.permutation(len(ids))
        for b in range(0, len(order) - 15, 16):
            idx = np.concatenate([rng.choice(by_id[i], 4, replace=len(by_id[i]) < 4) for i in order[b:b + 16]])
            t = torch.tanh(net(X[idx]))
            loss = F.cross_entropy(clf(t), yt[idx], label_smoothing=0.1) + triplet(t, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        def signs(split: str) -> np.ndarray:
            return (net(torch.tensor(z[split]["features"])) > 0).numpy().astype(np.uint8)
        return hamming_metrics(signs("query"), signs("gallery"), z["query"], z["gallery"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--heads", default="linear,mlp512")
    ap.add_argument("--seeds", default="0,1")
    a = ap.parse_args()
    torch.set_num_threads(1)
    z = {s: dict(np.load(f"{a.run}/{s}.npz")) for s in ("train", "query", "gallery")}
    q, g = z["query"], z["gallery"]
    for L in (a.bits, 2048):
        r1, mAP = hamming_metrics(np.unpackbits(q[f"codes_{L}"], axis=1), np.unpackbits(g[f"codes_{L}"], axis=1), q, g)
        print(f"trained {L}-bit code: {r1:.1f} / {mAP:.1f}")
    for kind in a.heads.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            r1, mAP = train_head(z, kind, a.bits, seed)
            print(f"{kind} head, seed {seed}: {r1:.1f} / {mAP:.1f}", flush=True)


if __name__ == "__main__":
    main()
