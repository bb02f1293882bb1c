"""``ctfreid search``: query a CtF image index with person crops."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "search an index with query images"
DESCRIPTION = """Encode the query images with the model that built the index and print each query's top-k
gallery images by coarse-to-fine search (Sec. 3.1): rank, Hamming distance at the finest stage the item
reached, the code length of that stage, the person id when known (-1 = unknown) and the image path. The
index refuses a model other than the one that built it (different weights or code lengths).

IMAGE may be an image file or a folder of images. Query pids are read from Market-1501 style names
(0002_c1s1_000451_03.jpg) when they parse; --show then marks right / wrong identities.

examples:
  ctfreid search --index gallery.ctf --model runs/aio query.jpg --k 10
  ctfreid search --index gallery.ctf --model runs/aio queries/ --json > results.json
  ctfreid search --index gallery.ctf --model runs/aio q1.jpg q2.jpg --show ranked.png"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders of images")
    parser.add_argument("--index", required=True, metavar="INDEX", help="index file of 'ctfreid index build'")
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="the run directory that built the index")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--show", metavar="OUT.png", help="also draw the ranked lists into this picture")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoding batch (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def query_records(items: list[str]) -> list[tuple[str, int, int]]:
    """Records of the query arguments: files as given, folders expanded (sorted)."""
    from ctfreid.commands.index import folder_records
    from ctfreid.datasets import parse_name

    records = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            records += folder_records(p, label="query folder")
        elif p.is_file():
            parsed = parse_name(p.name)
            pid, camid = parsed if parsed is not None else (-1, -1)
            records.append((str(p.resolve()), pid, camid))
        else:
            raise FileNotFoundError(f"query image {item} does not exist")
    return records


def _stored_codes(index, length: int):
    # ids are positions (index build uses default ids).
    return index.codes(length)


def finest_stages(index, query_codes: dict, ids, thresholds: dict):
    """Code length of the finest CtF stage each returned id reached (stage k+1 is reached iff the item
    passed every threshold of stages 1..k, Sec. 3.1); -1 for padding."""
    import numpy as np

    from ctfreid.hamming import hamming_distances

    lengths = sorted(query_codes)
    ids = np.asarray(ids)
    stage = np.full(ids.shape, -1, dtype=np.int64)
    for i in range(ids.shape[0]):
        valid = ids[i] >= 0
        sel = ids[i][valid]
        reached = np.full(len(sel), lengths[0], dtype=np.int64)
        alive = np.ones(len(sel), dtype=bool)
        for a, b in zip(lengths[:-1], lengths[1:]):
            g = _stored_codes(index, a)[sel]
            d = hamming_distances(query_codes[a][i], g).reshape(-1)
            alive &= d <= thresholds[a]
            reached[alive] = b
        stage[i][valid] = reached
    return stage


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctfreid.commands.index import check_model, encode_kwargs, index_flip, load_index, model_fingerprint
    from ctfreid.encode import encode_records, load_model

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    index = load_index(args.index)
    records = query_records(args.images)
    model, info = load_model(args.model, device=args.device)
    check_model(index, args.index, model_fingerprint(model, info), info)
    # Queries are encoded as the index's images were (flip test or not).
    kw = encode_kwargs(info, args.batch_size, args.device, progress=False, flip=index_flip(index))
    enc = encode_records(model, records, **kw)
    D, I = index.search(enc.codes, args.k)
    thresholds = {int(k): int(v) for k, v in index.thresholds.items()}
    S = finest_stages(index, enc.codes, I, thresholds) if thresholds else np.where(I >= 0, max(enc.codes), -1)
    meta = index.metadata
    paths, pids = meta["paths"], meta["pids"]
    out = []
    for qi, (qpath, qpid, _) in enumerate(records):
        hits = [{"rank": r + 1, "id": int(j), "distance": int(D[qi, r]), "stage_bits": int(S[qi, r]),
                 "pid": int(pids[j]), "path": paths[j]}
                for r, j in enumerate(I[qi]) if j >= 0]
        out.append({"query": qpath, "pid": int(qpid), "results": hits})
    if args.json:
        print(json.dumps({"index": str(args.index), "k": args.k, "queries": out}, indent=2))
    else:
        for q in out:
            who = f" (pid {q['pid']})" if q["pid"] >= 0 else ""
            print(f"query {q['query']}{who}")
            print(f"  {'rank':>4}  {'distance':>8}  {'bits':>4}  {'pid':>5}  path")
            for h in q["results"]:
                pid = str(h["pid"]) if h["pid"] >= 0 else "?"
                print(f"  {h['rank']:>4}  {h['distance']:>8}  {h['stage_bits']:>4}  {pid:>5}  {h['path']}")
    if args.show:
        from ctfreid.report import plot_ranked_lists

        plot_ranked_lists(args.show, [r[0] for r in records], [r[1] for r in records], [r[2] for r in records],
                          paths, np.asarray(pids), np.asarray(meta["camids"]), I, D, k=args.k,
                          title=f"ctfreid search in {Path(args.index).name} (top-{args.k})",
                          distance_note="d = Hamming distance at the finest CtF stage reached",
                          protocol=False, stages=S)
        if not args.json:
            print(f"ranked lists drawn in {args.show}")
    return 0
