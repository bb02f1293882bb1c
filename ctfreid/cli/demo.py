"""``ctfreid demo``: the whole pipeline on a fresh machine (see ``ctfreid.demo``)."""

from __future__ import annotations

import argparse

from ctfreid.cli._args import positive_float, positive_int

HELP = "synthetic data -> train -> thresholds -> CtF index -> evaluate -> tables and plots"
DESCRIPTION = """Run the paper's pipeline end to end on the CPU, with no data, GPU or pretrained weights needed:
generate a synthetic person re-identification dataset (Market-1501 layout), train a small All-in-One
model with codes of 32/128/512/2048 bits (Sec. 3.2), fit the coarse-to-fine thresholds on a validation
split of the training identities (Sec. 4.2: the fastest within 0.5 mAP and Rank-1 points of the longest
code, as 'ctfreid calibrate' does by default; --beta B for the paper's DTO, Sec. 3.3), build a CtF index of the gallery, and
evaluate float features, each code length and CtF (the layout of the paper's Table 4). About 5-10
minutes on 2 CPU cores.

OUT receives: results.md / results.json (the table), beta_sweep.png (accuracy and query time against
beta, Fig. 4), gallery_size.png (against gallery size with added distractors, Fig. 3), ranked_lists.png,
gallery.ctf (the index: try 'ctfreid search --index OUT/gallery.ctf --model OUT/run OUT/data/query/...'),
thresholds.json, data/ and run/. Running it again reuses the data and the finished training run.

--data DIR runs the same on a real dataset in Market-1501 layout; --model RUN_DIR skips training.

examples:
  ctfreid demo                                        # synthetic data, writes ctfreid-demo/
  ctfreid demo --out /tmp/demo --ids 100 --epochs 10  # quicker, less accurate
  ctfreid demo --data market1501/ --model runs/aio --out market-demo/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctfreid.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", default=d.out, metavar="DIR", help=f"output folder (default {d.out}/)")
    parser.add_argument("--data", metavar="DIR", help="a dataset in Market-1501 layout instead of synthetic data")
    parser.add_argument("--model", metavar="RUN_DIR|ENCODER.onnx",
                        help="a trained run directory, or its ONNX export: skip training")
    parser.add_argument("--weights", metavar="PATH",
                        help="backbone weights (torchvision key names) to start from instead of random init")
    parser.add_argument("--ids", type=positive_int, default=d.ids,
                        help=f"synthetic identities, half for training (default {d.ids})")
    parser.add_argument("--cams", type=positive_int, default=d.cams, help=f"synthetic cameras (default {d.cams})")
    parser.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--backbone", default=d.backbone, choices=("resnet18", "mobilenet_v2", "resnet50"),
                        help=f"backbone (default {d.backbone})")
    parser.add_argument("--height", type=positive_int, default=d.height, help=f"input height (default {d.height})")
    parser.add_argument("--width", type=positive_int, default=d.width, help=f"input width (default {d.width})")
    parser.add_argument("--beta", type=positive_float, default=None,
                        help="thresholds by the paper's DTO with this beta (e.g. 2) instead of the accuracy target "
                        "(tolerance 0.5 points, the default)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of data, split and training (default {d.seed})")
    parser.add_argument("--device", default=d.device, help=f"cpu, cuda or auto (default {d.device})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctfreid.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, data=args.data, model=args.model, weights=args.weights, ids=args.ids,
                     cams=args.cams, epochs=args.epochs, backbone=args.backbone, height=args.height,
                     width=args.width, beta=args.beta, seed=args.seed, device=args.device, progress=not args.quiet)
    summary = run_demo(cfg)
    p = summary["paths"]
    print()
    print(summary["table"])
    print(f"finished in {summary['timings']['total_s']:.0f} s. Outputs in {cfg.out}/:")
    for key in ("results_md", "results_json", "beta_sweep", "gallery_size", "ranked_lists", "index", "run_dir"):
        if key in p:
            print(f"  {p[key]}")
    queries = sorted(Path(summary["query_paths"]).iterdir()) if summary.get("query_paths") else []
    example = str(queries[0]) if queries else "QUERY.jpg"
    print(f"try: ctfreid search --index {p['index']} --model {p['run_dir']} {example} --k 10 --show ranked.png")
    return 0
