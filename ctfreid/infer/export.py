"""``ctfreid export``: a trained AiO model -> an ONNX encoder, and the check that it encodes as torch does.

The exported graph is the eval-mode encoder of Sec. 3.2 up to ``bn(v_k)`` for every code length (Eq. 1;
the sign of Eq. 2 is taken outside the graph, so the float ``features = bn(v_1)`` of the longest code come
from the same outputs). ``flip=True`` puts the flip test in the graph: the mean of ``bn(v_k)`` of the image
and its mirror, before the sign. The batch axis is dynamic.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript, the default since torch 2.9).
With torch 2.14.1 both exporters gave a symbolic batch dimension and outputs within 1e-6 of torch for
batches 1 and 32; the TorchScript exporter (``dynamo=False``, ``dynamic_axes``) is 5x faster to export but
deprecated (a warning on every export, removal announced), so the dynamo one is used. The batch dimension
is declared with ``torch.export.Dim``, and :func:`export_onnx` refuses a graph whose input batch dimension
came out fixed. ``optimize=True`` runs onnxscript's optimiser, which folds constants.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctfreid._atomic import atomic_write
from ctfreid.errors import CtfreidError
from ctfreid.infer.encoder import stored_fits
from ctfreid.infer.onnx_encoder import FORMAT_VERSION, INPUT_NAME, PREFIX, output_name
from ctfreid.learn.model import AiOModel

DEFAULT_OPSET = 18  # the lowest opset the dynamo exporter emits without a down-conversion pass


class BNEncoder(nn.Module):
    """``images -> (bn(v_L) for L shortest first)`` of an eval-mode AiO model, optionally flip-averaged."""

    def __init__(self, model: AiOModel, flip: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flip = flip
        self.lengths = sorted(model.lengths)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bn = self.model(images)["bn"]
        if self.flip:
            mirrored = self.model(images.flip(3))["bn"]
            return tuple((bn[length] + mirrored[length]) * 0.5 for length in self.lengths)
        return tuple(bn[length] for length in self.lengths)


def export_onnx(model: AiOModel, info: dict, out: str | os.PathLike, *, fingerprint: str, flip: bool = False,
                opset: int = DEFAULT_OPSET, thresholds: dict[int, int] | None = None, source: str | None = None,
                weighted: tuple | None = None) -> dict:
    """Write the ONNX encoder of ``model`` (eval mode asserted) to ``out`` atomically; returns its metadata.
    ``weighted``: the stored weighted stage 1 beside ``thresholds`` (``(thresholds, Weighting)``), or None."""
    import onnx

    if model.training:
        raise CtfreidError("export needs the model in eval mode (BN running statistics, Eq. 2 signs)")
    if not isinstance(opset, int) or not 18 <= opset <= 23:
        raise CtfreidError(f"opset must be an integer in 18..23 (the dynamo exporter's range), got {opset!r}")
    model = model.cpu()
    wrapper = BNEncoder(model, flip).eval()
    example = torch.zeros(2, 3, int(info["height"]), int(info["width"]))
    names = [output_name(length) for length in wrapper.lengths]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    stdout, sys.stdout = sys.stdout, io.StringIO()  # the exporter prints progress lines on stdout
    try:
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=names,
                                    dynamic_shapes={"images": {0: batch}}, opset_version=opset, optimize=True,
                                    external_data=False)
    finally:
        sys.stdout = stdout
    proto = program.model_proto
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:  # a fixed batch would encode 1 image per call, or fail
        raise CtfreidError(f"the exporter fixed the batch dimension of {INPUT_NAME!r} ({dims[0] if dims else '?'})")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "lengths": sorted(model.lengths),
        "height": int(info["height"]),
        "width": int(info["width"]),
        "mean": [float(x) for x in info["mean"]],
        "std": [float(x) for x in info["std"]],
        "flip": bool(flip),
        "thresholds": {str(k): int(v) for k, v in sorted(thresholds.items())} if thresholds else None,
        "weighted_stage1": {"thresholds": {str(k): int(v) for k, v in sorted(weighted.thresholds.items())},
                            "weights": weighted.weighting.to_dict()} if weighted else None,
        "backbone": model.backbone_name,
        "source": source,
        # the run's data folder and held-back validation records (relative paths), so that split_records
        # ("val", encoder.info) finds the images to fit DTO thresholds with the export as with the run
        "data_root": info.get("data_root"),
        "val": [list(r) for r in info.get("val") or []],
        "exporter": f"torch {torch.__version__} dynamo",
        "opset": opset,
    }
    onnx.helper.set_model_props(proto, {PREFIX + k: json.dumps(v) for k, v in meta.items()})
    proto.producer_name = "ctfreid export"
    onnx.checker.check_model(proto)
    with atomic_write(out, "wb") as f:
        f.write(proto.SerializeToString())
    return meta


def export_run(run: str | os.PathLike, out: str | os.PathLike, flip: bool = False, opset: int = DEFAULT_OPSET) -> dict:
    """``ctfreid export``: the run directory (or model.pt) ``run`` -> ``out`` (.onnx); returns the metadata."""
    from ctfreid.learn.run_dir import load_model, model_fingerprint

    if Path(out).suffix.lower() != ".onnx":
        raise CtfreidError(f"--out {out}: expected a file name ending in .onnx")
    model, info = load_model(run, device="cpu")
    assert not model.training  # load_model returns eval mode; the export depends on it
    thresholds, weighted = stored_fits(info, run)
    return export_onnx(model, info, out, fingerprint=model_fingerprint(model, info), flip=flip, opset=opset,
                       thresholds=thresholds, source=str(info["file"]), weighted=weighted)


# --- the --check comparison ---------------------------------------------------------------------------


@dataclass
class CheckReport:
    """ONNX encoder vs torch on the same images: bit agreement per length, feature difference, batch invariance."""

    n_images: int
    bit_agreement: dict[int, float]  # share of equal bits per code length
    max_feature_diff: float  # largest |bn(v_1)| difference, ONNX vs torch
    batch_max_diff: float  # largest difference between batch-1 and batch-32 outputs of the ONNX encoder
    batch_tolerance: float
    min_agreement: float
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        out = [f"{self.n_images} images; per code length, bits equal to torch's (>= {self.min_agreement:.1%} needed):"]
        out += [f"  {length:5d} bits: {share:.4%}" for length, share in sorted(self.bit_agreement.items())]
        out.append(f"largest feature difference (bn(v_1), ONNX vs torch): {self.max_feature_diff:.3g}")
        same = self.batch_max_diff <= self.batch_tolerance
        out.append(f"batch 1 vs batch 32 (ONNX): largest difference {self.batch_max_diff:.3g} "
                   f"({'identical' if same else 'DIFFERENT'} at tolerance {self.batch_tolerance:g})")
        out += [f"FAILED: {f}" for f in self.failures]
        return out


def generated_images(n: int, height: int, width: int, seed: int = 0) -> list:
    """Smooth random RGB images of odd sizes around ``height x width`` (resizing is exercised too)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = int(height * rng.uniform(0.6, 1.6)) | 1, int(width * rng.uniform(0.6, 1.6)) | 1
        coarse = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-20, 21, (h, w, 3))
        images.append(Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)))
    return images


