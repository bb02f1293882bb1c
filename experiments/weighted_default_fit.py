#!/usr/bin/env python3
"""Which stages should the default calibration weight? (issue #16.) Fits and test-split results per run.

    python3 experiments/weighted_default_fit.py [--gallery-size 1e6] MODEL_DIR ENCODED_DIR [...]   # (pairs)

``MODEL_DIR``: a run (its pyramid gives bn(v) of the 128- and 512-bit codes from the stored ``features``, as
``ctfreid encode`` now writes them: ``experiments/weighted_later_stages.py``, ``pyramid_values``);
``ENCODED_DIR``: ``val.npz``, ``query.npz`` and ``gallery.npz`` of that run. For each run, the default target
(accuracy within 0.5 points, the built-in cost model or ``--cost-model``, planned for ``--gallery-size`` items)
is fitted on the validation split with the Hamming stages, a weighted stage 1 alone, and stage 1 with the
128-bit, the 512-bit and both later stages weighted (``fit_target(weight_bits=4, weight_later=...)``); the
weighted fit with the lowest expected validation time is in bold. Each fit is then evaluated on the dev
query / gallery: CtF mAP and Rank-1 against the 2048-bit code, the fraction of the gallery ranked at each
later stage, and the cost model's time for ``--gallery-size`` items from those test fractions (a projection,
not a measurement: no real gallery of that size is at hand).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from weighted_later_stages import pyramid_values  # noqa: E402

from ctfreid.encoded import load_encoded  # noqa: E402
from ctfreid.eval.calibration import _Evaluator, default_cost_model, fit_target, save_fit  # noqa: E402
from ctfreid.eval.cost_model import CostModel  # noqa: E402

SUBSETS = {"stage 1": (), "1+128": (128,), "1+512": (512,), "1+128+512": (128, 512)}


def with_later_values(model_dir: str, e):
    v = pyramid_values(model_dir, e.features)
    e.later_values = {L: v[L] for L in e.lengths[1:-1]}
    assert abs(v[e.lengths[0]] - e.values).max() < 1e-3, "pyramid values differ from the encoder's values_32"
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gallery-size", type=float, default=1e6)
    ap.add_argument("--cost-model", type=Path, default=None, metavar="COST.json",
                    help="a cost model saved by 'ctfreid calibrate --measure-cost-model --gallery-size N "
                    "--save-cost-model' (default: the built-in one, measured at 2e4 and 2e5 items)")
    ap.add_argument("--save-fits", type=Path, default=None, metavar="DIR",
                    help="write each weighted fit beside the Hamming one as DIR/<run>_<fit>.json (calibrate's "
                    "format, for benchmarks/bench_default_fits.py)")
    ap.add_argument("pairs", nargs="+")
    a = ap.parse_args()
    n = int(a.gallery_size)
    print(f"| run | fit | thresholds | val: expected ms at {n:,} | test: kept after 32 / 128 / 512 bits (%) | "
          f"test CtF mAP / R1 (2048-bit) | test: projected ms at {n:,} |")
    print("|---|---|---|---|---|---|---|")
    for model_dir, enc_dir in zip(a.pairs[::2], a.pairs[1::2]):
        sets = {s: with_later_values(model_dir, load_encoded(Path(enc_dir) / f"{s}.npz"))
                for s in ("val", "query", "gallery")}
        val, q, g = sets["val"], sets["query"], sets["gallery"]
        cm = default_cost_model(val.lengths, None) if a.cost_model is None else CostModel.load(a.cost_model)
        t0 = time.perf_counter()
        fits = {"Hamming": fit_target(val, cost_model=cm, gallery_size=n)}
        for name, later in SUBSETS.items():
            fits[name] = fit_target(val, cost_model=cm, gallery_size=n, weight_bits=4, weight_later=later)
        fit_s = time.perf_counter() - t0
        auto = min(SUBSETS, key=lambda k: (fits[k].expected_ms, -fits[k].val_map))
        run = Path(model_dir).name
        if a.save_fits is not None:
            a.save_fits.mkdir(parents=True, exist_ok=True)
            for name in SUBSETS:
                save_fit(a.save_fits / f"{run}_{name.replace(' ', '')}.json", fits["Hamming"], weighted=fits[name])
        for name, fit in fits.items():
            ev = _Evaluator([(q, g)], cm, n, cm.k, fit.weighting)
            ms, mAP, r1, f = ev(tuple(fit.thresholds.values()))
            kept = [float((ev.dist[0][0] <= fit.thresholds[val.lengths[0]]).mean())] + list(f[1:])
            label = f"**{name}**" if name == auto else name
            print(f"| {run} | {label} | {','.join(f'{L}={t}' for L, t in fit.thresholds.items())} | "
                  f"{fit.expected_ms:.3f} | {' / '.join(f'{100 * x:.2f}' for x in kept)} | "
                  f"{mAP:.2f} / {r1:.1f} ({ev.ref_map:.2f} / {ev.ref_rank1:.1f}) | {ms:.3f} |", flush=True)
        print(f"<!-- {run}: five fits in {fit_s:.0f} s; lowest expected validation time: {auto} -->", flush=True)


if __name__ == "__main__":
    main()
