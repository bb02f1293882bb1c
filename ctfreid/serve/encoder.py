"""The model behind ``ctfreid serve``: ``ctfreid.infer.encoder.load_encoder`` (a torch run directory or an
ONNX export).

It also holds the DTO statistics for per-request ``beta`` (Sec. 3.3): when the run directory has a
validation split whose images are readable, the Gaussian fits of relevant / non-relevant pair distances
(Eq. 7) are computed once at the first start and kept in the store; a request's ``beta`` then gives its
thresholds by maximising Eq. 8 over those fits (cheap: ``L + 1`` evaluations per length). The server's
default thresholds, when the model stores none, are fitted on the same split for the accuracy target
(:func:`target_fit`: within 0.5 mAP / Rank-1 points of the longest code, the built-in cost model, planned
for ``--gallery-size`` items) and kept in the store too, and so is the weighted stage 1 fitted beside them
for searches by image (:func:`weighted_fit`, ``--weighted`` bits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load(path: str | Path, flip: bool | None = None):
    """The encoder for ``--model`` (:func:`ctfreid.infer.encoder.load_encoder`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {path} does not exist (expected a run directory or an .onnx export)")
    from ctfreid.infer.encoder import load_encoder

    return load_encoder(p, flip=flip)


def validation_set(encoder):
    """The run's validation split encoded (an ``EncodedSet``), or None: one code length, no split, or its
    images moved or unreadable."""
    info = encoder.info
    if len(encoder.lengths) < 2 or not info.get("val") or not info.get("data_root"):
        return None
    from ctfreid.data.datasets import split_records

    try:
        return encoder.encode_records(split_records("val", info))
    except (OSError, ValueError):
        return None


def dto_fits(encoder, val=None) -> dict | None:
    """Gaussian fits ``{length: [pos_mean, pos_std, neg_mean, neg_std]}`` from the validation split (``val``,
    else encoded here), or None."""
    from ctfreid.search.thresholds import pair_distances

    enc = validation_set(encoder) if val is None else val
    if enc is None:
        return None
    try:
        dist = pair_distances(enc.codes, enc.pids, enc.camids)
    except ValueError:  # too few pairs: no per-request beta
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


def weighted_fit(val, gallery_size: int, bits: int) -> dict | None:
    """``target_fit`` for a weighted stage 1 (``ctfreid.search.asymmetric``, ``bits``-bit weights), as stored
    with the store: ``{"thresholds", "weights", "gallery_size", "bits", "source"}``; None when ``val`` is
    None or the fit fails."""
    if val is None:
        return None
    from ctfreid.eval.calibration import default_weighted_fit, describe_fit

    try:
        fit = default_weighted_fit(val, gallery_size, bits)
    except ValueError:
        return None
    if fit is None:
        return None
    return {"thresholds": {str(L): int(t) for L, t in fit.thresholds.items()}, "weights": fit.weighting.to_dict(),
            "gallery_size": int(gallery_size), "bits": int(bits),
            "source": f"{describe_fit(fit, len(val))}, weighted stage 1 ({bits}-bit weights)"}


def target_fit(val, gallery_size: int) -> dict | None:
    """The default thresholds of the service from the encoded validation split ``val``
    (``ctfreid.eval.calibration.default_fit``, planned for ``gallery_size`` items) as stored with the
    store: ``{"thresholds": {"32": t, ...}, "gallery_size", "tolerance", "source"}``; None when ``val`` is
    None or the fit fails (no identity seen by two cameras, ...)."""
    if val is None:
        return None
    from ctfreid.eval.calibration import default_fit, describe_fit

    try:
        fit = default_fit(val, gallery_size)
    except ValueError:
        return None
    return {"thresholds": {str(L): int(t) for L, t in fit.thresholds.items()}, "gallery_size": int(gallery_size),
            "tolerance": fit.tolerance, "source": describe_fit(fit, len(val))}
