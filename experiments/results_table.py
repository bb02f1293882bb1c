"""Assemble the Markdown tables of docs/results-cuhk03.md from the JSON files written by experiments/cuhk03.sh.

    python3 experiments/results_table.py RUNS_DIR > results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {
    "aio_all": "pyramid + self-distillation, trained on all training identities (thresholds from aio_cp_sd)",
    "aio_cp_sd": "pyramid + self-distillation (full AiO)",
    "aio_cp": "pyramid, no self-distillation",
    "aio_none": "no pyramid (independent heads), no self-distillation",
    "aio_sep32": "a separate model with the 32-bit code only (the paper's 'no CP': separate models)",
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table4(result: dict) -> list[str]:
    rows = result["methods"]
    hashes = sorted((k for k in rows if k.startswith("hash")), key=lambda k: int(k[4:]))
    longest = rows[hashes[-1]]
    k = result.get("search_k")
    head = "| method | Rank-1 (%) | Rank-5 (%) | Rank-10 (%) | mAP (%) | full ranking ms / query | speed-up |"
    if k:
        head += f" top-{k} search ms / query | speed-up |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in ["float", *hashes, "ctf"]:
        if name not in rows:
            continue
        r = rows[name]
        label = {"float": "float (Euclidean)", "ctf": "CtF (DTO, beta = 2)"}.get(name, f"{name[4:]}-bit")
        line = (f"| {label} | {pct(r['rank1'])} | {pct(r['rank5'])} | {pct(r['rank10'])} | {pct(r['mAP'])} "
                f"| {r['query_ms']:.3f} | {longest['query_ms'] / r['query_ms']:.1f}x |")
        if k:
            t = r.get("search_ms")
            line += f" {t:.4f} | {longest['search_ms'] / t:.1f}x |" if t else " - | - |"
        out.append(line)
    return out


def describe_ctf(result: dict, source: str) -> str:
    th = ", ".join(f"{k}-bit <= {v}" for k, v in result["ctf_thresholds"].items())
    cand = result["methods"]["ctf"].get("candidates", {})
    text = f"CtF thresholds (DTO on the validation identities{source}): {th}."
    if cand:
        text += (" Mean candidates per probe after each stage: "
                 + ", ".join(f"{k}-bit {v:.0f}" for k, v in cand.items())
                 + f" (of {result.get('num_gallery', '?')}).")
    return text + f" Skipped queries (no valid match): {result['skipped_queries']}."


def main(root: str) -> None:
    root_path = Path(root)
    results = {run: json.loads((root_path / run / "results.json").read_text())
               for run in RUNS if (root_path / run / "results.json").is_file()}
    for run, source in (("aio_all", " of aio_cp_sd"), ("aio_cp_sd", "")):
        if run in results:
            print(f"### Table 4 layout: {RUNS[run]}\n")
            print("\n".join(table4(results[run])))
            print("\n" + describe_ctf(results[run], source) + "\n")
    ablation = [run for run in ("aio_sep32", "aio_none", "aio_cp", "aio_cp_sd") if run in results]
    if not ablation:
        return
    print("### Table 5 layout: ablation of the code pyramid (CP) and self-distillation (SD)\n")
    lengths = sorted({int(k[4:]) for run in ablation for k in results[run]["methods"] if k.startswith("hash")})
    head = " | ".join(f"{L}" for L in lengths) + " | CtF"
    print(f"| CP | SD | Rank-1 (%): {head} | mAP (%): {head} | CtF ms / query |")
    print("|---|---|" + "---|" * (2 * (len(lengths) + 1) + 1))
    marks = {"aio_sep32": ("no (separate 32-bit model)", "no"), "aio_none": ("no (independent heads)", "no"),
             "aio_cp": ("yes", "no"), "aio_cp_sd": ("yes", "yes")}
    for run in ablation:
        m = results[run]["methods"]
        multi = sum(k.startswith("hash") for k in m) > 1  # a one-code model has no CtF

        def cells(metric: str) -> str:
            row = [pct(m[f"hash{L}"][metric]) if f"hash{L}" in m else "-" for L in lengths]
            return " | ".join(row + [pct(m["ctf"][metric]) if multi and "ctf" in m else "-"])

        ms = f"{m['ctf']['query_ms']:.3f}" if multi and "ctf" in m else "-"
        cp, sd = marks[run]
        print(f"| {cp} | {sd} | {cells('rank1')} | {cells('mAP')} | {ms} |")
    if "aio_cp_sd" in results and "float" in results["aio_cp_sd"]["methods"]:
        f = results["aio_cp_sd"]["methods"]["float"]
        print(f"\nReal-valued upper bound (float features of the full AiO): Rank-1 {pct(f['rank1'])}, mAP {pct(f['mAP'])}.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cuhk03")
