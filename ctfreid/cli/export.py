"""``ctfreid export``: a trained run -> an ONNX encoder that encodes without torch (onnxruntime)."""

from __future__ import annotations

import argparse

from ctfreid.cli._args import output_file, positive_int

HELP = "export a trained run to an ONNX encoder (onnxruntime, no torch) and check it"
DESCRIPTION = """Write the AiO encoder of a run directory (Sec. 3.2: bn(v_k) of every code length; codes are
their signs, Eq. 2) as an ONNX file with a dynamic batch axis and the run's fingerprint, code lengths,
input size, normalisation, flip test and DTO thresholds in its metadata. Indexes built with the run accept
the export ('--model encoder.onnx'). --flip puts the flip test (mean of bn(v_k) of an image and its mirror)
in the graph. --check compares the export with the torch model on real (--images) or generated images:
the share of equal bits per code length (>= 99.9 % needed), the largest feature difference, and whether
batch 1 and batch 32 give the same outputs; the exit status is 1 when a check fails.

examples:
  ctfreid export --model runs/aio --out encoder.onnx
  ctfreid export --model runs/aio --out encoder_flip.onnx --flip --check --images market1501/query"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory of 'ctfreid train' (or its model.pt)")
    parser.add_argument("--out", required=True, type=output_file, metavar="FILE.onnx", help="ONNX file (written atomically)")
    parser.add_argument("--flip", action="store_true", help="put the flip test in the graph (2x the encoding time)")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset, 18..23 (default 18)")
    parser.add_argument("--check", action="store_true", help="compare the export with the torch model (exit 1 on failure)")
    parser.add_argument("--images", metavar="DIR", help="--check on the images in DIR (default: 64 generated images)")
    parser.add_argument("--max-images", type=positive_int, default=256, help="--check on at most this many images (default 256)")


def run(args: argparse.Namespace) -> int:
    from ctfreid.infer.export import DEFAULT_OPSET, check_export, export_run

    meta = export_run(args.model, args.out, flip=args.flip, opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {args.out}: {meta['backbone']}, codes {meta['lengths']}, input {meta['height']}x{meta['width']}, "
          f"flip test {'in the graph' if meta['flip'] else 'off'}, fingerprint {meta['fingerprint']}, "
          f"thresholds {meta['thresholds'] or 'none'}")
    if not args.check:
        return 0
    images = None
    if args.images:
        from ctfreid.data.datasets import read_image
        from ctfreid.infer.gallery import folder_records

        images = [read_image(path) for path, _, _ in folder_records(args.images)[: args.max_images]]
    report = check_export(args.model, args.out, images=images)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
