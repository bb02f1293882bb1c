"""The model behind ``ctfreid serve``: ``ctfreid.infer.encoder.load_encoder`` when the installed ctfreid has
it (torch run directories and ONNX exports), else a small adapter over ``learn.run_dir.load_model`` with
the same members (``fingerprint``, ``lengths``, ``height``, ``width``, ``flip``, ``thresholds``, ``info``,
``encode_images``).

It also holds the DTO statistics for per-request ``beta`` (Sec. 3.3): when the run directory has a
validation split whose images are readable, the Gaussian fits of relevant / non-relevant pair distances
(Eq. 7) are computed once at the first start and kept in the store; a request's ``beta`` then gives its
thresholds by maximising Eq. 8 over those fits (cheap: ``L + 1`` evaluations per length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid.errors import CtfreidError


class TorchEncoder:
    """A trained run directory (or model.pt) as an encoder of decoded RGB images (Eq. 2 codes)."""

    def __init__(self, path: str | Path, device: str = "cpu", flip: bool | None = None) -> None:
        from ctfreid.learn.run_dir import load_model, model_fingerprint

        self.model, self.info = load_model(path, device=device)
        self.fingerprint = model_fingerprint(self.model, self.info)
        self.lengths = sorted(self.model.lengths)
        self.height, self.width = self.info["height"], self.info["width"]
        self.flip = bool(flip)
        thr = self.info.get("thresholds")
        self.thresholds = {int(k): int(v) for k, v in thr.items()} if thr else None
        self.device = device

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray | dict:
        import torch

        from ctfreid.data.transforms import TransformConfig, build_test_transform
        from ctfreid.learn.model import sign_codes

        tf = build_test_transform(TransformConfig(height=self.height, width=self.width,
                                                  mean=tuple(self.info["mean"]), std=tuple(self.info["std"])))
        out: dict[int, list[np.ndarray]] = {L: [] for L in self.lengths}
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.stack([tf(im.convert("RGB")) for im in images[i:i + batch_size]]).to(self.device)
                bn = self.model(x)["bn"]
                if self.flip:
                    m = self.model(x.flip(3))["bn"]
                    bn = {L: (bn[L] + m[L]) * 0.5 for L in self.lengths}
                for L in self.lengths:
                    out[L].append(np.packbits(sign_codes(bn[L]).cpu().numpy() > 0, axis=1))
        return _Encoded({L: np.concatenate(v) for L, v in out.items()})

    def validation_codes(self):
        """Encoded validation split (codes, pids, camids) or None when the run has none / it is unreadable."""
        if not self.info.get("val") or not self.info.get("data_root"):
            return None
        from ctfreid.infer.encoder import encode_records
        from ctfreid.learn.run_dir import split_records

        try:
            records = split_records("val", self.info)
            enc = encode_records(self.model, records, height=self.height, width=self.width, mean=self.info["mean"],
                                 std=self.info["std"], flip=self.flip)
        except (OSError, ValueError):
            return None
        return enc.codes, enc.pids, enc.camids


class _Encoded:
    def __init__(self, codes: dict) -> None:
        self.codes = codes


def load(path: str | Path, flip: bool | None = None):
    """The encoder for ``--model``: ``load_encoder`` if available, else :class:`TorchEncoder`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {path} does not exist (expected a run directory or an .onnx export)")
    try:
        from ctfreid.infer.encoder import load_encoder  # the shared contract, when it has landed
    except ImportError:
        load_encoder = None
    if load_encoder is not None:
        return load_encoder(p, flip=flip)
    if p.suffix == ".onnx":
        raise CtfreidError(f"{path}: this ctfreid cannot read ONNX encoders yet (needs ctfreid.infer.encoder.load_encoder)")
    return TorchEncoder(p, flip=flip)


def dto_fits(encoder) -> dict | None:
    """Gaussian fits ``{length: [pos_mean, pos_std, neg_mean, neg_std]}`` from the validation split, or None."""
    from ctfreid.search.thresholds import pair_distances

    get = getattr(encoder, "validation_codes", None)
    if get is None or len(encoder.lengths) < 2:
        return None
    val = get()
    if val is None:
        return None
    try:
        dist = pair_distances(*val)
    except CtfreidError:
        return None
    out = {}
    for L, d in dist.items():
        pos, neg = d.positive.astype(np.float64), d.negative.astype(np.float64)
        if pos.size < 2 or neg.size < 2 or pos.std() == 0 or neg.std() == 0:
            return None
        out[str(L)] = [float(pos.mean()), float(pos.std()), float(neg.mean()), float(neg.std())]
    return out


def thresholds_for_beta(fits: dict, beta: float, rho: float = 1.0) -> dict[int, int]:
    """DTO thresholds (Eq. 8 maximised over t = 0..L) from stored Gaussian fits (Eq. 7)."""
    from ctfreid.search.thresholds import f_beta_curve

    return {int(L): int(np.argmax(f_beta_curve(int(L), *f, beta=beta, rho=rho))) for L, f in fits.items()}
