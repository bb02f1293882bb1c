#!/usr/bin/env python3
"""Encoder speed: torch eager vs the ONNX export of ``ctfreid export`` on onnxruntime, in crops per second.

    python3 benchmarks/bench_encode.py                 # the table of benchmarks/README.md
    python3 benchmarks/bench_encode.py --backbones mobilenet_v2 --sizes 64x32 --min-time 0.5   # quick

For MobileNetV2, ResNet-18 and ResNet-50 AiO encoders (random initialisation: speed does not depend on the
weights; the codes of Eq. 2 for lengths 2048..32 included) at 256x128 (the paper's input) and 64x32 (the
demo's), batch 1 and 32, 1 and 2 threads (``torch.set_num_threads`` / onnxruntime ``intra_op_num_threads``):

- network only: normalised float32 batches in, ``bn(v_k)`` of every length out; torch and onnxruntime run
  alternately in each cell until each has ``--min-time`` seconds and 3 runs; medians;
- where the time goes per image: JPEG decoding (Pillow, 128x64 Market-1501 sized crops), preprocessing
  (``ctfreid.infer.preprocess``, NumPy, and the torchvision test transform), the network (above); with
  decoding, crops/s = 1 / (decode + preprocess + network), the three steps being sequential per batch;
- the float32 ceiling: each encoder's floating-point operations per crop (torch's counter) and the FLOP/s
  of a large float32 matrix product on the same threads, the faster of torch's and onnxruntime's; "/ peak"
  is the share of that ceiling
  each runtime sustains. A runtime cannot be 2x faster than another that already runs at over half of it;
- ``--int8``: each encoder quantised as ``ctfreid export --int8`` does (``ctfreid.infer.quantize``: static
  QDQ, uint8 activations, 7-bit per-channel weights of the backbone, calibrated on 64 generated images):
  its speed in the same table and its bit agreement with float32 on 64 other generated images. Accuracy on
  CUHK03: ``docs/results-cuhk03.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Idle worker threads sleep instead of spinning: on a machine shared by other jobs, spinning OpenMP threads
# made torch with 2 threads 6x slower than with 1 (measured here); onnxruntime gets the same setting below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LENGTHS = (2048, 1024, 512, 256, 128, 64, 32)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed_pair(fns: dict, min_time: float, min_runs: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, run alternately (after one warm-up call each); one run
    each when a warm-up call took over 3 s (keeps the slowest cells short on a shared machine)."""
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > 3.0:
            min_runs = 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(sum(t) < min_time or len(t) < min_runs for t in times.values()):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_encoder(backbone: str, height: int, width: int, folder: Path, int8: bool):
    import torch

    from ctfreid.infer.export import export_onnx
    from ctfreid.learn.model import AiOModel

    model = AiOModel(num_classes=10, backbone=backbone, lengths=LENGTHS).eval()
    path = folder / f"{backbone}_{height}x{width}.onnx"
    info = {"height": height, "width": width, "mean": MEAN, "std": STD}
    export_onnx(model, info, path, fingerprint="bench")
    quant = None
    if int8:
        from ctfreid.infer.export import generated_images
        from ctfreid.infer.quantize import quantize_onnx

        quant = folder / f"{backbone}_{height}x{width}.int8.onnx"
        quantize_onnx(path, quant, generated_images(64, height, width, seed=1))
    return model, path, quant, torch


def flop_count(model, height: int, width: int) -> float:
    """Floating-point operations of one crop through ``model`` (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, height, width))
    return float(counter.get_total_flops())


def gemm_peak(threads: int, min_time: float, n: int = 2048) -> dict[str, float]:
    """FLOP/s of a float32 ``n x n`` matrix product on ``threads`` threads, in torch (MKL/oneDNN) and in
    onnxruntime (MLAS): what one core's vector units sustain on the most regular work there is, the
    practical ceiling of any float32 convolution kernel. Both, because either library can be the slow
    one on a given CPU (MKL on AMD Zen 4: 80 GFLOP/s where MLAS does more); the ceiling is the larger."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b.numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    session = ort_session(model.SerializeToString(), threads)
    x = a.numpy()
    t = timed_pair({"torch": lambda: a @ b, "onnxruntime": lambda: session.run(None, {"a": x})}, min_time)
    return {name: 2 * n**3 / seconds for name, seconds in t.items()}


