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


def study(model_dir: str, enc_dir: str, fit_file: str) -> dict:
    q, g, val = (load_encoded(f"{enc_dir}/{s}.npz") for s in ("query", "gallery", "val"))
    fits = read_thresholds_file(fit_file)
    tw, wt = fits.weighted, fits.weighting
    xq, xv = pyramid_values(model_dir, q.features), pyramid_values(model_dir, val.features)
    assert np.allclose(xq[32], q.values, atol=1e-4), "pyramid values differ from the encoder's values_32"
    w32 = weighted_distances(q.codes[32], wt.weights(q.values), g.codes[32])
    ham = {L: hamming_distances(q.codes[L], g.codes[L]) for L in (128, 512, 2048)}

    def mAP(I: np.ndarray) -> float:
        return 100 * evaluate_ranking(I, q.pids, q.camids, g.pids, g.camids).mAP

    t0 = [tw[32], tw[128], tw[512]]
    I0, kept0 = ctf([w32, ham[128], ham[512], ham[2048]], t0)
    _, Ilib = ctf_rank(q.codes, g.codes, tw, query_weights=wt.weights(q.values))
    assert (I0 == Ilib).all(), "numpy CtF != ctf_rank"
    base = mAP(I0)
    out = {"run": enc_dir.rstrip("/").split("/")[-1], "default_kept": kept0, "mAP": base,
           "mAP_2048": mAP(np.argsort(ham[2048], axis=1, kind="stable"))}
    for s, L in ((1, 128), (2, 512)):
        wL = Weighting(scale=weight_scale(xv[L]), bits=4)
        wd = weighted_distances(q.codes[L], wL.weights(xq[L]), g.codes[L])
        stages = [w32, ham[128], ham[512], ham[2048]]
        before = np.ones(w32.shape, bool)
        for j in range(s):
            before &= stages[j] <= t0[j]
        for name, d, grid in (("hamming", ham[L], range(max(0, t0[s] - 40), t0[s] + 11)),
                              ("weighted", wd, sorted({int(np.quantile(wd[before], min(1.0, f * kept0[s] / kept0[s - 1])))
                                                       for f in np.linspace(0.05, 1.2, 47)}))):
            best = None
            for t in grid:
                D = list(stages)
                D[s] = d
                th = list(t0)
                th[s] = t
                I, kept = ctf(D, th)
                m = mAP(I)
                if m >= base - 0.05 and (best is None or kept[s] < best[1][s]):
                    best = (t, kept, m)
            out[f"{L} {name}"] = best
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
    for i in range(0, len(args), 3):
        r = study(*args[i:i + 3])
        k = r["default_kept"]
        h2, w2, h3, w3 = r["128 hamming"], r["128 weighted"], r["512 hamming"], r["512 weighted"]
        print(f"| {r['run']} | {100 * k[0]:.1f} / {100 * k[1]:.1f} / {100 * k[2]:.2f} %, {r['mAP']:.2f} "
              f"({r['mAP_2048']:.2f}) | {100 * h2[1][1]:.2f} / {100 * h2[1][2]:.2f} %, **{100 * w2[1][1]:.2f} / "
              f"{100 * w2[1][2]:.2f} %** | {100 * h3[1][2]:.2f} %, **{100 * w3[1][2]:.2f} %** |", flush=True)


if __name__ == "__main__":
    main()
