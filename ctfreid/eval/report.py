"""Paper-style reports: the Table-4 layout as JSON / Markdown, and the plots of Figs. 3 and 4 (the terminal
table is ``ctfreid.eval.evaluate.format_table``). Method keys are built and read only by :func:`method_key`
and :func:`parse_method`.

Inputs are the plain dicts of ``ctfreid.eval.evaluate.evaluate_sets``::

    {"methods": {"float" | "hash32" | ... | "ctf": {"rank1", "rank5", "rank10", "mAP", "query_ms"}},
     "ctf_thresholds": {...}, "skipped_queries": n}

(metrics as fractions 0-1). Plots use matplotlib's object API with the Agg canvas (no screen, no pyplot
global state), so they work on a headless machine and inside tests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.errors import CtfreidError

# Columns of the Table-4 layout: key in the row dict, header, format.
COLUMNS = [
    ("label", "Method", "{}"),
    ("rank1", "Rank-1 (%)", "{:.1f}"),
    ("rank5", "Rank-5 (%)", "{:.1f}"),
    ("mAP", "mAP (%)", "{:.1f}"),
    ("query_ms", "ms/query", "{:.3g}"),
    ("speedup", "speed-up", "{:.1f}x"),
]

# Fixed colours / markers so a method looks the same in every figure.
_STYLE = {"float": ("#444444", "s"), "ctf": ("#d62728", "o")}
_HASH_COLOURS = ["#9ecae1", "#6baed6", "#3182bd", "#08519c", "#08306b"]


def method_key(length: int) -> str:
    """The method key of Hamming ranking with the codes of ``length`` bits alone: 32 -> ``"hash32"``."""
    return f"hash{int(length)}"


def parse_method(key: str) -> int | None:
    """The code length of a single-length method key (``"hash32"`` -> 32); None for ``float``, ``ctf``..."""
    if isinstance(key, str) and key.startswith("hash") and key[4:].isdigit():
        return int(key[4:])
    return None


def method_label(method: str) -> str:
    """Human name of a method key: ``float`` -> "float (Euclidean)", ``hash32`` -> "32-bit", ``ctf`` -> "CtF"."""
    if method == "float":
        return "float (Euclidean)"
    if method == "ctf":
        return "CtF (coarse-to-fine)"
    length = parse_method(method)
    return method if length is None else f"{length}-bit"


def _hash_lengths(methods: Mapping[str, object]) -> list[int]:
    return sorted(L for L in map(parse_method, methods) if L is not None)


def _check_results(results: Mapping) -> Mapping[str, Mapping[str, float]]:
    methods = results.get("methods") if isinstance(results, Mapping) else None
    if not isinstance(methods, Mapping) or not methods:
        raise CtfreidError("results must be a dict with a non-empty 'methods' dict (the output of evaluate_sets)")
    for name, m in methods.items():
        missing = {"rank1", "rank5", "mAP", "query_ms"} - set(m)
        if missing:
            raise CtfreidError(f"results['methods'][{name!r}] lacks {sorted(missing)}")
    return methods


def _method_order(methods: Mapping[str, object]) -> list[str]:
    hashes = [method_key(L) for L in _hash_lengths(methods)]
    rest = [m for m in methods if m not in hashes and m not in ("float", "ctf")]
    return [m for m in ["float", *hashes, *rest, "ctf"] if m in methods]


def table_rows(results: Mapping) -> list[dict]:
    """The Table-4 rows: method, Rank-1/5 and mAP in percent, ms per query and the speed-up over the
    longest code (its ``query_ms`` divided by the method's), in the order float, short -> long codes, CtF.
    """
    methods = _check_results(results)
    lengths = _hash_lengths(methods)
    ref_ms = float(methods[method_key(lengths[-1])]["query_ms"]) if lengths else None
    rows = []
    for name in _method_order(methods):
        m = methods[name]
        ms = float(m["query_ms"])
        rows.append({
            "method": name,
            "label": method_label(name),
            "rank1": 100.0 * float(m["rank1"]),
            "rank5": 100.0 * float(m["rank5"]),
            "mAP": 100.0 * float(m["mAP"]),
            "query_ms": ms,
            "speedup": (ref_ms / ms) if ref_ms is not None and ms > 0 else None,
        })
    return rows


def _cells(row: Mapping) -> list[str]:
    return ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]


def _speedup_header(results: Mapping) -> str:
    lengths = _hash_lengths(_check_results(results))
    return f"speed-up vs {lengths[-1]}-bit" if lengths else "speed-up"


def format_markdown(results: Mapping) -> str:
    """The Table-4 layout as a Markdown table (one line per method)."""
    rows = table_rows(results)
    headers = [h for _, h, _ in COLUMNS[:-1]] + [_speedup_header(results)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_tables(results: Mapping, out_dir: str | os.PathLike, stem: str = "results",
                 extra: Mapping | None = None, title: str = "Table 4 layout",
                 notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``OUT/<stem>.json`` (``{"table": rows, "evaluation": results, **extra}``) and
    ``OUT/<stem>.md`` (the Markdown table, CtF thresholds, skipped queries and ``notes``). Returns both paths."""
    out_dir = Path(out_dir)
    rows = table_rows(results)
    doc = {"table": rows, "evaluation": results, **(extra or {})}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    with atomic_write(json_path, "w") as f:
        json.dump(_jsonable(doc), f, indent=2)
        f.write("\n")
    md = [f"# {title}", "", format_markdown(results)]
    auto = []
    if results.get("ctf_thresholds"):
        th = ", ".join(f"t{k}={v}" for k, v in results["ctf_thresholds"].items())
        auto.append(f"CtF thresholds: {th}.")
    if results.get("skipped_queries"):
        auto.append(f"{results['skipped_queries']} queries without a valid match were skipped (Market-1501 protocol).")
    lengths = _hash_lengths(results["methods"])
    if lengths:
        auto.append(f"Speed-up = ms/query of the {lengths[-1]}-bit code alone / ms/query of the method; "
                    "ms/query = distance computation + sorting for one probe (Sec. 4.1).")
    md += [f"- {note}" for note in [*auto, *notes]]
    with atomic_write(md_path, "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return json_path, md_path


# ---------------------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    return path


def _style(method: str, lengths: Sequence[int]) -> dict:
    if method in _STYLE:
        colour, marker = _STYLE[method]
    else:
        L = parse_method(method)
        i = lengths.index(L) if L in lengths else 0
        colour = _HASH_COLOURS[min(len(_HASH_COLOURS) - 1, i + max(0, len(_HASH_COLOURS) - len(lengths)))]
        marker = "^v<>dph"[i % 7]
    return {"color": colour, "marker": marker, "label": method_label(method)}


def plot_beta_sweep(rows: Sequence[Mapping], path: str | os.PathLike, reference: Mapping | None = None,
                    beta: float | None = None, title: str = "DTO: accuracy and speed of CtF against β") -> Path:
    """Fig. 4: Rank-1 and mAP (left) and ms per query (right) of CtF against the DTO parameter β (log x).

    ``rows``: dicts with ``beta``, ``rank1``, ``mAP`` (fractions) and ``query_ms``. ``reference``: an
    ``evaluate_sets`` methods entry (e.g. the longest code alone) drawn as dashed lines; ``beta``: the β
    in use, marked with a dotted vertical line.
    """
    if not rows:
        raise CtfreidError("beta sweep rows are empty: expected dicts with beta, rank1, mAP, query_ms")
    rows = sorted(rows, key=lambda r: float(r["beta"]))
    b = np.array([float(r["beta"]) for r in rows])
    if np.any(b <= 0):
        raise CtfreidError(f"beta values must be > 0 for a log axis, got {b.tolist()}")
    fig = _figure(10, 4)
    ax_acc, ax_t = fig.subplots(1, 2)
    ax_acc.plot(b, [100 * r["rank1"] for r in rows], "o-", color="#1f77b4", label="CtF Rank-1")
    ax_acc.plot(b, [100 * r["mAP"] for r in rows], "s-", color="#ff7f0e", label="CtF mAP")
    ax_t.plot(b, [r["query_ms"] for r in rows], "o-", color="#d62728", label="CtF")
    if reference:
        name = reference.get("label", "longest code alone")
        ax_acc.axhline(100 * reference["rank1"], color="#1f77b4", ls="--", lw=1, label=f"{name} Rank-1")
        ax_acc.axhline(100 * reference["mAP"], color="#ff7f0e", ls="--", lw=1, label=f"{name} mAP")
        ax_t.axhline(reference["query_ms"], color="#08306b", ls="--", lw=1, label=name)
    for ax in (ax_acc, ax_t):
        ax.set_xscale("log")
        ax.set_xlabel("β (DTO recall weight, Eq. 8), log scale")
        ax.grid(True, which="both", alpha=0.3)
        if beta is not None:
            ax.axvline(beta, color="gray", ls=":", lw=1.2, label=f"β in use = {beta:g}")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy")
    ax_t.set_ylabel("query time (ms per probe)")
    ax_t.set_ylim(bottom=0)
    ax_t.set_title("Speed")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_t.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def _count(n: int) -> str:
    """1196 -> '1.2k', 11964 -> '12k', 500000 -> '500k', 1200000 -> '1.2M'."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            x = n / div
            return f"{x:.1f}{unit}" if x < 10 else f"{x:.0f}{unit}"
    return str(n)


def plot_gallery_size(rows: Sequence[Mapping], path: str | os.PathLike,
                      methods: Sequence[str] | None = None,
                      title: str = "Accuracy and speed against gallery size (added distractors)",
                      note: str | None = None) -> Path:
    """Fig. 3: Rank-1, mAP and ms per query against the gallery size, for float, the shortest and longest
    codes and CtF (by default).

    ``rows``: dicts ``{"gallery_size": n, "methods": {name: {"rank1", "mAP", "query_ms"}}}``, one per size.
    """
    if not rows:
        raise CtfreidError("gallery-size rows are empty: expected dicts with gallery_size and methods")
    from matplotlib.ticker import NullFormatter

    rows = sorted(rows, key=lambda r: int(r["gallery_size"]))
    present = rows[0]["methods"]
    lengths = _hash_lengths(present)
    if methods is None:
        wanted = ["float"] + [method_key(L) for L in sorted({lengths[0], lengths[-1]})] if lengths else ["float"]
        methods = [m for m in [*wanted, "ctf"] if m in present]
    sizes = np.array([int(r["gallery_size"]) for r in rows])
    fig = _figure(13, 4.2)
    axes = fig.subplots(1, 3)
    panels = [("rank1", "Rank-1 (%)", 100.0), ("mAP", "mAP (%)", 100.0), ("query_ms", "query time (ms per probe)", 1.0)]
    for ax, (key, ylabel, scale) in zip(axes, panels):
        for m in methods:
            ys = [scale * float(r["methods"][m][key]) if m in r["methods"] else np.nan for r in rows]
            ax.plot(sizes, ys, "-", ms=6, **_style(m, lengths))
        ax.set_xscale("log")
        ax.set_xticks(sizes, [_count(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide with the sizes
        ax.set_xlabel("gallery size (images), log scale")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(ylabel.split(" (")[0].capitalize() if key == "query_ms" else ylabel.split(" (")[0])
    axes[2].set_yscale("log")
    axes[2].set_title("Speed")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    return _save(fig, path)


def _thumbnail(path, size: tuple[int, int], border: str | None, width: int) -> np.ndarray:
    """An RGB uint8 image of ``size`` (w, h) with a coloured border; a grey placeholder if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            img = im.convert("RGB").resize(size, Image.BILINEAR)
    except (OSError, ValueError, TypeError, AttributeError):
        img = Image.new("RGB", size, (200, 200, 200))
    if border:
        img = ImageOps.expand(img.resize((size[0] - 2 * width, size[1] - 2 * width), Image.BILINEAR),
                              border=width, fill=border)
    return np.asarray(img)


RIGHT, WRONG, QUERY, UNKNOWN = "#1a9850", "#d73027", "#2166ac", "#9e9e9e"


def ranked_list_items(ranking: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray,
                      g_camids: np.ndarray, k: int = 10, protocol: bool = True) -> list[tuple[int, bool | None]]:
    """The first ``k`` gallery indices of ``ranking`` with whether each is the right identity.

    ``protocol=True`` (evaluation): as in ``ctfreid.eval.metrics``, junk (pid -1) and same-identity-same-camera
    items are removed and distractors (pid 0) stay as wrong answers. ``protocol=False`` (searching images
    of unknown identity): nothing is removed; right/wrong is ``None`` (unknown) unless both pids are known
    (> 0 for the query, >= 0 for the item). Padding (-1) is skipped in both cases.
    """
    ranking = np.asarray(ranking)
    ranking = ranking[ranking >= 0]
    g_pids = np.asarray(g_pids)
    if protocol:
        p, c = g_pids[ranking], np.asarray(g_camids)[ranking]
        keep = (p != -1) & ~((p == q_pid) & (c == q_camid))
        return [(int(i), bool(g_pids[i] == q_pid)) for i in ranking[keep][:k]]
    known = lambda i: q_pid > 0 and g_pids[i] >= 0  # noqa: E731
    return [(int(i), bool(g_pids[i] == q_pid) if known(i) else None) for i in ranking[:k]]


def plot_ranked_lists(path: str | os.PathLike, query_paths: Sequence, query_pids: Sequence[int],
                      query_camids: Sequence[int], gallery_paths: Sequence, gallery_pids: np.ndarray,
                      gallery_camids: np.ndarray, rankings: np.ndarray, distances: np.ndarray | None = None,
                      k: int = 10, title: str = "CtF ranked lists", thumb: tuple[int, int] = (64, 128),
                      distance_note: str = "d = Hamming distance at the finest CtF stage reached",
                      protocol: bool = True, stages: np.ndarray | None = None) -> Path:
    """Ranked lists: one row per query: the query image (blue border), then its top-``k`` gallery images
    with green borders for the right identity, red for a wrong one (grey: identity unknown).

    ``rankings[i]`` is query i's ranking (gallery indices, best first; full or long enough to survive
    the filtering), ``distances[i, j]`` the distance of ``rankings[i, j]`` and ``stages[i, j]`` the code
    length it was measured with (both optional, shown under each image). With ``protocol`` (evaluation),
    junk and same-camera matches are left out as in the Market-1501 protocol (``ranked_list_items``).
    """
    nq = len(query_paths)
    if nq == 0:
        raise CtfreidError("no queries to draw")
    rankings = np.asarray(rankings)
    if rankings.ndim != 2 or rankings.shape[0] != nq:
        raise CtfreidError(f"rankings must be [n_queries={nq}, m], got shape {rankings.shape}")
    gallery_pids, gallery_camids = np.asarray(gallery_pids), np.asarray(gallery_camids)
    w, h = thumb
    fig = _figure(1.05 * (k + 1) + 0.3, 2.15 * nq + 1.0)
    axes = np.asarray(fig.subplots(nq, k + 1, squeeze=False))
    bw = max(2, w // 16)
    name = lambda pid: "distractor" if pid == 0 else ("pid ?" if pid < 0 else f"pid {pid}")  # noqa: E731
    for i in range(nq):
        qp, qc = int(query_pids[i]), int(query_camids[i])
        ax = axes[i, 0]
        ax.imshow(_thumbnail(query_paths[i], (w, h), QUERY, bw))
        cam = f" cam {qc + 1}" if qc >= 0 else ""
        ax.set_title(f"query\n{name(qp)}{cam}", fontsize=8, color=QUERY, fontweight="bold")
        pos = {int(g): j for j, g in enumerate(rankings[i])}
        items = ranked_list_items(rankings[i], qp, qc, gallery_pids, gallery_camids, k, protocol)
        for r, (g, right) in enumerate(items):
            colour = UNKNOWN if right is None else (RIGHT if right else WRONG)
            ax = axes[i, r + 1]
            ax.imshow(_thumbnail(gallery_paths[g], (w, h), colour, bw))
            d = "" if distances is None else f"\nd={int(np.asarray(distances)[i, pos[g]])}"
            if stages is not None and d:
                d += f" @{int(np.asarray(stages)[i, pos[g]])}b"
            ax.set_title(f"#{r + 1} {name(int(gallery_pids[g]))}{d}", fontsize=7, color=colour)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    legend = "blue = query, green = right identity, red = wrong identity"
    legend += (" (junk and same-camera matches left out, as in the Market-1501 protocol)" if protocol
               else ", grey = identity unknown")
    note = distance_note if distances is not None and distance_note else ""
    if note and stages is not None:
        note += " (@ = code length of that stage, in bits)"
    fig.suptitle(f"{title}\n{legend}" + (f"\n{note}" if note else ""), fontsize=10)
    return _save(fig, path)
