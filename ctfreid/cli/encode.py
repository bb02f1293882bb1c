"""``ctfreid encode``: a split of a dataset -> .npz of packed codes and features (Eq. 2)."""

from __future__ import annotations

import argparse

from ctfreid.cli._args import not_an_input, output_file, positive_int
from ctfreid.errors import CtfreidError

HELP = "encode a split of a dataset into an .npz of codes and features"
DESCRIPTION = """Run a trained AiO model (eval mode, batched, no gradients) over the query, gallery or
training images of a Market-1501-layout folder, or over the validation identities the run held back
(--split val, needs 'ctfreid train --val-fraction'), and write an .npz with pids, camids, paths,
codes_<L> (sgn(bn(v)) packed with numpy.packbits, one per code length), features (bn(v) of the
longest code, the float baseline) and meta (the model's fingerprint, flip test and input size).
'ctfreid evaluate' and 'ctfreid calibrate' read it directly, and refuse to rank sets encoded by different
models or with and without --flip (a run and its float or int8 ONNX export count as one model).

examples:
  ctfreid encode --model runs/aio --data market1501/ --split query --out q.npz
  ctfreid encode --model runs/aio --split val --out val.npz      # data folder of the run
  ctfreid encode --model runs/aio --data market1501/ --split gallery --flip --out g.npz  # flip test"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR|ENCODER.onnx",
                        help="run directory of 'ctfreid train' (or its model.pt), or its ONNX export ('ctfreid export')")
    parser.add_argument("--data", metavar="DIR", help="dataset folder in Market-1501 layout (default: the run's)")
    parser.add_argument("--split", required=True, choices=("query", "gallery", "train", "val"),
                        help="which images: query/, bounding_box_test/, bounding_box_train/ or the run's validation ids")
    parser.add_argument("--out", required=True, type=output_file, metavar="FILE.npz", help="output .npz (written atomically)")
    parser.add_argument("--dataset", default=None,
                        help="dataset loader name (e.g. market1501_500k for the extra distractors); default: Market layout")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default: 8 on CPU, where it is fastest, 128 on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0 = torch's default; 1 is fastest on a busy machine)")
    parser.add_argument("--flip", action="store_true",
                        help="flip test: average each image's and its mirror's bn(v) before the sign (2x slower)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctfreid.encoded import encoder_record, save_encoded

    if args.num_workers < 0 or args.threads < 0:
        raise CtfreidError(f"--num-workers and --threads must be >= 0, got {args.num_workers} and {args.threads}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # fail before encoding, not after
    if str(args.model).endswith(".onnx"):  # an ONNX export: onnxruntime, no torch
        from ctfreid.data.datasets import split_records
        from ctfreid.infer.encoder import load_encoder

        enc = load_encoder(args.model, device=args.device, flip=True if args.flip else None,
                           threads=args.threads or None)
        not_an_input(args.out, "--out", {"model": enc.info["file"]})
        records = split_records(args.split, enc.info, args.data, args.dataset)
        encoded = enc.encode_records(records, batch_size=args.batch_size or 32, progress=not args.quiet)
        encoded.meta["encoder"] = encoder_record(enc.fingerprint, enc.flip, enc.height, enc.width,
                                                 "int8" if enc.info.get("quantization") else None,
                                                 str(args.model), "onnxruntime")
    else:
        encoded = _encode_with_torch(args)
    encoded.meta["split"] = args.split
    save_encoded(args.out, encoded)
    lengths = ", ".join(str(length) for length in encoded.lengths)
    print(f"encoded {len(encoded)} {args.split} images ({lengths} bits, {encoded.features.shape[1]}-d features) -> {args.out}")
    return 0


def _encode_with_torch(args: argparse.Namespace):
    import torch

    from ctfreid.encoded import encoder_record
    from ctfreid.infer import encode_records, load_model, split_records
    from ctfreid.learn.run_dir import model_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load_model(args.model, args.device)
    not_an_input(args.out, "--out", {"model": info["file"]})
    records = split_records(args.split, info, args.data, args.dataset)
    device = next(model.parameters()).device
    encoded = encode_records(model, records, batch_size=args.batch_size, height=info["height"], width=info["width"],
                             device=device, num_workers=args.num_workers, progress=not args.quiet,
                             mean=info["mean"], std=info["std"], flip=args.flip)
    encoded.meta["encoder"] = encoder_record(model_fingerprint(model, info), args.flip, info["height"], info["width"],
                                             None, str(args.model), "torch")
    return encoded
