"""A weighted (asymmetric) stage 1 against the Hamming one on trained runs (issue #16's stage-1 goal: keep
<= 5 % of the gallery at CtF mAP within 0.5 points of the 2048-bit code; and the 32/2048 Rank-1 ratio).

    python3 experiments/weighted_stage1.py DIR [DIR ...]

Each ``DIR`` holds ``query.npz``, ``gallery.npz`` (encoded with ``values_32``: 'ctfreid encode' writes
them) and the thresholds 'ctfreid calibrate' wrote from its ``val.npz``: ``default.json`` (the default
calibration) and ``weighted<B>.json`` (``--weighted B``); experiments/weighted_stage1.sh makes them. On
the test split it prints, per run:

- the codes alone: 2048 bits, 32 bits, and 32 bits ranked by the weighted distance with 3-bit weights
  (the scale of ``weighted3.json``): Rank-1 / mAP and the 32/2048 Rank-1 ratios;
- "<= 5 %": the largest stage-1 threshold whose stage 1 keeps at most 5 % of the gallery (chosen on the
  test split itself: an upper bound on what a calibration can reach), with the later thresholds of
  ``default.json`` (Hamming) or ``weighted3.json`` (weighted): what it keeps, CtF mAP against the 2048-bit code;
- each calibration file: thresholds, what stage 1 keeps, CtF Rank-1 / mAP against the 2048-bit code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ctfreid.encoded import load_encoded
from ctfreid.eval.evaluate import candidate_counts, evaluate_sets
from ctfreid.eval.metrics import evaluate_ranking
from ctfreid.search.asymmetric import max_distance, weighted_rank
from ctfreid.search.thresholds import read_thresholds, read_thresholds_file


def ctf(query, gallery, th, weighting=None) -> tuple[float, float, float]:
    """(Rank-1 %, mAP %, % of the gallery stage 1 keeps) of CtF."""
    m = evaluate_sets(query, gallery, th, methods=["ctf"], weighting=weighting)["methods"]["ctf"]
    return 100 * m["rank1"], 100 * m["mAP"], 100 * m["candidates"]["32"] / len(gallery)


def largest_within(query, gallery, top: int, weights=None, fraction: float = 0.05) -> int:
    """The largest stage-1 threshold keeping at most ``fraction`` of the gallery (binary search: the kept
    count grows with the threshold)."""
    q32, g32 = {32: query.codes[32]}, {32: gallery.codes[32]}
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if candidate_counts(q32, g32, {32: mid}, query_weights=weights)[32] / len(gallery) <= fraction:
            lo = mid
        else:
            hi = mid - 1
    return lo


def run(d: Path) -> None:
    query, gallery = load_encoded(d / "query.npz"), load_encoded(d / "gallery.npz")
    alone = evaluate_sets(query, gallery, methods=["hash2048", "hash32"])["methods"]
    r2048, m2048 = 100 * alone["hash2048"]["rank1"], 100 * alone["hash2048"]["mAP"]
    w3 = read_thresholds_file(d / "weighted3.json").weighting
    I = weighted_rank(query.codes[32], w3.weights(query.values), gallery.codes[32])[1]
    wm = evaluate_ranking(I, query.pids, query.camids, gallery.pids, gallery.camids)
    r32, m32 = 100 * alone["hash32"]["rank1"], 100 * alone["hash32"]["mAP"]
    print(f"## {d.name}\n")
    print(f"- codes alone (Rank-1 / mAP): 2048-bit {r2048:.1f} / {m2048:.1f}; 32-bit {r32:.1f} / {m32:.1f} "
          f"(ratio {r32 / r2048:.2f}); 32-bit weighted {100 * wm.rank1:.1f} / {100 * wm.mAP:.1f} "
          f"(ratio {100 * wm.rank1 / r2048:.2f})")
    default = read_thresholds(d / "default.json")
    wth = read_thresholds_file(d / "weighted3.json").weighted
    t5 = largest_within(query, gallery, 32)
    t5w = largest_within(query, gallery, max_distance(32), w3.weights(query.values))
    for name, th, wt in (("Hamming", {**default, 32: t5}, None), ("weighted (3 bits)", {**wth, 32: t5w}, w3)):
        r1, ap, keep = ctf(query, gallery, th, wt)
        print(f"- <= 5 %, {name}: t1 = {th[32]}, keeps {keep:.1f} %, CtF {r1:.1f} / {ap:.1f} ({ap - m2048:+.2f} mAP)")
    print("\n| calibration | thresholds 32/128/512 | stage 1 keeps (%) | CtF Rank-1 / mAP | mAP vs 2048 |")
    print("|---|---|---|---|---|")
    for f in sorted(d.glob("*.json")):
        if f.stem != "default" and not f.stem.startswith("weighted"):
            continue
        fits = read_thresholds_file(f)  # weightedB.json: the weighted fit; default.json: Hamming only
        th, wt = (fits.weighted, fits.weighting) if fits.weighted is not None else (fits.hamming, None)
        r1, ap, keep = ctf(query, gallery, th, wt)
        print(f"| {f.stem} | {'/'.join(str(th[L]) for L in sorted(th))} | {keep:.1f} | {r1:.1f} / {ap:.1f} "
              f"| {ap - m2048:+.2f} |")
    print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    np.seterr(all="ignore")
    for arg in sys.argv[1:]:
        run(Path(arg))
