"""Assemble the Markdown tables of docs/results-cuhk03.md from the JSON files written by experiments/cuhk03.sh.

    python3 experiments/results_table.py RUNS_DIR > results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {
    "aio_cp_sd": "pyramid + self-distillation (full AiO)",
    "aio_cp": "pyramid, no self-distillation",
    "aio_none": "no pyramid (independent heads), no self-distillation",
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table4(result: dict) -> list[str]:
    rows = result["methods"]
    hashes = sorted((k for k in rows if k.startswith("hash")), key=lambda k: int(k[4:]))
    longest = rows[hashes[-1]]["query_ms"]
    out = ["| method | Rank-1 (%) | Rank-5 (%) | Rank-10 (%) | mAP (%) | ms / query | speed-up vs longest code |",
           "|---|---|---|---|---|---|---|"]
    for name in ["float", *hashes, "ctf"]:
        if name not in rows:
            continue
        r = rows[name]
        label = {"float": "float (Euclidean)", "ctf": "CtF (DTO, beta = 2)"}.get(name, f"{name[4:]}-bit")
        out.append(f"| {label} | {pct(r['rank1'])} | {pct(r['rank5'])} | {pct(r['rank10'])} | {pct(r['mAP'])} "
                   f"| {r['query_ms']:.3f} | {longest / r['query_ms']:.1f}x |")
    return out


def main(root: str) -> None:
    root_path = Path(root)
    results = {run: json.loads((root_path / run / "results.json").read_text())
               for run in RUNS if (root_path / run / "results.json").is_file()}
    if "aio_cp_sd" in results:
        r = results["aio_cp_sd"]
        print("### Table 4 layout: full AiO (pyramid + self-distillation)\n")
        print("\n".join(table4(r)))
        th = ", ".join(f"{k}-bit <= {v}" for k, v in r["ctf_thresholds"].items())
        cand = r["methods"]["ctf"].get("candidates", {})
        print(f"\nCtF thresholds (DTO on the validation identities): {th}.")
        if cand:
            print("Mean candidates per probe after each stage: "
                  + ", ".join(f"{k}-bit {v:.0f}" for k, v in cand.items()) + ".")
        print(f"Skipped queries (no valid match): {r['skipped_queries']}.\n")
    print("### Table 5 layout: ablation of the code pyramid (CP) and self-distillation (SD)\n")
    lengths = None
    for r in results.values():
        lengths = sorted(int(k[4:]) for k in r["methods"] if k.startswith("hash"))
        break
    head = " | ".join(f"{L}" for L in lengths or []) + " | CtF"
    print(f"| CP | SD | Rank-1 (%): {head} | mAP (%): {head} | CtF ms / query |")
    print("|---|---|" + "---|" * (2 * (len(lengths or []) + 1) + 1))
    marks = {"aio_none": ("no", "no"), "aio_cp": ("yes", "no"), "aio_cp_sd": ("yes", "yes")}
    for run in ["aio_none", "aio_cp", "aio_cp_sd"]:
        if run not in results:
            continue
        m = results[run]["methods"]
        r1 = " | ".join(pct(m[f"hash{L}"]["rank1"]) for L in lengths) + " | " + pct(m["ctf"]["rank1"])
        ap = " | ".join(pct(m[f"hash{L}"]["mAP"]) for L in lengths) + " | " + pct(m["ctf"]["mAP"])
        cp, sd = marks[run]
        print(f"| {cp} | {sd} | {r1} | {ap} | {m['ctf']['query_ms']:.3f} |")
    if "aio_cp_sd" in results and "float" in results["aio_cp_sd"]["methods"]:
        f = results["aio_cp_sd"]["methods"]["float"]
        print(f"\nReal-valued upper bound (float features of the full AiO): Rank-1 {pct(f['rank1'])}, mAP {pct(f['mAP'])}.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cuhk03")