def ort_session(path: Path | bytes, threads: int):
    """An onnxruntime CPU session of the model at ``path`` (or serialised in ``bytes``) on ``threads`` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OMP_WAIT_POLICY above
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def jpeg_crops(n: int, seed: int = 0) -> list[bytes]:
    """Market-1501 sized (128x64) JPEG crops, smooth random content with noise, quality 90."""

    from ctfreid.infer.export import generated_images

    out = []
    for image in generated_images(n, 128, 64, seed):
        buf = io.BytesIO()
        image.resize((64, 128)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def stage_times(height: int, width: int, min_time: float) -> dict[str, float]:
    """Seconds per image: JPEG decoding, NumPy preprocessing, torchvision preprocessing."""
    from PIL import Image

    from ctfreid.data.transforms import TransformConfig, build_test_transform
    from ctfreid.infer.preprocess import preprocess_batch

    blobs = jpeg_crops(32)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    tf = build_test_transform(TransformConfig(height=height, width=width))
    import torch

    t = timed_pair({
        "decode": lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs],
        "preprocess_numpy": lambda: preprocess_batch(images, height, width, MEAN, STD),
        "preprocess_torch": lambda: torch.stack([tf(im) for im in images]),
    }, min_time)
    return {k: v / len(blobs) for k, v in t.items()}


def int8_agreement(float_path: Path, int8_path: Path, height: int, width: int) -> dict[int, float]:
    from ctfreid.infer.export import generated_images
    from ctfreid.infer.preprocess import preprocess_batch

    x = preprocess_batch(generated_images(64, height, width, seed=5), height, width, MEAN, STD)
    names = [f"bn_{L}" for L in sorted(LENGTHS)]
    a = ort_session(float_path, 1).run(names, {"images": x})
    b = ort_session(int8_path, 1).run(names, {"images": x})
    return {L: float(((fa >= 0) == (fb >= 0)).mean()) for L, fa, fb in zip(sorted(LENGTHS), a, b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet18", "resnet50"])
    ap.add_argument("--sizes", nargs="+", default=["256x128", "64x32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of runs per runtime and cell (default 1)")
    ap.add_argument("--int8", action="store_true", help="also the int8 encoders of 'ctfreid export --int8'")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    import onnxruntime
    import torch

    rows, stages, agreement = [], {}, {}
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; crops/s, medians; random weights")
    gemms = {t: gemm_peak(t, args.min_time) for t in args.threads}
    peaks = {t: max(g.values()) for t, g in gemms.items()}
    print("float32 matrix product (2048 x 2048), torch / onnxruntime: "
          + ", ".join(f"{g['torch'] / 1e9:.0f} / {g['onnxruntime'] / 1e9:.0f} GFLOP/s on {t} thread{'s' * (t > 1)}"
                      for t, g in gemms.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            height, width = (int(v) for v in size.split("x"))
            torch.set_num_threads(1)
            stages[size] = stage_times(height, width, args.min_time)
            print(f"{size}: per image decode {stages[size]['decode'] * 1e3:.3f} ms, preprocess numpy "
                  f"{stages[size]['preprocess_numpy'] * 1e3:.3f} ms, torchvision {stages[size]['preprocess_torch'] * 1e3:.3f} ms",
                  flush=True)
            for backbone in args.backbones:
                model, path, quant, _ = make_encoder(backbone, height, width, Path(tmp), args.int8)
                flops = flop_count(model, height, width)
                if quant is not None:
                    agreement[f"{backbone} {size}"] = int8_agreement(path, quant, height, width)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    sessions = {"ort": ort_session(path, threads)}
                    if quant is not None:
                        sessions["ort_int8"] = ort_session(quant, threads)
                    for batch in args.batches:
                        x = np.random.default_rng(0).standard_normal((batch, 3, height, width)).astype(np.float32)
                        xt = torch.from_numpy(x)

                        def run_torch():
                            with torch.inference_mode():
                                return model(xt)["bn"]

                        fns = {"torch": run_torch}
                        fns.update({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()})
                        t = timed_pair(fns, args.min_time)
                        row = {"backbone": backbone, "size": size, "batch": batch, "threads": threads,
                               "gflop": flops / 1e9, "peak_gflops": peaks[threads] / 1e9,
                               **{f"{k}_net_s": v / batch for k, v in t.items()}}
                        st = stages[size]
                        for k in t:
                            pre = st["preprocess_torch" if k == "torch" else "preprocess_numpy"]
                            row[f"{k}_crops_s"] = batch / t[k]
                            row[f"{k}_crops_s_jpeg"] = 1 / (st["decode"] + pre + t[k] / batch)
                        rows.append(row)
                        extra = f", int8 {row['ort_int8_crops_s']:.0f}" if "ort_int8_crops_s" in row else ""
                        print(f"{backbone:12s} {size:7s} b{batch:<2d} t{threads}: torch {row['torch_crops_s']:8.1f}  "
                              f"ort {row['ort_crops_s']:8.1f}  x{row['ort_crops_s'] / row['torch_crops_s']:.2f}{extra}"
                              f"   with JPEG: {row['torch_crops_s_jpeg']:.1f} / {row['ort_crops_s_jpeg']:.1f}", flush=True)
    print()
    print(table(rows))
    for cell, agree in agreement.items():
        print(f"int8 vs float32 {cell}, share of equal bits: "
              + ", ".join(f"{L}: {a:.2%}" for L, a in sorted(agree.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stages": stages, "int8_agreement": agreement}, indent=1))


def table(rows: list[dict]) -> str:
    int8 = any("ort_int8_crops_s" in r for r in rows)
    head = ("| backbone | input | batch | threads | torch eager | onnxruntime | ratio |"
            + (" ort int8 |" if int8 else "") + " torch + JPEG | ort + JPEG | GFLOP a crop | torch / peak | ort / peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        q = (f" {r['ort_int8_crops_s']:.0f} |" if "ort_int8_crops_s" in r else " |") if int8 else ""
        lines.append(f"| {r['backbone']} | {r['size']} | {r['batch']} | {r['threads']} | {r['torch_crops_s']:.1f} | "
                     f"{r['ort_crops_s']:.1f} | {r['ort_crops_s'] / r['torch_crops_s']:.2f}x |{q} "
                     f"{r['torch_crops_s_jpeg']:.1f} | {r['ort_crops_s_jpeg']:.1f} | {r['gflop']:.2f} | "
                     f"{r['torch_crops_s'] * r['gflop'] / r['peak_gflops']:.0%} | {r['ort_crops_s'] * r['gflop'] / r['peak_gflops']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
