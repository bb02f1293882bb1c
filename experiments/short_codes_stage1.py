"""How much of the gallery the 32-bit stage must keep on the runs of the short-code study (issue #16), and
at what accuracy: the goal is stage 1 keeping <= 5 % with CtF mAP within 0.5 points of the 2048-bit code.

    python3 experiments/short_codes_stage1.py RUNS_DIR [NAME ...]

For each run folder ``RUNS_DIR/f4_<name>_s<seed>`` with ``query.npz``, ``gallery.npz``, ``val.npz`` and
``thresholds.json`` (DTO, beta 2; written by experiments/short_codes.sh), on the test split:

- the 2048-bit code alone (Rank-1 / mAP);
- "5 %": the run's DTO thresholds with the 32-bit one lowered to the largest value whose stage 1 keeps at
  most 5 % of the gallery (chosen on the test split itself, so an upper bound on what a calibration can
  reach), its keep fraction and CtF Rank-1 / mAP;
- "default": the default calibration (``fit_target`` on ``val.npz``: the accuracy target, tolerance 0.5
  mAP points, built-in cost model, gallery size of the validation split), its thresholds, what stage 1
  keeps and CtF Rank-1 / mAP.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ctfreid.encoded import load_encoded
from ctfreid.eval.calibration import fit_target
from ctfreid.eval.evaluate import candidate_counts, evaluate_sets
from ctfreid.search.thresholds import read_thresholds
from short_codes_table import RUN  # the run folders' names (this folder is on sys.path when run as a script)


def ctf(query, gallery, thresholds: dict[int, int]) -> tuple[float, float, float]:
    """(Rank-1 %, mAP %, % of the gallery kept by the 32-bit stage) of CtF with ``thresholds``."""
    m = evaluate_sets(query, gallery, thresholds, methods=["ctf"])["methods"]["ctf"]
    keep = m["candidates"]["32"] / len(gallery)
    return 100 * m["rank1"], 100 * m["mAP"], 100 * keep


def run_row(run: Path) -> str | None:
    if not all((run / f).is_file() for f in ("query.npz", "gallery.npz", "val.npz", "thresholds.json")):
        return None
    query, gallery = load_encoded(run / "query.npz"), load_encoded(run / "gallery.npz")
    dto = read_thresholds(run / "thresholds.json")
    longest = evaluate_sets(query, gallery, methods=["hash2048"])["methods"]["hash2048"]
    r1, ap = 100 * longest["rank1"], 100 * longest["mAP"]
    # the largest 32-bit threshold keeping <= 5 %: the 32-bit stage's keep does not depend on the others
    q32, g32 = {32: query.codes[32]}, {32: gallery.codes[32]}
    t5 = None
    for t in range(dto[32], -1, -1):
        if candidate_counts(q32, g32, {32: t})[32] / len(gallery) <= 0.05:
            t5 = t
            break
    five = ctf(query, gallery, {**dto, 32: t5})
    fit = fit_target(load_encoded(run / "val.npz"))
    default = ctf(query, gallery, dict(fit.thresholds))
    th = "/".join(str(fit.thresholds[L]) for L in sorted(fit.thresholds))
    return (f"| {run.name[3:]} | {r1:.1f} / {ap:.1f} | {t5} | {five[2]:.1f} | {five[0]:.1f} / {five[1]:.1f} "
            f"| {five[1] - ap:+.1f} | {th} | {default[2]:.1f} | {default[0]:.1f} / {default[1]:.1f} | {default[1] - ap:+.1f} |")


def main(root: str, names: list[str]) -> None:
    runs = sorted((m["name"], int(m["seed"]), p) for p in Path(root).iterdir() if (m := RUN.match(p.name)))
    order = {n: i for i, n in enumerate(names)}
    runs = sorted((r for r in runs if not names or r[0] in order), key=lambda r: (order.get(r[0], 0), r[0], r[1]))
    print("| setting_seed | 2048-bit Rank-1 / mAP | 32-bit threshold for <= 5 % | keeps (%) | CtF Rank-1 / mAP "
          "| mAP vs 2048 | default calibration (32/128/512) | keeps (%) | CtF Rank-1 / mAP | mAP vs 2048 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, _, path in runs:
        line = run_row(path)
        if line:
            print(line, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    np.seterr(all="ignore")
    main(sys.argv[1], sys.argv[2:])
