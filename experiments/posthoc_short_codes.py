"""Short codes fitted after training, against the trained head (issue #16: is the 32-bit code weak because of
its head, or because so few bits of these features cannot do better?).

    python3 experiments/posthoc_short_codes.py RUN [RUN ...] [--bits 32]

For each run folder with ``train.npz``, ``query.npz`` and ``gallery.npz`` (``ctfreid encode --split ...``),
codes of ``--bits`` bits are fitted on the training split's float ``features`` and evaluated on query /
gallery (Market-1501 protocol, Hamming distance, Rank-1 / mAP in %):

- PCA to ``bits`` dimensions, then the sign, or ITQ's rotation (Gong & Lazebnik 2011) before it;
- LDA on the training identities (within-class scatter regularised by ``reg`` times its mean eigenvalue),
  the same two ways;

each on raw and on L2-normalised features, next to the trained code of that length, the trained 2048-bit
code and the float features (squared Euclidean). numpy only.
"""

from __future__ import annotations

import argparse

import numpy as np

from ctfreid.eval.metrics import evaluate_ranking, rank_by_distance, squared_euclidean_distances


def hamming_metrics(qb: np.ndarray, gb: np.ndarray, q: dict, g: dict) -> tuple[float, float]:
    """Rank-1 and mAP (%) of 0/1 bit matrices ``qb`` [nq, L] and ``gb`` [n, L]."""
    qb, gb = qb.astype(np.float32), gb.astype(np.float32)
    d = qb @ (1 - gb).T + (1 - qb) @ gb.T  # Hamming distance as two products
    m = evaluate_ranking(rank_by_distance(d), q["pids"], q["camids"], g["pids"], g["camids"])
    return 100 * m.rank1, 100 * m.mAP


def itq(V: np.ndarray, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """ITQ rotation ``R`` [L, L] minimising ``|sign(V R) - V R|`` (alternating sign and Procrustes steps)."""
    R, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((V.shape[1], V.shape[1])))
    for _ in range(iterations):
        u, _, vt = np.linalg.svd(V.T @ np.sign(V @ R))
        R = u @ vt
    return R


def pca(X: np.ndarray, bits: int) -> np.ndarray:
    """The ``bits`` leading principal directions of ``X``."""
    return np.linalg.svd(X - X.mean(0), full_matrices=False)[2][:bits].T


def lda(X: np.ndarray, y: np.ndarray, bits: int, reg: float) -> np.ndarray:
    """The ``bits`` leading LDA directions: whiten the (regularised) within-class scatter, then the
    between-class scatter's leading eigenvectors."""
    ids, inv = np.unique(y, return_inverse=True)
    count = np.bincount(inv)
    means = np.zeros((len(ids), X.shape[1]))
    np.add.at(means, inv, X)
    means /= count[:, None]
    W = X - means[inv]
    Sw = W.T @ W / len(X)
    Sw += reg * np.trace(Sw) / len(Sw) * np.eye(len(Sw))
    B = (means - X.mean(0)) * np.sqrt(count)[:, None]
    Linv = np.linalg.inv(np.linalg.cholesky(Sw))
    _, vecs = np.linalg.eigh(Linv @ (B.T @ B / len(X)) @ Linv.T)
    return Linv.T @ vecs[:, ::-1][:, :bits]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--bits", type=int, default=32)
    a = ap.parse_args()
    for run in a.runs:
        z = {s: dict(np.load(f"{run}/{s}.npz")) for s in ("train", "query", "gallery")}
        q, g = z["query"], z["gallery"]
        bits = lambda s, L: np.unpackbits(z[s][f"codes_{L}"], axis=1)  # noqa: E731
        print(f"{run}")
        for L in sorted({a.bits, 2048}):
            if f"codes_{L}" in q:
                r1, mAP = hamming_metrics(bits("query", L), bits("gallery", L), q, g)
                print(f"  trained {L}-bit code: Rank-1 {r1:.1f} / mAP {mAP:.1f}")
        m = evaluate_ranking(rank_by_distance(squared_euclidean_distances(q["features"], g["features"])),
                             q["pids"], q["camids"], g["pids"], g["camids"])
        print(f"  float features: Rank-1 {100 * m.rank1:.1f} / mAP {100 * m.mAP:.1f}")
        for norm in (False, True):
            f = {s: z[s]["features"].astype(np.float64) for s in z}
            if norm:
                f = {s: v / np.linalg.norm(v, axis=1, keepdims=True) for s, v in f.items()}
            X, y, mu = f["train"], z["train"]["pids"], f["train"].mean(0)
            fits = {"PCA": pca(X, a.bits)} | {f"LDA (reg {r:g})": lda(X, y, a.bits, r) for r in (1e-3, 1e-1)}
            for name, P in fits.items():
                V = (X - mu) @ P
                R = itq(V / V.std(0))
                for how, rot in (("sign", np.eye(a.bits)), ("ITQ", R)):
                    code = {s: ((f[s] - mu) @ P / V.std(0)) @ rot > 0 for s in ("query", "gallery")}
                    r1, mAP = hamming_metrics(code["query"], code["gallery"], q, g)
                    print(f"  {'L2-normalised' if norm else 'raw'} features, {name} + {how}: Rank-1 {r1:.1f} / mAP {mAP:.1f}")


if __name__ == "__main__":
    main()
