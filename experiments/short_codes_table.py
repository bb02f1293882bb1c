"""The tables of the short-code study (issue #16) from the run folders written by experiments/short_codes.sh.

    python3 experiments/short_codes_table.py RUNS_DIR [NAME ...]

Each run folder is ``RUNS_DIR/f4_<name>_s<seed>`` with ``results.json`` (``ctfreid evaluate``) and, for the
multi-code runs, ``val.npz`` (``ctfreid encode --split val``). For each setting ``name`` (in the order given,
default: every name found) and each seed, the table gives Rank-1 / mAP of each code length and of CtF, the
32-bit / 2048-bit Rank-1 ratio, the fraction of the gallery kept by the 32-bit stage of CtF, and the 32-bit
Hamming distance of same- and different-identity validation pairs (mean ± std over all pairs); then the
mean over seeds. A second table gives, for runs whose ``log.jsonl`` records them, the tanh scale and the
mean ``|tanh(s * bn(v))|`` of each code in the last epoch (1 = saturated codes).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ctfreid.codes import unpack_codes
from ctfreid.eval.report import method_key

LENGTHS = (32, 128, 512, 2048)
RUN = re.compile(r"^f4_(?P<name>.+)_s(?P<seed>\d+)$")


def bit_distances(val: Path, length: int = 32) -> tuple[float, float, float, float] | None:
    """(same mean, same std, different mean, different std) of the Hamming distances of all val pairs."""
    if not val.is_file():
        return None
    data = np.load(val, allow_pickle=False)
    key = f"codes_{length}"
    if key not in data:
        return None
    bits = unpack_codes(data[key]).astype(np.int32)
    pids = data["pids"]
    d = bits.shape[1] - (bits @ bits.T + (1 - bits) @ (1 - bits).T)  # Hamming = L - agreements
    same = pids[:, None] == pids[None, :]
    upper = np.triu(np.ones_like(same), k=1)
    s, o = d[same & upper], d[~same & upper]
    return float(s.mean()), float(s.std()), float(o.mean()), float(o.std())


def row(run: Path) -> dict | None:
    path = run / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    methods = result["methods"]
    out: dict = {}
    for length in LENGTHS:
        m = methods.get(method_key(length))
        out[length] = (100 * m["rank1"], 100 * m["mAP"]) if m else None
    ctf = methods.get("ctf")
    out["ctf"] = (100 * ctf["rank1"], 100 * ctf["mAP"]) if ctf else None
    out["float"] = (100 * methods["float"]["rank1"], 100 * methods["float"]["mAP"]) if "float" in methods else None
    cand = (ctf or {}).get("candidates", {})
    out["keep32"] = 100 * cand["32"] / result["num_gallery"] if "32" in cand else None
    out["ratio"] = out[32][0] / out[2048][0] if out[32] and out[2048] else None
    out["bits"] = bit_distances(run / "val.npz")
    return out


def saturation(run: Path) -> tuple[float, dict[str, float]] | None:
    """(tanh scale, mean |t| per code length) of the last epoch in ``log.jsonl``; None for runs logged before
    ``train`` recorded them."""
    path = run / "log.jsonl"
    if not path.is_file():
        return None
    epochs = [e for e in map(json.loads, path.read_text().splitlines()) if e.get("type") == "epoch"]
    if not epochs or "mean_abs_code" not in epochs[-1]:
        return None
    return float(epochs[-1]["tanh_scale"]), epochs[-1]["mean_abs_code"]


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def line(label: str, r: dict) -> str:
    cells = [label]
    for key in (*LENGTHS, "ctf"):
        cells.append("-" if r[key] is None else f"{r[key][0]:.1f} / {r[key][1]:.1f}")
    cells.append(fmt(r["ratio"], ".2f"))
    cells.append(fmt(r["keep32"]))
    b = r["bits"]
    cells.append("-" if b is None else f"{b[0]:.1f} ± {b[1]:.1f} / {b[2]:.1f} ± {b[3]:.1f}")
    return "| " + " | ".join(cells) + " |"


def mean_row(rows: list[dict]) -> dict:
    def avg(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return tuple(np.mean(values, axis=0)) if isinstance(values[0], tuple) else float(np.mean(values))

    return {key: avg([r[key] for r in rows]) for key in rows[0]}


def main(root: str, names: list[str]) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(Path(root).iterdir()):
        match = RUN.match(path.name)
        if match and path.is_dir() and (r := row(path)):
            runs[match["name"]][int(match["seed"])] = r
    print("| setting (seed) | 32-bit | 128-bit | 512-bit | 2048-bit | CtF | 32/2048 Rank-1 | 32-bit stage keeps (% of gallery) "
          "| 32-bit distance, same / different identity (val) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names or list(runs):
        seeds = runs.get(name, {})
        if not seeds:
            continue
        if len(seeds) > 1:
            print(line(f"**{name}** (mean of {len(seeds)})", mean_row(list(seeds.values()))))
        for seed, r in sorted(seeds.items()):
            print(line(f"{name} (s{seed})", r))
    logged = [(f"{name} (s{seed})", sat) for name in names or list(runs) for seed in sorted(runs.get(name, {}))
              if (sat := saturation(Path(root) / f"f4_{name}_s{seed}"))]
    if logged:
        lengths = sorted({int(k) for _, (_, abs_t) in logged for k in abs_t})
        print("\n| setting (seed) | tanh scale, last epoch | " + " | ".join(f"mean abs t, {n}-bit" for n in lengths) + " |")
        print("|---|---|" + "---|" * len(lengths))
        for label, (scale, abs_t) in logged:
            print(f"| {label} | {scale:.2f} | " + " | ".join(fmt(abs_t.get(str(n)), ".2f") for n in lengths) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/short_codes", sys.argv[2:])
