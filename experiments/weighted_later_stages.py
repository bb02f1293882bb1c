#!/usr/bin/env python3
"""Would weighting the later stages too cut CtF's work at the same accuracy? (issues #15 / #16, exploratory.)

The weighted stage 1 (``ctfreid.search.asymmetric``) weights the query's 32-bit code by |bn(v_32)|. This
script asks the same of the 128-bit and the 512-bit stage, one at a time, on real codes:

    python3 experiments/weighted_later_stages.py MODEL_DIR ENCODED_DIR FIT.json [...]   # (triples)

``MODEL_DIR``: a run (its pyramid gives the query's bn(v) at every length from the stored ``features`` =
bn(v_2048): the heads and BNs are affine in eval mode); ``ENCODED_DIR``: ``query.npz``, ``gallery.npz`` and
``val.npz`` of that run with ``values_32``; ``FIT.json``: ``ctfreid calibrate``'s default file (its weighted
stage 1 is kept). With the weighted stage 1 and the other thresholds fixed, the threshold of one stage is
swept on the dev query / gallery: Hamming (as now) and weighted (4-bit weights, scale fitted on ``val`` as for
stage 1). For each, the sweep point that keeps the fewest candidates after that stage at a CtF mAP no lower
than the default's minus 0.05. A sweep on the test split traces each method's frontier; it is not a fit.
The numpy CtF ranking used here is checked against ``ctf_rank`` on the default fit. A first table gives
each code alone, Hamming and weighted (full rankings, Rank-1 / mAP in %).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ctfreid.encoded import load_encoded
from ctfreid.eval.calibration import split_validation
from ctfreid.eval.metrics import evaluate_ranking
from ctfreid.learn.run_dir import load_model
from ctfreid.search.asymmetric import Weighting, weight_scale, weighted_distances
from ctfreid.search.coarse_to_fine import ctf_rank
from ctfreid.search.hamming import hamming_distances
from ctfreid.search.thresholds import read_thresholds_file


def pyramid_values(model_dir: str, features: np.ndarray) -> dict[int, np.ndarray]:
    """bn(v_L) of every length from bn(v_2048) (Eq. 1 chain, eval mode)."""
    model, _ = load_model(model_dir)
    model.eval()
    fcs, bns, chain = list(model.fcs), list(model.bns), model.lengths_longest_first
    x = torch.from_numpy(features)
    v = x / bns[0].weight * torch.sqrt(bns[0].running_var + bns[0].eps) + bns[0].running_mean
    out = {chain[0]: x}
    with torch.no_grad():
        for L, fc, bn in zip(chain[1:], fcs[1:], bns[1:]):
            v = fc(v)
            out[L] = bn(v)
    return {L: t.numpy() for L, t in out.items()}


def ctf(D: list[np.ndarray], t: list[int]) -> tuple[np.ndarray, list[float]]:
    """Full CtF rankings of per-stage distances (shortest first) with thresholds ``t``: stages reached, then
    the distances from the finest reached down, then gallery order; and the kept fraction after each stage."""
    reach, alive = np.ones(D[0].shape, np.int64), np.ones(D[0].shape, bool)
    for s in range(len(D) - 1):
        alive &= D[s] <= t[s]
        reach += alive
    idx = np.broadcast_to(np.arange(D[0].shape[1]), D[0].shape)
    keys = [idx] + [np.where(reach > s, D[s], 0) for s in range(len(D))] + [-reach]
    return np.lexsort(keys, axis=-1), [float((reach > s).mean()) for s in range(1, len(D))]


class Pair:
    """A query / gallery pair's per-stage distances: the default's weighted stage 1, and Hamming and weighted
    (4-bit, scale ``scales[L]``) distances at the later lengths; ``mAP(I)`` of a ranking."""

    def __init__(self, model_dir: str, q, g, weighting: Weighting, scales: dict[int, float]) -> None:
        x = pyramid_values(model_dir, q.features)
        assert np.allclose(x[32], q.values, atol=1e-4), "pyramid values differ from the encoder's values_32"
        self.q, self.g = q, g
        self.w32 = weighted_distances(q.codes[32], weighting.weights(q.values), g.codes[32])
        self.ham = {L: hamming_distances(q.codes[L], g.codes[L]) for L in (128, 512, 2048)}
        self.wtd = {L: weighted_distances(q.codes[L], Weighting(scale=scales[L], bits=4).weights(x[L]), g.codes[L])
                    for L in (128, 512)}

    def stages(self, weighted_at: int | None = None) -> list[np.ndarray]:
        return [self.w32] + [self.wtd[L] if L == weighted_at else self.ham[L] for L in (128, 512)] + [self.ham[2048]]

    def mAP(self, I: np.ndarray) -> float:
        return 100 * evaluate_ranking(I, self.q.pids, self.q.camids, self.g.pids, self.g.camids).mAP


def _eval(pairs: list[Pair], weighted_at: int | None, th: list[int]) -> tuple[float, list[float]]:
    """Mean CtF mAP and kept fractions over ``pairs``."""
    runs = [ctf(p.stages(weighted_at), th) for p in pairs]
    return (float(np.mean([p.mAP(I) for p, (I, _) in zip(pairs, runs)])),
            list(np.mean([k for _, k in runs], axis=0)))


def _least_kept(pairs: list[Pair], t0: list[int], s: int, L: int, weighted: bool) -> tuple[int, list[float], float]:
    """The threshold of stage ``s`` (length ``L``) that keeps the fewest after it at a mean CtF mAP no lower than
    the default's minus 0.05 on ``pairs``: (threshold, kept fractions, mAP)."""
    base, kept0 = _eval(pairs, None, t0)
    if weighted:  # weighted units: thresholds at quantiles of the distances of the candidates reaching stage s
        d = np.concatenate([p.wtd[L][np.logical_and.reduce([x <= t for x, t in zip(p.stages()[:s], t0[:s])])]
                            for p in pairs])
        grid = sorted({int(np.quantile(d, min(1.0, f * kept0[s] / kept0[s - 1]))) for f in np.linspace(0.05, 1.2, 47)})
    else:
        grid = range(max(0, t0[s] - 40), t0[s] + 11)
    best = None
    for t in grid:
        th = list(t0)
        th[s] = t
        m, kept = _eval(pairs, L if weighted else None, th)
        if m >= base - 0.05 and (best is None or kept[s] < best[1][s]):
            best = (t, kept, m)
    return best


