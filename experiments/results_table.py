"""Assemble the Markdown tables of docs/results-cuhk03.md from the JSON files written by experiments/cuhk03.sh.

    python3 experiments/results_table.py RUNS_DIR > results.md

RUNS_DIR/aio_all and RUNS_DIR/aio_cp_sd hold the Table 4 runs (``results.json`` plain, ``results_flip.json``
with the flip test); RUNS_DIR/ablation/* the Table 5 runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ctfreid.eval.report import method_key, parse_method

TABLE4 = {
    "aio_all": "the paper's protocol (Sec. 4.2): trained on all 467 training identities, thresholds of aio_cp_sd",
    "aio_cp_sd": "20 % of the training identities held out for DTO",
}
ABLATION = {  # run -> (CP, SD)
    "aio_sep32": ("no (a separate 32-bit model)", "no"),
    "aio_none": ("no (independent heads on v0)", "no"),
    "aio_cp": ("yes", "no"),
    "aio_cp_sd": ("yes", "yes"),
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def hash_names(methods: dict) -> list[str]:
    return sorted((k for k in methods if parse_method(k) is not None), key=parse_method)


def label(name: str, float_label: str = "float") -> str:
    """``float`` / ``hash<L>`` / ``ctf`` -> a table label."""
    return {"float": float_label, "ctf": "CtF"}.get(name, f"{parse_method(name)}-bit")


def table4(result: dict) -> list[str]:
    rows = result["methods"]
    hashes = hash_names(rows)
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
        text = "CtF (DTO, beta = 2)" if name == "ctf" else label(name, "float (Euclidean)")
        line = (f"| {text} | {pct(r['rank1'])} | {pct(r['rank5'])} | {pct(r['rank10'])} | {pct(r['mAP'])} "
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


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def flip_comparison(root: Path) -> list[str]:
    """Rank-1 / mAP without and with the flip test, for each Table 4 run."""
    out = []
    for run in TABLE4:
        plain, flip = load(root / run / "results.json"), load(root / run / "results_flip.json")
        if not (plain and flip):
            continue
        if not out:
            out = ["| run | method | without flip: Rank-1 / mAP (%) | with flip: Rank-1 / mAP (%) |", "|---|---|---|---|"]
        for name in ["float", *hash_names(plain["methods"]), "ctf"]:
            a, b = plain["methods"].get(name), flip["methods"].get(name)
            if a and b:
                out.append(f"| {run} | {label(name)} | {pct(a['rank1'])} / {pct(a['mAP'])} | {pct(b['rank1'])} / {pct(b['mAP'])} |")
    return out


def ablation_table(results: dict[str, dict]) -> list[str]:
    runs = [run for run in ABLATION if run in results]
    lengths = sorted({parse_method(k) for run in runs for k in hash_names(results[run]["methods"])})
    head = " | ".join(f"{L}" for L in lengths) + " | CtF"
    out = [f"| CP | SD | Rank-1 (%): {head} | mAP (%): {head} | CtF ms / query |",
           "|---|---|" + "---|" * (2 * (len(lengths) + 1) + 1)]
    for run in runs:
        m = results[run]["methods"]  # a one-code model has no "ctf" row

        def cells(metric: str) -> str:
            row = [pct(m[k][metric]) if k in m else "-" for k in [*map(method_key, lengths), "ctf"]]
            return " | ".join(row)

        ms = f"{m['ctf']['query_ms']:.3f}" if "ctf" in m else "-"
        cp, sd = ABLATION[run]
        out.append(f"| {cp} | {sd} | {cells('rank1')} | {cells('mAP')} | {ms} |")
    return out


def main(root: str) -> None:
    root_path = Path(root)
    for run, source in (("aio_all", " of aio_cp_sd"), ("aio_cp_sd", "")):
        for suffix, how in (("_flip", "with the flip test"), ("", "without the flip test")):
            result = load(root_path / run / f"results{suffix}.json")
            if result:
                print(f"### Table 4 layout: {run}, {TABLE4[run]}, {how}\n")
                print("\n".join(table4(result)))
                print("\n" + describe_ctf(result, source) + "\n")
    lines = flip_comparison(root_path)
    if lines:
        print("### The flip test\n\n" + "\n".join(lines) + "\n")
    ablation_dir = root_path / "ablation"
    results = {run: r for run in ABLATION if (r := load(ablation_dir / run / "results.json"))}
    if results:
        print("### Table 5 layout: ablation of the code pyramid (CP) and self-distillation (SD)\n")
        print("\n".join(ablation_table(results)))
        f = results.get("aio_cp_sd", {}).get("methods", {}).get("float")
        if f:
            print(f"\nReal-valued upper bound (float features of the full AiO): Rank-1 {pct(f['rank1'])}, "
                  f"mAP {pct(f['mAP'])}.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cuhk03")