def check_export(run: str | os.PathLike, onnx_path: str | os.PathLike, images: list | None = None, n: int = 64,
                 min_agreement: float = 0.999, batch_tolerance: float = 1e-4, threads: int | None = None) -> CheckReport:
    """Encode ``images`` (default: ``n`` generated ones) with the torch run and the ONNX file; compare."""
    from ctfreid.infer.encoder import TorchEncoder
    from ctfreid.infer.onnx_encoder import OnnxEncoder

    onnx_enc = OnnxEncoder(onnx_path, threads=threads)
    torch_enc = TorchEncoder(run, flip=onnx_enc.flip)
    if images is None:
        images = generated_images(max(n, 33), torch_enc.height, torch_enc.width)
    failures = []
    if onnx_enc.fingerprint != torch_enc.fingerprint:
        failures.append(f"fingerprint {onnx_enc.fingerprint} of {onnx_path} is not the run's {torch_enc.fingerprint}")
    if onnx_enc.lengths != torch_enc.lengths:
        failures.append(f"code lengths {onnx_enc.lengths} differ from the run's {torch_enc.lengths}")
        return CheckReport(len(images), {}, float("nan"), float("nan"), batch_tolerance, min_agreement, failures)
    ref = torch_enc.encode_images(images, batch_size=32)
    got = onnx_enc.encode_images(images, batch_size=32)
    agreement = {}
    for length in torch_enc.lengths:
        bits_ref = np.unpackbits(ref.codes[length], axis=1)
        bits_got = np.unpackbits(got.codes[length], axis=1)
        agreement[length] = float((bits_ref == bits_got).mean())
        if agreement[length] < min_agreement:
            failures.append(f"{length}-bit codes agree on {agreement[length]:.4%} of bits, below {min_agreement:.1%}")
    feature_diff = float(np.abs(ref.features - got.features).max())
    x = onnx_enc.preprocess([images[i % len(images)] for i in range(32)])  # a full batch of 32, repeating if few
    one = np.concatenate([onnx_enc.run_bn(x[i:i + 1])[max(onnx_enc.lengths)] for i in range(len(x))])
    many = onnx_enc.run_bn(x)[max(onnx_enc.lengths)]
    batch_diff = float(np.abs(one - many).max())
    if not batch_diff <= batch_tolerance:
        failures.append(f"batch 1 and batch {len(x)} differ by {batch_diff:.3g} > {batch_tolerance:g}")
    return CheckReport(len(images), agreement, feature_diff, batch_diff, batch_tolerance, min_agreement, failures)