def study(model_dir: str, enc_dir: str, fit_file: str, folds: int = 3) -> dict:
    """The default on the test split, and for each later stage and method: the least-kept point of a sweep on
    the test split (its frontier), and the threshold chosen by the same rule on ``folds`` validation splits
    (``calibration.split_validation``), evaluated on the test split."""
    q, g, val = (load_encoded(f"{enc_dir}/{s}.npz") for s in ("query", "gallery", "val"))
    fits = read_thresholds_file(fit_file)
    tw, wt = fits.weighted, fits.weighting
    xv = pyramid_values(model_dir, val.features)
    scales = {L: weight_scale(xv[L]) for L in (128, 512)}
    test = Pair(model_dir, q, g, wt, scales)
    vals = [Pair(model_dir, *split_validation(val, 0, j), wt, scales) for j in range(folds)]
    t0 = [tw[32], tw[128], tw[512]]
    I0, kept0 = ctf(test.stages(), t0)
    _, Ilib = ctf_rank(q.codes, g.codes, tw, query_weights=wt.weights(q.values))
    assert (I0 == Ilib).all(), "numpy CtF != ctf_rank"
    out = {"run": enc_dir.rstrip("/").split("/")[-1], "default_kept": kept0, "mAP": test.mAP(I0),
           "mAP_2048": test.mAP(np.argsort(test.ham[2048], axis=1, kind="stable"))}
    for s, L in ((1, 128), (2, 512)):
        for weighted in (False, True):
            name = f"{L} {'weighted' if weighted else 'hamming'}"
            out[name] = _least_kept([test], t0, s, L, weighted)
            t = _least_kept(vals, t0, s, L, weighted)[0]
            th = list(t0)
            th[s] = t
            I, kept = ctf(test.stages(L if weighted else None), th)
            out[f"{name} fitted"] = (t, kept, test.mAP(I))
    return out


