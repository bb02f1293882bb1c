"""``ctfreid synth``: write a synthetic ReID dataset in Market-1501 layout."""

from __future__ import annotations

import argparse

from ctfreid.cli._args import positive_int, seed

HELP = "generate a synthetic ReID dataset in Market-1501 layout"
DESCRIPTION = """Generate a deterministic synthetic person re-identification dataset (NumPy + Pillow only) in
Market-1501 layout: bounding_box_train/ (training identities), query/ (one image per test identity per
camera) and bounding_box_test/ (the other test images, distractors with pid 0000 and a few junk crops
with pid -1), names like 0002_c1s1_000451_00.jpg. People have identity-specific clothing colours and
patterns, build, hair, bags and caps (some identities are look-alikes); cameras change background,
lighting, colour cast, blur, resolution, framing and viewpoint. The same seed gives the same files.
Any command that takes --data DIR reads the result.

example:
  ctfreid synth --out data/synth --ids 300 --cams 4 --seed 0
  ctfreid train --data data/synth --out runs/synth"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--ids", type=positive_int, default=200,
                        help="identities in all; half train, half test (default 200)")
    parser.add_argument("--cams", type=positive_int, default=4, help="cameras, 2 to 9 (default 4)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    parser.add_argument("--images-per-id", type=positive_int, default=8,
                        help="images of each identity over its cameras, >= 4 (default 8)")
    parser.add_argument("--height", type=positive_int, default=128, help="image height in pixels (default 128)")
    parser.add_argument("--width", type=positive_int, default=64, help="image width in pixels (default 64)")
    parser.add_argument("--distractors", type=int, default=-1,
                        help="pid-0 distractor images in the gallery (default -1: one per test identity)")
    parser.add_argument("--junk", type=int, default=-1,
                        help="pid -1 junk images in the gallery (default -1: one per ten test identities)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run(args: argparse.Namespace) -> int:
    import time

    from ctfreid.data.synth import generate_synthetic

    start = time.perf_counter()
    data = generate_synthetic(
        args.out, ids=args.ids, cams=args.cams, seed=args.seed, overwrite=args.overwrite, progress=True,
        images_per_id=args.images_per_id, height=args.height, width=args.width,
        distractors=args.distractors, junk=args.junk,
    )
    seconds = time.perf_counter() - start
    n = len(data.train) + len(data.query) + len(data.gallery)
    print(data.summary())
    print(f"wrote {n} images to {args.out} in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} images/s); "
          f"parameters in {args.out}/README.txt")
    return 0
