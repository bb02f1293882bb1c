"""``ctfreid export``: a trained run -> an ONNX encoder that encodes without torch (onnxruntime)."""

from __future__ import annotations

import argparse

from ctfreid.cli._args import output_file, positive_int
from ctfreid.errors import CtfreidError

HELP = "export a trained run to an ONNX encoder (onnxruntime, no torch) and check it"
DESCRIPTION = """Write the AiO encoder of a run directory (Sec. 3.2: bn(v_k) of every code length; codes are
their signs, Eq. 2) as an ONNX file with a dynamic batch axis and the run's fingerprint, code lengths,
input size, normalisation, flip test and DTO thresholds in its metadata. Indexes built with the run accept
the export ('--model encoder.onnx'). --flip puts the flip test (mean of bn(v_k) of an image and its mirror)
in the graph. --check compares the export with the torch model on real (--images) or generated images:
the share of equal bits per code length (>= 99.9 % needed), the largest feature difference, and whether
batch 1 and batch 32 give the same outputs; the exit status is 1 when a check fails.
--int8 writes an int8 encoder instead (static quantisation of the backbone in onnxruntime's QDQ format;
activation ranges calibrated on --calibration images, by default 256 of the run's training images); it
is faster on CPUs with int8 dot products (VNNI: 1.4-2.4x float32 there), as fast as float32 without them;
its bits differ from the float encoder's in about 4-5 % (CUHK03: 0.3 points of mAP); --check reports it
and needs 93 % agreement.

examples:
  ctfreid export --model runs/aio --out encoder.onnx
  ctfreid export --model runs/aio --out encoder_flip.onnx --flip --check --images market1501/query
  ctfreid export --model runs/aio --out encoder.int8.onnx --int8 --check"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory of 'ctfreid train' (or its model.pt)")
    parser.add_argument("--out", required=True, type=output_file, metavar="FILE.onnx", help="ONNX file (written atomically)")
    parser.add_argument("--flip", action="store_true", help="put the flip test in the graph (2x the encoding time)")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset, 18..23 (default 18)")
    parser.add_argument("--check", action="store_true", help="compare the export with the torch model (exit 1 on failure)")
    parser.add_argument("--images", metavar="DIR", help="--check on the images in DIR (default: 64 generated images)")
    parser.add_argument("--max-images", type=positive_int, default=256, help="--check on at most this many images (default 256)")
    parser.add_argument("--int8", action="store_true", help="write an int8 encoder (static quantisation, calibrated)")
    parser.add_argument("--calibration", metavar="DIR",
                        help="--int8: calibrate on up to --max-images images of DIR (default: the run's training images)")


# Share of bits an int8 encoder must keep: 95-96 % on the CUHK03 model (CtF mAP -0.3 points); quantising
# the stem too gave 83-87 % (and the code heads as well, -5.9 points; docs/results-cuhk03.md).
INT8_AGREEMENT = 0.93


def export_int8(args: argparse.Namespace) -> dict:
    """The float export in a temporary folder, then its static int8 quantisation into ``--out``."""
    import tempfile

    import numpy as np

    from ctfreid.data.datasets import read_image, split_records
    from ctfreid.infer.export import DEFAULT_OPSET, export_run
    from ctfreid.infer.gallery import folder_records
    from ctfreid.infer.quantize import quantize_onnx

    with tempfile.TemporaryDirectory(prefix="ctfreid-export-") as tmp:
        float_path = f"{tmp}/float.onnx"
        meta = export_run(args.model, float_path, flip=args.flip, opset=args.opset or DEFAULT_OPSET)
        if args.calibration:
            records = folder_records(args.calibration, label="--calibration")
        else:
            try:
                records = split_records("train", meta)
            except (CtfreidError, OSError) as e:
                raise CtfreidError(f"no calibration images for --int8: the run's training images cannot be read "
                                   f"({e}); give --calibration DIR") from None
        if not records:
            raise CtfreidError(f"--calibration {args.calibration}: no images (.jpg, .png...) in it")
        pick = np.random.default_rng(0).permutation(len(records))[: args.max_images]
        images = [read_image(records[i][0]) for i in sorted(pick)]
        meta["quantization"] = quantize_onnx(float_path, args.out, images)
    return meta


def run(args: argparse.Namespace) -> int:
    from ctfreid.infer.export import DEFAULT_OPSET, check_export, export_run

    if args.calibration and not args.int8:
        raise CtfreidError("--calibration is for --int8 (the images that set its activation ranges)")
    if args.images and not args.check:
        raise CtfreidError("--images is for --check (the images the export is compared on)")
    images = None
    if args.images:  # read before exporting: an empty or missing folder writes no .onnx
        from ctfreid.data.datasets import read_image
        from ctfreid.infer.gallery import folder_records

        images = [read_image(path) for path, _, _ in folder_records(args.images)[: args.max_images]]
    if args.int8:
        meta = export_int8(args)
    else:
        meta = export_run(args.model, args.out, flip=args.flip, opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {args.out}: {meta['backbone']}, codes {meta['lengths']}, input {meta['height']}x{meta['width']}, "
          f"flip test {'in the graph' if meta['flip'] else 'off'}, fingerprint {meta['fingerprint']}, "
          f"thresholds {meta['thresholds'] or 'none'}"
          + (f", int8 ({meta['quantization']['calibration_images']} calibration images)" if args.int8 else ""))
    if not args.check:
        return 0
    report = check_export(args.model, args.out, images=images, min_agreement=INT8_AGREEMENT if args.int8 else 0.999)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