def alone(model_dir: str, enc_dir: str) -> list[tuple[float, float, float, float]]:
    """Rank-1 and mAP (%) of each code alone: (Hamming R1, mAP, weighted R1, mAP) per length, shortest first."""
    q, g, val = (load_encoded(f"{enc_dir}/{s}.npz") for s in ("query", "gallery", "val"))
    xq, xv = pyramid_values(model_dir, q.features), pyramid_values(model_dir, val.features)

    def ev(d: np.ndarray) -> tuple[float, float]:
        m = evaluate_ranking(np.argsort(d, axis=1, kind="stable"), q.pids, q.camids, g.pids, g.camids)
        return 100 * m.rank1, 100 * m.mAP

    out = []
    for L in sorted(q.codes):
        w = Weighting(scale=weight_scale(xv[L]), bits=4).weights(xq[L])
        out.append((*ev(hamming_distances(q.codes[L], g.codes[L])), *ev(weighted_distances(q.codes[L], w, g.codes[L]))))
    return out


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 3:
        sys.exit(__doc__)
    print("| run | " + " | ".join(f"{L} bits: Hamming, weighted" for L in (32, 128, 512, 2048)) + " |")
    print("|---|---|---|---|---|")
    for i in range(0, len(args), 3):
        cells = [f"{a:.1f} / {b:.1f}, **{c:.1f} / {d:.1f}**" for a, b, c, d in alone(*args[i:i + 2])]
        print(f"| {args[i + 1].rstrip('/').split('/')[-1]} | " + " | ".join(cells) + " |", flush=True)
    print()
    print("| run | default: kept after 32 / 128 / 512 bits, CtF mAP (2048-bit) | 128-bit stage: Hamming, weighted "
          "(kept after 128 / after 512) | 512-bit stage: Hamming, weighted (kept after 512) |")
    print("|---|---|---|---|")
    results = []
    for i in range(0, len(args), 3):
        r = study(*args[i:i + 3])
        results.append(r)
        k = r["default_kept"]
        h2, w2, h3, w3 = r["128 hamming"], r["128 weighted"], r["512 hamming"], r["512 weighted"]
        print(f"| {r['run']} | {100 * k[0]:.1f} / {100 * k[1]:.1f} / {100 * k[2]:.2f} %, {r['mAP']:.2f} "
              f"({r['mAP_2048']:.2f}) | {100 * h2[1][1]:.2f} / {100 * h2[1][2]:.2f} %, **{100 * w2[1][1]:.2f} / "
              f"{100 * w2[1][2]:.2f} %** | {100 * h3[1][2]:.2f} %, **{100 * w3[1][2]:.2f} %** |", flush=True)
    print()
    print("thresholds chosen by the same rule on 3 validation splits, evaluated on the test split (kept %, test mAP)")
    print("| run | 128-bit stage: Hamming | weighted | 512-bit stage: Hamming | weighted |")
    print("|---|---|---|---|---|")
    for r in results:
        cells = []
        for L, s in ((128, 1), (512, 2)):
            for m in ("hamming", "weighted"):
                t, kept, mAP = r[f"{L} {m} fitted"]
                cell = f"{100 * kept[s]:.2f} %, {mAP:.2f}"
                cells.append(f"**{cell}**" if m == "weighted" else cell)
        print(f"| {r['run']} (default {r['mAP']:.2f}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
