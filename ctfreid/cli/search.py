"""``ctfreid search``: query a CtF image index with person crops."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctfreid.cli._args import output_file, positive_int

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
    parser.add_argument("--model", required=True, metavar="RUN_DIR|ENCODER.onnx",
                        help="the run directory that built the index, or its ONNX export")
    parser.add_argument("--k", type=positive_int, default=10, help="results per query (default 10; at most the images indexed)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--show", type=output_file, metavar="OUT.png", help="also draw the ranked lists into this picture")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per encoding batch (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctfreid.infer.encoder import load_encoder
    from ctfreid.infer.gallery import check_model, index_flip, load_index, query_records, search_images

    index = load_index(args.index)
    records = query_records(args.images)
    # a run directory or its ONNX export; queries are encoded as the index's images were (flip test or not)
    encoder = load_encoder(args.model, device=args.device, flip=index_flip(index))
    check_model(index, args.index, encoder.fingerprint, encoder.info)
    enc = encoder.encode_records(records, batch_size=args.batch_size)
    hits = search_images(index, enc, args.k)  # k is clamped to the number of images
    I, D, S = hits.ids, hits.finest_distances, hits.stage_bits
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
        from ctfreid.eval.report import plot_ranked_lists

        plot_ranked_lists(args.show, [r[0] for r in records], [r[1] for r in records], [r[2] for r in records],
                          paths, np.asarray(pids), np.asarray(meta["camids"]), I, D, k=I.shape[1],
                          title=f"ctfreid search in {Path(args.index).name} (top-{args.k})",
                          distance_note="d = Hamming distance at the finest CtF stage reached",
                          protocol=False, stages=S)
        if not args.json:
            print(f"ranked lists drawn in {args.show}")
    return 0
